"""The actions and the policy on hand-made cases: reject, misinformation, proof-of-work, challenges."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sameguard.actions import (
    ChallengeIssuer,
    Misinformation,
    Monitor,
    Policy,
    ProofOfWork,
    Reject,
    batch_bits,
    build_action,
    leading_zero_bits,
    misinformation_weight,
    reverse_probabilities,
    solve,
    verify_solution,
)
from sameguard.actions.pow import (
    ChallengeClientMismatchError,
    ChallengeExpiredError,
    ChallengeForgedError,
    ChallengeMalformedError,
    ChallengeReplayedError,
    InvalidSolutionError,
    TooManyChallengesError,
)
from sameguard.api import NotCalibratedError


def _probs(n: int, k: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g) * 3, dim=1)


# -- reject / monitor ---------------------------------------------------------------------------
def test_service_reject_refuses_exactly_the_flagged_queries():
    probs = _probs(4)
    out = Reject().apply(None, probs, torch.tensor([0.1, 0.5, 0.5000001, float("nan")]), 0.5)
    assert out.refused.tolist() == [False, False, True, True]  # score > tau, and NaN fails closed
    assert out.actions == ("allow", "allow", "reject", "reject")
    assert torch.equal(out.probabilities, probs)


def test_service_monitor_changes_nothing():
    probs = _probs(3)
    out = Monitor().apply(None, probs, torch.tensor([9.0, 9.0, 9.0]), 0.0)
    assert torch.equal(out.probabilities, probs) and not out.refused.any() and out.actions == ("allow",) * 3


# -- misinformation -----------------------------------------------------------------------------
def test_service_misinformation_leaves_benign_answers_identical():
    probs = _probs(50, seed=1)
    scores = torch.linspace(-1.0, 0.3, 50)
    out = Misinformation().apply(None, probs, scores, float(scores.max()))  # all <= tau, one equal to it
    assert torch.equal(out.probabilities, probs)  # bit for bit
    assert out.actions == ("allow",) * 50 and not (out.alpha > 0).any()


def test_service_misinformation_misleads_above_threshold_and_stays_on_the_simplex():
    for seed in range(5):
        probs = _probs(64, k=7, seed=seed)
        scores = torch.rand(64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        for action in (Misinformation(), Misinformation(switch="paper"), Misinformation(misleading="least_likely"),
                       Misinformation(nu=3.0, temperature=4.0)):
            out = action.apply(None, probs, scores, 0.0)
            p = out.probabilities
            assert p.dtype == torch.float32 and (p >= 0).all()
            assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-6)
        out = Misinformation().apply(None, probs, scores, 0.0)
        high = scores > 0.01  # alpha = tanh(1e4 * 0.01 / 2) = 1 in float
        assert (out.probabilities[high].argmax(1) == probs[high].argmin(1)).all()
        assert (out.probabilities[high].argmax(1) != probs[high].argmax(1)).all()
        assert torch.equal(out.probabilities[scores <= 0], probs[scores <= 0])


def test_service_misinformation_switch_values_by_hand():
    s = torch.tensor([-1.0, 0.0, 1e-4, 1.0])
    one = misinformation_weight(s, 0.0, nu=1e4, switch="onesided")
    assert one[0] == 0 and one[1] == 0 and one[2] == pytest.approx(torch.tanh(torch.tensor(0.5)).item())
    assert one[3] == 1.0
    paper = misinformation_weight(s, 0.0, nu=1e4, switch="paper")
    assert paper[1] == 0.5 and paper[0] < 1e-30 and paper[3] == 1.0
    assert misinformation_weight(torch.tensor([float("nan")]), 0.0)[0] == 1.0
    rev = reverse_probabilities(torch.tensor([[0.7, 0.2, 0.1]]))
    expected = torch.tensor([1 / 0.7, 1 / 0.2, 1 / 0.1])
    assert torch.allclose(rev[0], expected / expected.sum(), atol=1e-6)


def test_service_misinformation_accepts_a_misinformation_model_and_validates_it():
    probs = _probs(3, k=4)

    def always_class_two(x, p):
        return torch.nn.functional.one_hot(torch.full((len(p),), 2), 4).float()

    out = Misinformation(misleading=always_class_two).apply(None, probs, torch.tensor([1.0, 1.0, -1.0]), 0.0)
    assert out.probabilities[:2].argmax(1).tolist() == [2, 2] and torch.equal(out.probabilities[2], probs[2])
    with pytest.raises(ValueError, match="must return"):
        Misinformation(misleading=lambda x, p: p[:, :2]).apply(None, probs, torch.ones(3), 0.0)
    for bad in (dict(nu=0), dict(nu=float("inf")), dict(switch="step"), dict(misleading="random"), dict(temperature=0)):
        with pytest.raises(ValueError):
            Misinformation(**bad)


# -- proof-of-work: the puzzle ------------------------------------------------------------------
def test_service_pow_leading_zero_bits_by_hand():
    assert leading_zero_bits(b"\x00\x00\xff") == 16
    assert leading_zero_bits(b"\x00\x01") == 15
    assert leading_zero_bits(b"\x80") == 0
    assert leading_zero_bits(b"\x00\x00") == 16


def test_service_pow_solve_verify_round_trip_and_tampered_nonce():
    challenge = "sg-pow-1:12:0:" + "a" * 32 + ":" + "b" * 16 + ":"
    nonce = solve(challenge, 12)
    digest = hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()
    assert leading_zero_bits(digest) >= 12 and verify_solution(challenge, 12, nonce)
    # A tampered nonce (the next counter values that do not solve it) is refused, as is the same nonce on a
    # tampered challenge (fixed strings, so this is deterministic).
    tampered = next(str(i) for i in range(int(nonce) + 1, int(nonce) + 10_000)
                    if leading_zero_bits(hashlib.sha256(f"{challenge}:{i}".encode()).digest()) < 12)
    assert not verify_solution(challenge, 12, tampered)
    assert not verify_solution(challenge.replace(":12:", ":13:"), 12, nonce)
    assert not verify_solution(challenge, 40, nonce)  # the same nonce at a higher difficulty
    assert not verify_solution(challenge, 0, "bad nonce!")  # malformed nonces are never solutions
    assert not verify_solution(challenge, 0, "")
    with pytest.raises(ValueError, match="No solution"):
        solve(challenge, 60, max_attempts=10)


def test_service_pow_batch_bits_sums_the_work():
    assert batch_bits([10]) == 10
    assert batch_bits([3, 3]) == 4
    assert batch_bits([0] * 64) == 6
    assert batch_bits([20, 0]) == 21  # ceil: never cheaper than the sum
    assert batch_bits([]) == 0


def test_service_pow_calibration_keeps_benign_p99_within_budget():
    g = torch.Generator().manual_seed(0)
    benign = torch.randn(2000, generator=g).abs() * 0.01 + 0.02
    pow_ = ProofOfWork(benign_bits=8, bits_per_spread=4, max_bits=20).calibrate(benign)
    bits = pow_.bits_for(benign)
    assert torch.quantile(bits.double(), 0.99) <= 8
    assert pow_.calibration_["benign_fraction_within_budget"] >= 0.99
    assert pow_.bits_for(torch.tensor([pow_.anchor_]))[0] == 8  # the anchor pays exactly benign_bits
    high = pow_.bits_for(torch.tensor([pow_.anchor_ + pow_.spread_, pow_.anchor_ + 2 * pow_.spread_, 1e9, float("nan")],
                                     dtype=torch.float64))
    assert high.tolist() == [12, 16, 20, 20]  # +4 bits per spread, capped, NaN pays the cap
    s = torch.linspace(-1, 1, 200)
    assert (pow_.bits_for(s).diff() >= 0).all()  # monotone
    with pytest.raises(NotCalibratedError):
        ProofOfWork().bits_for(torch.zeros(1))
    with pytest.raises(ValueError):
        ProofOfWork(benign_bits=30, max_bits=20)


# -- proof-of-work: challenges ------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_service_challenge_round_trip_replay_forgery_expiry():
    clock = Clock()
    issuer = ChallengeIssuer(b"k" * 32, ttl_s=60, clock=clock)
    c = issuer.issue("alice", 8, payload={"answer": 1})
    nonce = solve(c.challenge, 8)
    with pytest.raises(InvalidSolutionError):  # a wrong nonce is refused and the challenge stays redeemable
        wrong = next(str(i) for i in range(10_000) if not verify_solution(c.challenge, 8, str(i)))
        issuer.redeem(c.challenge, c.signature, wrong, "alice")
    with pytest.raises(ChallengeClientMismatchError):
        issuer.redeem(c.challenge, c.signature, nonce, "mallory")
    challenge, payload = issuer.redeem(c.challenge, c.signature, nonce, "alice")
    assert payload == {"answer": 1} and challenge.id == c.id
    with pytest.raises(ChallengeReplayedError):
        issuer.redeem(c.challenge, c.signature, nonce, "alice")
    # Forgery: lower the difficulty in the text; the signature no longer matches.
    c2 = issuer.issue("alice", 16)
    easier = c2.challenge.replace("sg-pow-1:16:", "sg-pow-1:0:", 1)
    with pytest.raises(ChallengeForgedError):
        issuer.redeem(easier, c2.signature, "0", "alice")
    with pytest.raises(ChallengeForgedError):
        issuer.redeem(c2.challenge, "0" * 64, "0", "alice")
    with pytest.raises(ChallengeMalformedError):
        issuer.redeem("hello", c2.signature, "0", "alice")
    # Expiry.
    c3 = issuer.issue("alice", 4)
    n3 = solve(c3.challenge, 4)
    clock.now += 61
    with pytest.raises(ChallengeExpiredError):
        issuer.redeem(c3.challenge, c3.signature, n3, "alice")
    # Another server (another secret) does not accept it.
    with pytest.raises(ChallengeForgedError):
        ChallengeIssuer(b"x" * 32).redeem(c3.challenge, c3.signature, n3, "alice")


def test_service_challenge_issuer_bounds_pending_challenges():
    issuer = ChallengeIssuer(b"k" * 32, max_pending_per_client=2, max_pending=3)
    issuer.issue("a", 1)
    issuer.issue("a", 1)
    with pytest.raises(TooManyChallengesError):
        issuer.issue("a", 1)
    issuer.issue("b", 1)
    with pytest.raises(TooManyChallengesError):
        issuer.issue("c", 1)
    assert issuer.pending == 3


# -- policy -------------------------------------------------------------------------------------
def test_service_policy_maps_scores_to_actions_with_escalation():
    policy = Policy("misinformation", escalate=(1.0, Reject()))
    assert policy.name == "misinformation+reject"
    assert [policy.action_for(s, 0.5) for s in (0.1, 0.7, 2.0)] == ["allow", "misinform", "reject"]
    probs = _probs(3)
    out = policy.decide(None, probs, torch.tensor([0.1, 0.7, 2.0]), 0.5)
    assert out.refused.tolist() == [False, False, True]
    assert torch.equal(out.probabilities[0], probs[0]) and not torch.equal(out.probabilities[1], probs[1])
    assert Policy(Reject(), threshold=0.2).resolve_threshold(None) == 0.2
    with pytest.raises(ValueError, match="no threshold"):
        Policy("reject").resolve_threshold(None)
    with pytest.raises(ValueError, match="Unknown policy"):
        build_action("shout")
    assert isinstance(build_action("pow", benign_bits=4), ProofOfWork)
