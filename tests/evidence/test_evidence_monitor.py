"""The per-client monitor: combination by average, latched alarms at the exact query, operator actions."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import pytest
import torch

from sameguard.api import ArtifactError, NotFittedError
from sameguard.evidence import (
    ClientState,
    ConformalCalibrator,
    EvidenceMonitor,
    InMemoryStore,
    MixtureMartingale,
    StreamExchangeabilityTest,
)

logger = logging.getLogger(__name__)

ATTACK, BENIGN = 1000.0, -1.0  # against calibration scores 0..98: p = 1/100 (bet 5) and p = 1 (bet 0.5)


def _calibrator(smoothed: bool = False) -> ConformalCalibrator:
    return ConformalCalibrator(smoothed=smoothed).fit(torch.arange(99.0), None, num_classes=10)


def _monitor(names=("a",), **kwargs) -> EvidenceMonitor:
    kwargs.setdefault("martingale", MixtureMartingale([0.5]))
    return EvidenceMonitor({name: _calibrator() for name in names}, **kwargs)


def _batch(**scores: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    n = len(next(iter(scores.values())))
    return {name: torch.tensor(values) for name, values in scores.items()}, torch.zeros(n, dtype=torch.int64)


def test_two_detectors_are_averaged():
    monitor = _monitor(("a", "b"))
    evidence = monitor.update("alice", *_batch(a=[ATTACK, ATTACK], b=[BENIGN, BENIGN]))
    # a: 5 then 25; b: 0.5 then 0.25; the evidence is their average
    torch.testing.assert_close(evidence.log_evidence_path,
                               torch.tensor([math.log(2.75), math.log(12.625)], dtype=torch.float64))
    assert evidence.per_detector == pytest.approx({"a": math.log(25), "b": math.log(0.25)})
    assert evidence.log_evidence == pytest.approx(math.log(12.625))
    assert (evidence.client, evidence.queries, evidence.alarmed) == ("alice", 2, False)
    again = monitor.evidence("alice")
    assert again.log_evidence == pytest.approx(evidence.log_evidence)
    assert again.per_detector == pytest.approx(evidence.per_detector)
    assert again.log_evidence_path.shape == (0,)


def test_alarm_query_is_exact_and_the_alarm_latches():
    """5 benign queries (x0.5 each), then attacks (x5 each): log M = -5 log 2 + k log 5 first reaches
    log 1000 at k = 7, i.e. at query 12, which arrives in the third batch of four."""
    k = math.ceil((math.log(1000) + 5 * math.log(2)) / math.log(5))
    assert 5 + k == 12
    monitor = _monitor(delta=1e-3)
    stream = [BENIGN] * 5 + [ATTACK] * 11 + [BENIGN] * 20
    before = time.time()
    results = [monitor.update("mallory", *_batch(a=stream[i:i + 4])) for i in range(0, len(stream), 4)]
    assert [r.alarmed for r in results] == [False, False] + [True] * 7
    assert {r.alarm_query for r in results[2:]} == {12}
    assert before <= results[2].alarm_time <= time.time()
    assert len({r.alarm_time for r in results[2:]}) == 1
    assert results[2].log_evidence_path[3].item() >= monitor.threshold_log > results[2].log_evidence_path[2].item()
    assert results[-1].log_evidence < monitor.threshold_log  # the evidence fell, the alarm stays
    assert results[-1].queries == 36


def test_forget():
    monitor = _monitor()
    monitor.update("alice", *_batch(a=[BENIGN]))
    monitor.update("bob", *_batch(a=[ATTACK]))
    assert sorted(monitor.clients()) == ["alice", "bob"]
    assert monitor.forget("alice") is True
    assert monitor.forget("alice") is False
    assert monitor.clients() == ["bob"]
    assert monitor.evidence("alice") is None
    assert monitor.update("alice", *_batch(a=[BENIGN])).queries == 1


def test_clear_alarm_restarts_the_martingales():
    monitor = _monitor(delta=0.1)
    first = monitor.update("mallory", *_batch(a=[ATTACK] * 3))
    assert first.alarm_query == 2  # 5 < 10 <= 25
    assert monitor.clear_alarm("mallory") is True
    cleared = monitor.evidence("mallory")
    assert (cleared.alarmed, cleared.alarm_query, cleared.alarm_time, cleared.queries) == (False, None, None, 3)
    assert cleared.log_evidence == pytest.approx(0.0)
    again = monitor.update("mallory", *_batch(a=[BENIGN, ATTACK, ATTACK, ATTACK]))
    assert again.alarm_query == 3 + 3  # 0.5, 2.5, 12.5: crosses 10 at the 3rd query of this batch
    assert monitor.clear_alarm("nobody") is False
    assert "nobody" not in monitor.clients()


def test_same_seed_same_evidence_and_another_seed_differs():
    def run(seed: int) -> torch.Tensor:
        monitor = EvidenceMonitor({"a": _calibrator(smoothed=True)}, seed=seed)
        paths = [monitor.update(client, *_batch(a=[5.0, 50.0, 97.0])).log_evidence_path
                 for client in ("alice", "bob", "alice")]
        return torch.cat(paths)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))


def test_stream_test_is_one_more_martingale_in_the_average():
    monitor = _monitor(stream=StreamExchangeabilityTest(window=100))
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    evidence = monitor.update("alice", *_batch(a=[ATTACK] * 6), x=x)
    assert set(evidence.per_detector) == {"a", "stream"}
    per = torch.tensor(list(evidence.per_detector.values()), dtype=torch.float64)
    assert evidence.log_evidence == pytest.approx(float(torch.logsumexp(per, 0) - math.log(2)))
    assert evidence.per_detector["a"] == pytest.approx(6 * math.log(5))
    stored = monitor.store.get("alice")
    assert stored.stream.seen == 6 and stored.stream.points.shape == (6, 4)


class BytesStore:
    """A store that keeps only bytes, as a Redis store would."""

    def __init__(self) -> None:
        self.inner: InMemoryStore[bytes] = InMemoryStore()

    def get(self, key: str) -> ClientState | None:
        data = self.inner.get(key)
        return None if data is None else ClientState.from_bytes(data)

    def put(self, key: str, value: ClientState) -> None:
        self.inner.put(key, value.to_bytes())

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def keys(self) -> list[str]:
        return self.inner.keys()

    def update(self, key: str, fn: Callable[[ClientState | None], ClientState]) -> ClientState:
        def on_bytes(data: bytes | None) -> bytes:
            return fn(None if data is None else ClientState.from_bytes(data)).to_bytes()
        return ClientState.from_bytes(self.inner.update(key, on_bytes))


def test_a_store_of_bytes_gives_the_same_evidence():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 1, 3, 3, generator=g), [float(v) for v in torch.randint(0, 120, (5,), generator=g)])
               for _ in range(4)]
    results = []
    for store in (None, BytesStore()):
        monitor = EvidenceMonitor({"a": _calibrator(smoothed=True)}, store=store, delta=0.01,
                                  stream=StreamExchangeabilityTest(window=8))
        results.append([monitor.update("c", *_batch(a=s), x=x) for x, s in batches])
    for mem, byt in zip(*results, strict=True):
        torch.testing.assert_close(byt.log_evidence_path, mem.log_evidence_path, rtol=0, atol=0)
        assert (byt.alarm_query, byt.queries) == (mem.alarm_query, mem.queries)


def test_concurrent_updates_of_one_client_lose_nothing():
    monitor = _monitor()

    def work() -> None:
        for _ in range(50):
            monitor.update("shared", *_batch(a=[BENIGN, BENIGN]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    evidence = monitor.evidence("shared")
    assert evidence.queries == 400
    assert evidence.log_evidence == pytest.approx(400 * math.log(0.5))


def test_benign_clients_false_alarm_rate():
    """Benign scores exchangeable with the calibration (one fixed set of 2000): few clients alarmed."""
    g = torch.Generator().manual_seed(2)
    calibrator = ConformalCalibrator().fit(torch.randn(2000, generator=g), torch.randint(0, 4, (2000,), generator=g), 4)
    delta, clients = 0.05, 300
    monitor = EvidenceMonitor({"same": calibrator}, delta=delta)
    for i in range(clients):
        monitor.update(f"client-{i}", {"same": torch.randn(100, generator=g)}, torch.randint(0, 4, (100,), generator=g))
    alarmed = sum(monitor.evidence(c).alarmed for c in monitor.clients())
    logger.info("Benign clients alarmed through the monitor at delta=0.05: %d of %d", alarmed, clients)
    assert alarmed <= clients * delta + 3 * math.sqrt(clients * delta * (1 - delta))


def test_monitor_from_saved_calibrators(tmp_path):
    _calibrator().save(tmp_path / "a", detector_sha256="1" * 64, victim_sha256="2" * 64)
    loaded = ConformalCalibrator.load(tmp_path / "a", detector_sha256="1" * 64, victim_sha256="2" * 64)
    monitor = EvidenceMonitor({"a": loaded}, martingale=MixtureMartingale([0.5]))
    assert monitor.update("c", *_batch(a=[ATTACK])).log_evidence == pytest.approx(math.log(5))
    with pytest.raises(ArtifactError, match="victim"):
        ConformalCalibrator.load(tmp_path / "a", detector_sha256="1" * 64, victim_sha256="3" * 64)


@pytest.mark.parametrize(("scores", "labels", "x", "message"), [
    ({"b": torch.ones(2)}, torch.zeros(2, dtype=torch.int64), None, "exactly"),
    ({"a": torch.ones(3)}, torch.zeros(2, dtype=torch.int64), None, r"shape \(2,\)"),
    ({"a": torch.ones(0)}, torch.zeros(0, dtype=torch.int64), None, "non-empty"),
    ({"a": torch.ones(2)}, torch.zeros(2, dtype=torch.int64), torch.zeros(3, 1, 2, 2), "images"),
])
def test_update_validation(scores, labels, x, message):
    monitor = _monitor(stream=StreamExchangeabilityTest()) if message == "images" else _monitor()
    with pytest.raises(ValueError, match=message):
        monitor.update("c", scores, labels, x=x)
    with pytest.raises(ValueError, match="client"):
        _monitor().update("", {"a": torch.ones(1)}, torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize(("build", "error", "message"), [
    (lambda: EvidenceMonitor({}), ValueError, "at least one"),
    (lambda: EvidenceMonitor({"a": _calibrator()}, delta=1.0), ValueError, "delta"),
    (lambda: EvidenceMonitor({"a": _calibrator()}, delta=0.0), ValueError, "delta"),
    (lambda: EvidenceMonitor({"stream": _calibrator()}, stream=StreamExchangeabilityTest()), ValueError, "reserved"),
    (lambda: EvidenceMonitor({"a": ConformalCalibrator()}), NotFittedError, "not fitted"),
    (lambda: EvidenceMonitor({"a": "calibrator"}), ValueError, "ConformalCalibrator"),
    (lambda: EvidenceMonitor({"a": _calibrator()}, seed=-1), ValueError, "seed"),
])
def test_constructor_validation(build, error, message):
    with pytest.raises(error, match=message):
        build()
