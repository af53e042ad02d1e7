"""Per-client alarms in the guard: calibration, escalation after the alarm, operators, persistence."""

from __future__ import annotations

import math

import pytest
import torch

from sameguard.alarms import ClientAlarms
from sameguard.api import ArtifactError
from sameguard.guard import Guard

SHAPE = (1, 8, 8)
K = 3


class Victim:
    """A fixed black box: the class is decided by which third of the image is brightest."""

    image_shape, num_classes, weights_sha256 = SHAPE, K, "victim-a"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        thirds = torch.stack([x[:, :, :, :3].mean((1, 2, 3)), x[:, :, :, 3:5].mean((1, 2, 3)),
                              x[:, :, :, 5:].mean((1, 2, 3))], dim=1)
        return torch.softmax(10 * thirds, dim=1)


class Brightness:
    """``score = mean pixel``, counting its calls; threshold 0.9 (no benign image reaches it)."""

    threshold_ = 0.9

    def __init__(self) -> None:
        self.calls = 0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1).mean(1)


class Contrast:
    """``score = pixel standard deviation``."""

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).std(1)


def benign(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * 1.2 - 1.0  # values in [-1, 0.2]


def suspicious(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * 0.8 - 0.1  # brighter than every benign image on average


@pytest.fixture
def setup():
    victim, detector = Victim(), Brightness()
    alarms = ClientAlarms.calibrate(victim, {"brightness": detector, "contrast": Contrast()}, benign(3000, seed=1),
                                    delta=1e-3, min_class_size=20)
    return victim, detector, alarms


def test_alarmed_client_gets_the_action_on_every_later_query(setup):
    victim, detector, alarms = setup
    guard = Guard(victim, detector, "reject", alarms=alarms)
    verdicts = [guard.protect(suspicious(1, seed=100 + i), "mallory") for i in range(30)]
    alarmed = [v.decisions[0].alarmed for v in verdicts]
    first = alarmed.index(True)
    assert 1 <= first < 10  # not on the first query (one p-value cannot reach 1/delta), but soon
    assert all(alarmed[first:])  # the alarm latches
    assert [v.refused.item() for v in verdicts] == alarmed  # below the per-query threshold: refused only by alarm
    ev = alarms.evidence("mallory")
    assert ev is not None and ev.alarm_query == first + 1 and ev.log_evidence >= math.log(1e3)
    # a benign-looking query of an alarmed client is refused too
    assert guard.protect(benign(1, seed=5), "mallory").refused.item()


def test_benign_client_is_not_alarmed_and_answered(setup):
    victim, detector, alarms = setup
    guard = Guard(victim, detector, "reject", alarms=alarms)
    verdict = guard.protect(benign(300, seed=7), "alice")
    assert not verdict.alarmed
    assert not bool(verdict.refused.any())
    assert alarms.alarmed_clients() == []


def test_evidence_does_not_depend_on_batching(setup, tmp_path):
    victim, detector, alarms = setup
    alarms.save(tmp_path / "alarms")
    twin = ClientAlarms.load(tmp_path / "alarms", dict(alarms.scorers), victim)
    x = suspicious(20, seed=3)
    one_batch = Guard(victim, detector, "monitor", alarms=alarms).protect(x, "a")
    singles = Guard(victim, detector, "monitor", alarms=twin)
    per_query = [singles.protect(x[i:i + 1], "a").decisions[0] for i in range(20)]
    assert [d.alarmed for d in one_batch.decisions] == [d.alarmed for d in per_query]
    torch.testing.assert_close(torch.tensor([d.evidence for d in one_batch.decisions]),
                               torch.tensor([d.evidence for d in per_query]), rtol=1e-5, atol=1e-6)


def test_guard_detector_is_scored_once_per_batch(setup):
    victim, detector, alarms = setup
    guard = Guard(victim, detector, "monitor", alarms=alarms)
    before = detector.calls
    guard.protect(benign(4, seed=2), "alice")
    assert detector.calls == before + 1


def test_operator_clear_and_forget(setup):
    victim, detector, alarms = setup
    guard = Guard(victim, detector, "reject", alarms=alarms)
    guard.protect(suspicious(30, seed=11), "mallory")
    assert [e.client for e in alarms.alarmed_clients()] == ["mallory"]
    assert alarms.clear("mallory")
    assert not guard.protect(benign(1, seed=12), "mallory").refused.item()
    guard.reset("mallory")
    assert alarms.evidence("mallory") is None
    assert not alarms.clear("nobody")


def test_save_load_round_trip_and_refusals(setup, tmp_path):
    victim, detector, alarms = setup
    alarms.save(tmp_path / "alarms")
    loaded = ClientAlarms.load(tmp_path / "alarms", {"brightness": detector, "contrast": Contrast()}, victim)
    x = suspicious(15, seed=21)
    a = Guard(victim, detector, "monitor", alarms=alarms).protect(x, "c")
    b = Guard(victim, detector, "monitor", alarms=loaded).protect(x, "c")
    assert [d.alarmed for d in a.decisions] == [d.alarmed for d in b.decisions]
    assert loaded.describe() == alarms.describe()

    other = Victim()
    other.weights_sha256 = "victim-b"
    with pytest.raises(ArtifactError, match="victim"):
        ClientAlarms.load(tmp_path / "alarms", {"brightness": detector, "contrast": Contrast()}, other)
    with pytest.raises(ArtifactError, match="calibrated for the detectors"):
        ClientAlarms.load(tmp_path / "alarms", {"brightness": detector}, victim)


class PerClient:
    def score(self, x):
        return torch.zeros(len(x))

    def observe(self, x, client):
        return torch.zeros(len(x))

    def reset(self, client):
        pass


@pytest.mark.parametrize("scorers, message", [
    ({"prada": PerClient()}, "per-client detector"),
    ({"bad": object()}, "score"),
])
def test_calibrate_refuses_unsuitable_scorers(scorers, message):
    with pytest.raises(ValueError, match=message):
        ClientAlarms.calibrate(Victim(), scorers, benign(100, seed=0))


def test_alarms_need_a_detector_in_the_guard(setup):
    victim, _, alarms = setup
    with pytest.raises(ValueError, match="need a detector"):
        Guard(victim, None, "monitor", alarms=alarms)


def test_proof_of_work_grows_with_the_evidence_after_the_alarm(setup):
    from sameguard.actions import ProofOfWork

    victim, detector, alarms = setup
    pow_ = ProofOfWork(benign_bits=6, bits_per_spread=1.0, max_bits=30, bits_per_decade=2.0)
    guard = Guard(victim, detector, pow_, alarms=alarms)
    guard.calibrate(benign(500, seed=8))
    verdicts = [guard.protect(suspicious(1, seed=200 + i), "mallory") for i in range(20)]
    alarmed = [v for v in verdicts if v.alarmed]
    assert alarmed, "the suspicious stream must be alarmed"
    for v in alarmed:
        d = v.decisions[0]
        assert d.work_bits >= min(30, math.ceil(6 + 2.0 * d.evidence - 1e-9))  # the alarm floor, capped
    bits = [v.decisions[0].work_bits for v in alarmed]
    assert bits[-1] >= bits[0]  # evidence keeps growing, so does the price


def test_alarm_only_policy_answers_every_query_until_the_alarm(setup):
    from sameguard.actions import Policy

    victim, detector, alarms = setup
    guard = Guard(victim, detector, Policy("reject", threshold=float("inf")), alarms=alarms)
    verdicts = [guard.protect(suspicious(1, seed=300 + i), "mallory") for i in range(20)]
    refused = [bool(v.refused.item()) for v in verdicts]
    alarmed = [v.decisions[0].alarmed for v in verdicts]
    assert any(alarmed)
    assert refused == alarmed  # nothing refused per query, everything after the alarm


class _OutputsScorer(Contrast):
    """A scorer that reads the victim's outputs the guard already has (``score_victim_outputs``, as MSP and
    Energy do): ``-max`` probability, as a list of Python floats; ``extra`` more values than asked when set."""

    def __init__(self, victim: Victim, extra: int = 0) -> None:
        self.victim, self.extra = victim, extra

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return -self.victim(x).max(1).values

    def score_victim_outputs(self, victim: object, x: torch.Tensor, probs: torch.Tensor) -> list[float] | None:
        return (-probs.max(1).values).tolist() + [0.0] * self.extra if victim is self.victim else None


@pytest.mark.parametrize("n", [1, 5])
def test_scores_read_from_the_victims_outputs_as_floats_and_checked(n):
    victim = Victim()
    calibration = benign(600, seed=1)
    alarms = ClientAlarms.calibrate(victim, {"brightness": Brightness(), "msp": _OutputsScorer(victim)}, calibration,
                                    delta=1e-3, min_class_size=20)
    # the same scores through score(x), a tensor: its victim is another (equal) one, so it declines the outputs
    twin = ClientAlarms.calibrate(victim, {"brightness": Brightness(), "msp": _OutputsScorer(Victim())}, calibration,
                                  delta=1e-3, min_class_size=20)
    x = suspicious(n, seed=4)
    a = alarms.update("c", x, victim(x))
    b = twin.update("c", x, victim(x))
    torch.testing.assert_close(a.evidence, b.evidence, rtol=1e-9, atol=1e-12)
    broken = ClientAlarms(alarms.monitor, {"brightness": Brightness(), "msp": _OutputsScorer(victim, extra=1)}, victim)
    with pytest.raises(ValueError, match=f"returned {n + 1} scores for {n} queries"):
        broken.update("d", x, victim(x))
