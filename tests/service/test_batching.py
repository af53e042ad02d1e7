"""Dynamic batching: concurrent requests share forward passes, and nothing else changes.

Per-request results equal unbatched ones within float tolerance (a real, tiny SAME detector and
victim), each client's accounting and decisions are its own, and a live service with batching
writes one audit row per query.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sameguard.guard import Guard
from sameguard.service.batching import DynamicBatcher, batch_guard, unbatch_guard


def _concurrently(fns):
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            barrier.wait(timeout=30)
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def _batched_rows(guard, owner, name, queries, clients):
    """Batch ``guard``, count the rows each call of ``owner.name`` gets while 8 requests of 2 images run
    concurrently (request ``i`` from ``clients[i]``), undo both; returns (verdicts, rows per call, batchers)."""
    rows = []
    method = getattr(owner, name)
    setattr(owner, name, lambda x, *a, **k: rows.append(int(x.shape[0])) or method(x, *a, **k))
    try:
        batchers = batch_guard(guard, max_batch=64, max_wait_s=0.1)
        try:
            got = _concurrently([lambda i=i: guard.protect(queries[2 * i:2 * i + 2], clients[i]) for i in range(8)])
        finally:
            unbatch_guard(guard)
    finally:
        delattr(owner, name)
    return got, rows, batchers


def test_batcher_merges_concurrent_calls_and_hands_each_its_rows():
    sizes = []

    def fn(x):
        sizes.append(int(x.shape[0]))
        return x.flatten(1).sum(1) * 2

    batcher = DynamicBatcher(fn, max_batch=64, max_wait_s=0.5)
    xs = [torch.full((i + 1, 3), float(i)) for i in range(6)]
    out = _concurrently([lambda x=x: batcher(x) for x in xs])
    for x, y in zip(xs, out):
        assert torch.equal(y, x.flatten(1).sum(1) * 2)
    assert sum(sizes) == 21 and len(sizes) < 6  # fewer forward passes than calls
    assert batcher.stats["calls"] == 6 and batcher.stats["images"] == 21


def test_batcher_runs_large_calls_alone_and_keeps_failures_their_own():
    calls = []

    def fn(x):
        calls.append(int(x.shape[0]))
        if (x < 0).any():
            raise ValueError("negative")
        return x.sum(1)

    batcher = DynamicBatcher(fn, max_batch=4, max_wait_s=0.3)
    assert torch.equal(batcher(torch.ones(4, 2)), torch.full((4,), 2.0))  # >= max_batch: at once
    assert calls == [4]
    good, bad = torch.ones(1, 2), -torch.ones(1, 2)
    barrier = threading.Barrier(2)
    outcome = {}

    def call(name, x):
        barrier.wait()
        try:
            outcome[name] = batcher(x)
        except ValueError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=call, args=a) for a in (("good", good), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(outcome["good"], torch.full((1,), 2.0))
    assert isinstance(outcome["bad"], ValueError)


def test_batched_guard_gives_each_request_its_unbatched_answer_and_accounting(tiny_victim, tiny_same, fmnist_small):
    images = fmnist_small[1].images[:24]
    plain = Guard(tiny_victim, tiny_same, "reject")
    expected = [plain.protect(images[3 * i:3 * i + 3], f"client{i % 3}") for i in range(8)]
    batched = Guard(tiny_victim, tiny_same, "reject")
    batchers = batch_guard(batched, max_batch=64, max_wait_s=0.2)
    try:
        got = _concurrently([lambda i=i: batched.protect(images[3 * i:3 * i + 3], f"client{i % 3}")
                             for i in range(8)])
    finally:
        unbatch_guard(batched)
    assert "logits" not in vars(tiny_victim) and "score" not in vars(tiny_same)
    assert set(batchers) == {"guard"}  # the victim and the detector together
    assert batchers["guard"].stats["batches"] < 8  # requests did share forward passes
    for e, g in zip(expected, got):
        assert torch.allclose(g.probabilities, e.probabilities, atol=1e-6)
        assert [d.score for d in g.decisions] == pytest.approx([d.score for d in e.decisions], abs=1e-5)
        assert g.refused.tolist() == e.refused.tolist()
        assert [(d.client, d.index, d.input_sha256, d.action) for d in g.decisions] == \
            [(d.client, d.index, d.input_sha256, d.action) for d in e.decisions]
    for c in ("client0", "client1", "client2"):
        assert batched.stats(c).queries == plain.stats(c).queries
        assert batched.queries_used(c) == plain.queries_used(c)


def test_live_service_with_batching_audits_every_query(make_app, kit):
    pytest.importorskip("fastapi")
    import httpx
    from sqlalchemy import func, select

    from sameguard.service.db import audit_log

    victim = kit.make_victim(seed=5)
    guard = Guard(victim, kit.FakeDetector(), "reject")
    batchers = batch_guard(guard, max_batch=32, max_wait_s=0.05)
    app, token = make_app(guard=guard, request_burst=1000, rate_burst=1000)
    x = torch.cat([kit.dark(6), kit.bright(6)])
    with kit.live(app) as url:
        def one(i):
            with httpx.Client(base_url=url, headers={"X-API-Key": token}, timeout=30) as c:
                r = c.post("/v1/predict", json={"instances": x[i:i + 1].tolist()})
                assert r.status_code == 200, r.text
                return r.json()

        answers = _concurrently([lambda i=i: one(i) for i in range(12)])
    expected = victim.predict_proba(x)
    for i, a in enumerate(answers):
        if i < 6:
            assert torch.allclose(torch.tensor(a["predictions"][0]), expected[i], atol=1e-6)
        else:
            assert a["predictions"] == [None] and a["refused"] == [0]
    assert batchers["guard"].stats["calls"] >= 12  # every request went through the batcher
    engine = app.state.sameguard.audit.engine
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_log)).scalar_one() == 12
        assert conn.execute(select(func.count(func.distinct(audit_log.c.request_id)))).scalar_one() == 12


def test_batcher_splits_tuples_and_runs_one_shared_call_at_a_time():
    running, peak, sizes = [0], [0], []
    lock = threading.Lock()

    def fn(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            sizes.append(int(x.shape[0]))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return x.sum(1), -x[:, 0]

    batcher = DynamicBatcher(fn, max_batch=64, max_wait_s=0.001)
    xs = [torch.full((1, 2), float(i)) for i in range(12)]
    got = _concurrently([lambda x=x: batcher(x) for x in xs])
    for i, (total, first) in enumerate(got):
        assert torch.equal(total, torch.tensor([2.0 * i])) and torch.equal(first, torch.tensor([-float(i)]))
    assert peak[0] == 1  # never two shared calls at once
    assert sum(sizes) == 12 and len(sizes) < 12  # calls that came during a run joined the next round


def test_joint_batching_runs_the_victim_once_per_image(tiny_victim, tiny_same, fmnist_small):
    images = fmnist_small[1].images[:16]
    guard = Guard(tiny_victim, tiny_same, "monitor", keep_decisions=0)
    got, rows, batchers = _batched_rows(guard, tiny_victim.model, "forward", images, ["c"] * 8)
    assert sum(rows) == 16  # the detector reused the victim's logits of the shared call
    assert batchers["guard"].stats == {"calls": 8, "batches": len(rows), "images": 16}
    plain = [Guard(tiny_victim, tiny_same, "monitor").protect(images[2 * i:2 * i + 2], "c") for i in range(8)]
    for g, e in zip(got, plain):
        assert [d.score for d in g.decisions] == pytest.approx([d.score for d in e.decisions], abs=1e-5)
    assert "logits" not in vars(tiny_victim) and "score" not in vars(tiny_same)
    # Outside a request the wrappers are plain calls: the detector scores on its own.
    expected = tiny_same.score(images[:3])
    batch_guard(guard, max_batch=64, max_wait_s=0.05)
    try:
        assert torch.allclose(tiny_same.score(images[:3]), expected, atol=1e-6)
    finally:
        unbatch_guard(guard)


def test_a_stateful_detector_leaves_only_the_victim_batched(tiny_victim):
    from sameguard.detectors import build_detector

    guard = Guard(tiny_victim, build_detector("prada").fit(tiny_victim), "monitor")
    batchers = batch_guard(guard, max_wait_s=0.01)
    try:
        assert set(batchers) == {"victim"} and "score" not in vars(guard.detector)
    finally:
        unbatch_guard(guard)
    assert "logits" not in vars(tiny_victim)


def test_joint_batching_with_alarms_runs_the_victim_once_per_image(tiny_victim, tiny_same, fmnist_small):
    from sameguard.alarms import ClientAlarms
    from sameguard.detectors import EnergyDetector, MSPDetector

    test = fmnist_small[1]
    scorers = {"same": tiny_same, "msp": MSPDetector().fit(tiny_victim), "energy": EnergyDetector().fit(tiny_victim)}
    alarms = ClientAlarms.calibrate(tiny_victim, scorers, test.images[:400], delta=1e-3, min_class_size=10, seed=0)
    guard = Guard(tiny_victim, tiny_same, "monitor", alarms=alarms)
    queries = test.images[400:416]
    got, rows, _ = _batched_rows(guard, tiny_victim.model, "forward", queries, [f"c{i}" for i in range(8)])
    assert sum(rows) == 16  # Energy read the request's rows of the shared call, not the victim again
    _assert_unbatched_evidence(got, tiny_victim, tiny_same, scorers, test.images[:400], queries)


def test_calls_queued_during_a_long_run_are_shared_in_rounds_of_at_most_max_batch():
    sizes = []
    started = threading.Event()

    def fn(x):
        sizes.append(int(x.shape[0]))
        started.set()
        time.sleep(0.2 if len(sizes) == 1 else 0.01)
        return x.sum(1)

    batcher = DynamicBatcher(fn, max_batch=4, max_wait_s=0.001)
    first = threading.Thread(target=batcher, args=(torch.ones(1, 2),))
    first.start()
    started.wait(5)  # the first shared call runs; 10 more calls of 1 image queue behind it
    got = _concurrently([lambda i=i: batcher(torch.full((1, 2), float(i))) for i in range(10)])
    first.join()
    assert [g.tolist() for g in got] == [[2.0 * i] for i in range(10)]
    assert sizes[0] == 1 and sum(sizes) == 11 and max(sizes) <= 4


def test_alarm_scorers_with_networks_of_their_own_join_the_shared_call(tiny_victim, tiny_same, fmnist_small):
    import copy

    from sameguard.alarms import ClientAlarms
    from sameguard.detectors import MSPDetector

    test = fmnist_small[1]
    s2 = copy.deepcopy(tiny_same)  # as `serve --alarms` loads a scorer from its own folder: networks of its own
    s2.alpha = 0.0
    s2.victim_ = tiny_victim
    scorers = {"same": tiny_same, "s2": s2, "msp": MSPDetector().fit(tiny_victim)}
    alarms = ClientAlarms.calibrate(tiny_victim, scorers, test.images[:400], delta=1e-3, min_class_size=10, seed=0)
    guard = Guard(tiny_victim, tiny_same, "monitor", alarms=alarms)
    queries = test.images[400:416]
    got, rows, batchers = _batched_rows(guard, s2.reconstructor_, "reconstruct", queries, [f"c{i}" for i in range(8)])
    assert "score" not in vars(s2) and "score" not in vars(scorers["msp"])
    assert sum(rows) == 16 and len(rows) == batchers["guard"].stats["batches"] < 8  # s2 ran in the shared calls
    _assert_unbatched_evidence(got, tiny_victim, tiny_same, scorers, test.images[:400], queries)


def _assert_unbatched_evidence(got, victim, detector, scorers, calibration, queries):
    """Each batched verdict's evidence is an unbatched guard's, with alarms calibrated alike."""
    from sameguard.alarms import ClientAlarms

    reference = ClientAlarms.calibrate(victim, scorers, calibration, delta=1e-3, min_class_size=10, seed=0)
    plain = Guard(victim, detector, "monitor", alarms=reference)
    for i, g in enumerate(got):
        e = plain.protect(queries[2 * i:2 * i + 2], f"c{i}")
        assert [d.evidence for d in g.decisions] == pytest.approx([d.evidence for d in e.decisions], abs=1e-6)
