"""The guard: decisions per query, the PredictionAPI contract, actions through it, attacks in process."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sameguard.actions import Misinformation, Policy, ProofOfWork
from sameguard.data import ImageDataset
from sameguard.guard import Decision, Guard, QueryRefusedError, input_digests
from sameguard.prediction_api import BudgetExceededError, PredictionAPI


def test_service_guard_records_one_decision_per_query(victim, detector, kit):
    guard = Guard(victim, detector, "monitor")
    x = torch.cat([kit.dark(2), kit.bright(1)])
    verdict = guard.protect(x, "alice", request_id="req-1")
    assert isinstance(guard, PredictionAPI)
    assert guard.decisions("alice") == list(verdict.decisions)
    d = verdict.decisions
    assert [type(e) for e in d] == [Decision] * 3
    assert [e.flagged for e in d] == [False, False, True] and [e.action for e in d] == ["allow"] * 3
    assert [e.index for e in d] == [0, 1, 2] and {e.request_id for e in d} == {"req-1"}
    assert all(e.client == "alice" and e.threshold == 0.0 for e in d)
    assert [e.score for e in d] == pytest.approx(x.flatten(1).mean(1).tolist())
    header = b"float32le:1:28:28:"
    assert d[0].input_sha256 == hashlib.sha256(header + x[0].numpy().astype("<f4").tobytes()).hexdigest()
    assert input_digests(x) == [e.input_sha256 for e in d]
    torch.testing.assert_close(verdict.probabilities, victim.predict_proba(x))  # monitor: unchanged
    assert guard.queries_used("alice") == 3 and guard.stats("alice").flagged == 1
    assert guard.versions["victim_sha256"] == victim.weights_sha256 and guard.versions["policy"] == "monitor"


def test_service_guard_counts_nothing_when_the_detector_fails(victim, kit):
    class Broken(kit.FakeDetector):
        def score(self, x):
            raise OSError("scoring failed")

    guard = Guard(victim, Broken(), "monitor", budget=5)
    with pytest.raises(OSError):
        guard.query(kit.dark(2), "alice")
    assert guard.queries_used("alice") == 0
    assert guard.decisions() == []
    assert guard.remaining("alice") == 5


def test_service_guard_reject_through_the_prediction_api(victim, detector, kit):
    guard = Guard(victim, detector, "reject")
    x = torch.cat([kit.dark(1), kit.bright(1)])
    answers = guard.query(x, "eve")
    torch.testing.assert_close(answers[0], victim.predict_proba(x[:1])[0])  # another batching: tolerance
    assert torch.equal(answers[1], torch.full((10,), 0.1))  # refused: exactly no information
    assert guard.stats("eve").actions == {"allow": 1, "reject": 1}
    labels = Guard(victim, detector, "reject", output="labels").query(x, "eve")
    assert labels.dtype == torch.int64 and labels.shape == (2,) and 0 <= int(labels[1]) < 10
    strict = Guard(victim, detector, "reject", refusal="raise")
    with pytest.raises(QueryRefusedError) as info:
        strict.query(x, "eve")
    assert info.value.verdict.refused.tolist() == [False, True]


def test_service_guard_misinformation_only_touches_flagged_queries(victim, detector, kit):
    guard = Guard(victim, detector, Policy(Misinformation()))
    x = torch.cat([kit.dark(3), kit.bright(3)])
    truth = victim.predict_proba(x)
    answers = guard.query(x, "eve")
    torch.testing.assert_close(answers[:3], truth[:3])
    assert (answers[3:].argmax(1) == truth[3:].argmin(1)).all()
    assert torch.allclose(answers.sum(1), torch.ones(6), atol=1e-6)


def test_service_guard_pow_is_calibrated_and_billed(victim, kit):
    pow_ = ProofOfWork(benign_bits=6, bits_per_spread=4, max_bits=20)
    guard = Guard(victim, kit.FakeDetector(), pow_)
    guard.calibrate(kit.dark(200, seed=5))
    assert pow_.is_calibrated()
    cheap = guard.protect(kit.dark(1, seed=9), "user")
    costly = guard.protect(kit.bright(1), "thief")
    assert cheap.work_bits <= 6 < costly.work_bits <= 20
    assert guard.stats("thief").expected_hashes == 2.0 ** costly.work_bits
    assert {d.action for d in costly.decisions} == {"pow"}


def test_service_guard_budget_and_validation(victim, detector, kit):
    guard = Guard(victim, detector, "monitor", budget=3)
    guard.query(kit.dark(2), "alice")
    with pytest.raises(BudgetExceededError):
        guard.query(kit.dark(2), "alice")
    assert guard.remaining("alice") == 1
    with pytest.raises(ValueError, match="NaN"):
        guard.query(torch.full((1, 1, 28, 28), float("nan")), "alice")
    with pytest.raises(ValueError, match="shape"):
        guard.query(torch.zeros(1, 3, 28, 28), "alice")
    with pytest.raises(ValueError, match="need a detector"):
        Guard(victim, None, "reject")
    with pytest.raises(ValueError, match="no threshold"):
        Guard(victim, kit.FakeDetector(threshold=None), "reject").query(kit.dark(1), "a")


def test_service_guard_runs_an_attack_in_process(victim, detector, kit):
    from sameguard.attacks import KnockoffNets

    g = torch.Generator().manual_seed(0)
    pool = ImageDataset("pool", "train", torch.rand(80, 1, 28, 28, generator=g) * 2 - 1,
                        torch.zeros(80, dtype=torch.int64), tuple(str(i) for i in range(10)), False)
    guard = Guard(victim, detector, "misinformation")
    result = KnockoffNets(pool, epochs=1, batch_size=32, query_batch_size=16, seed=0, progress=False).run(guard, 64)
    assert result.queries == 64 and guard.queries_used(result.client) == 64
    stats = guard.stats(result.client)
    assert stats.queries == 64 and sum(stats.actions.values()) == 64
    assert len(guard.scores(result.client)) == 64
