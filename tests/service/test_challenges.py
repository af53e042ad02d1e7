"""Proof-of-work challenges: issue, redeem once, and every refusal with its reason and HTTP status."""

from __future__ import annotations

import pytest

from sameguard.actions import solve, verify_solution
from sameguard.service.challenges import ChallengeError, ChallengeIssuer

SECRET = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def issuer_and_clock():
    clock = Clock()
    return ChallengeIssuer(SECRET, ttl_s=60, clock=clock), clock


def test_service_challenge_round_trip_hands_back_the_payload_once(issuer_and_clock):
    issuer, _ = issuer_and_clock
    c = issuer.issue("alice", 8, payload={"answer": 1})
    nonce = solve(c.challenge, 8)
    challenge, payload = issuer.redeem(c.challenge, c.signature, nonce, "alice")
    assert payload == {"answer": 1}
    assert challenge.id == c.id
    assert issuer.pending == 0
    with pytest.raises(ChallengeError) as refused:
        issuer.redeem(c.challenge, c.signature, nonce, "alice")
    assert (refused.value.reason, refused.value.status) == ("replayed", 409)


def test_service_challenge_wrong_nonce_leaves_it_redeemable(issuer_and_clock):
    issuer, _ = issuer_and_clock
    c = issuer.issue("alice", 8)
    wrong = next(str(i) for i in range(10_000) if not verify_solution(c.challenge, 8, str(i)))
    with pytest.raises(ChallengeError, match="does not solve"):
        issuer.redeem(c.challenge, c.signature, wrong, "alice")
    assert issuer.redeem(c.challenge, c.signature, solve(c.challenge, 8), "alice")[0].id == c.id


@pytest.mark.parametrize(("case", "reason", "status"), [
    ("wrong_nonce", "invalidsolution", 403),
    ("other_client", "clientmismatch", 403),
    ("lowered_bits", "forged", 403),  # the text changed: the signature no longer matches
    ("zero_signature", "forged", 403),
    ("other_server", "forged", 403),  # another secret
    ("not_a_challenge", "malformed", 400),
    ("expired", "expired", 410),
    ("unknown", "unknown", 410),  # signed by this secret but not held (e.g. after a restart)
])
def test_service_challenge_refusals_say_why(issuer_and_clock, case, reason, status):
    issuer, clock = issuer_and_clock
    c = issuer.issue("alice", 8)
    challenge, signature, nonce, client = c.challenge, c.signature, solve(c.challenge, 8), "alice"
    if case == "wrong_nonce":
        nonce = next(str(i) for i in range(10_000) if not verify_solution(challenge, 8, str(i)))
    elif case == "other_client":
        client = "mallory"
    elif case == "lowered_bits":
        challenge, nonce = challenge.replace("sg-pow-1:8:", "sg-pow-1:0:", 1), "0"
    elif case == "zero_signature":
        signature = "0" * 64
    elif case == "other_server":
        issuer = ChallengeIssuer(b"x" * 32)
    elif case == "not_a_challenge":
        challenge = "hello"
    elif case == "expired":
        clock.now += 61
    elif case == "unknown":
        issuer = ChallengeIssuer(SECRET, clock=clock)
    with pytest.raises(ChallengeError) as refused:
        issuer.redeem(challenge, signature, nonce, client)
    assert (refused.value.reason, refused.value.status) == (reason, status)
    assert str(refused.value).endswith(".")  # a sentence


def test_service_challenge_issuer_bounds_pending_challenges():
    issuer = ChallengeIssuer(SECRET, max_pending_per_client=2, max_pending=3)
    issuer.issue("a", 1)
    issuer.issue("a", 1)
    with pytest.raises(ChallengeError, match="Client has 2 unsolved") as per_client:
        issuer.issue("a", 1)
    issuer.issue("b", 1)
    with pytest.raises(ChallengeError, match="server holds too many") as server:
        issuer.issue("c", 1)
    assert {per_client.value.status, server.value.status} == {429}
    assert issuer.pending == 3


def test_service_challenge_expired_ones_free_their_slot():
    clock = Clock()
    issuer = ChallengeIssuer(SECRET, ttl_s=10, max_pending_per_client=1, clock=clock)
    issuer.issue("a", 1)
    clock.now += 11
    assert issuer.issue("a", 1).bits == 1


@pytest.mark.parametrize("bad", [{"secret": b"short"}, {"ttl_s": 0}, {"max_pending": 0},
                                 {"max_pending_per_client": 0}], ids=str)
def test_service_challenge_issuer_refuses_bad_arguments(bad):
    with pytest.raises(ValueError):
        ChallengeIssuer(**({"secret": SECRET} | bad))


@pytest.mark.parametrize(("bits", "resource"), [(65, ""), (-1, ""), (8, "NOT-HEX")])
def test_service_challenge_issue_refuses_bad_bits_and_resources(bits, resource):
    with pytest.raises(ValueError):
        ChallengeIssuer(SECRET).issue("a", bits, resource=resource)


def test_service_challenge_public_fields_leave_the_client_out(issuer_and_clock):
    issuer, _ = issuer_and_clock
    public = issuer.issue("alice", 3).to_dict()
    assert "client" not in public
    assert (public["scheme"], public["hash"], public["bits"]) == ("sg-pow-1", "sha256", 3)
