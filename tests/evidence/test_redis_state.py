"""The per-client alarm state in Redis with appended rows (:class:`~sameguard.evidence.redis_state.RedisClientStates`),
against a real Redis: the same evidence and bag as in memory, whichever worker takes each query."""

from __future__ import annotations

import dataclasses
import multiprocessing

import pytest
import torch

from sameguard.evidence import ClientState, ConformalCalibrator, EvidenceMonitor, StreamExchangeabilityTest
from sameguard.evidence.store import StateFormatError

pytest.importorskip("redis")

_CTX = multiprocessing.get_context("fork")


def _calibrator() -> ConformalCalibrator:
    g = torch.Generator().manual_seed(0)
    return ConformalCalibrator(min_class_size=5).fit(torch.randn(400, generator=g),
                                                     torch.randint(0, 4, (400,), generator=g), 4)


def _monitor(store, window: int = 20, stream: bool = True) -> EvidenceMonitor:
    test = StreamExchangeabilityTest(window=window, pool_size=7) if stream else None
    return EvidenceMonitor({"s": _calibrator()}, stream=test, store=store, seed=3)


def _queries(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g), torch.randint(0, 4, (n,), generator=g),
            torch.rand(n, 1, 14, 14, generator=g) * 2 - 1)


def _space(server) -> str:
    """The heads' prefix, under the test's own prefix (the rows' default prefix, ``...alarms-rows:``, too)."""
    return server.prefix + "alarms:"


def _states(url: str, prefix: str, **kwargs):
    import redis

    from sameguard.evidence.redis_state import RedisClientStates

    return RedisClientStates(redis.Redis.from_url(url), prefix, **kwargs)


@pytest.mark.parametrize("cache_clients", [256, 0])
def test_two_workers_build_the_same_state_as_one_process_in_memory(redis_server, cache_clients):
    """Batches alternate between two stores over one Redis (each with its own copy of the rows), across
    window boundaries: evidence, bag, distances and counts equal the in-memory monitor's, exactly."""
    workers = [_monitor(_states(redis_server.url, _space(redis_server), cache_clients=cache_clients))
               for _ in range(2)]
    reference = _monitor(None)
    scores, labels, x = _queries(75)
    start = 0
    for i, size in enumerate([3, 1, 1, 1, 7, 16, 1, 30, 2, 13]):
        part = slice(start, start + size)
        got = workers[(i // 2) % 2].update("mallory", {"s": scores[part]}, labels[part], x[part])
        want = reference.update("mallory", {"s": scores[part]}, labels[part], x[part])
        assert got.queries == want.queries and got.log_evidence == want.log_evidence
        assert torch.equal(got.log_evidence_path, want.log_evidence_path)
        for worker in workers:
            mine, theirs = worker.store.get("mallory").stream, reference.store.get("mallory").stream
            assert torch.equal(mine.points, theirs.points) and torch.equal(mine.nn_dist, theirs.nn_dist)
            assert mine.seen == theirs.seen == start + size
        start += size
    assert start == 75 and workers[0].store.keys() == ["mallory"]  # the rows' key is not a client


def test_an_update_sends_the_new_rows_only(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    monitor = _monitor(_states(redis_server.url, _space(redis_server)), window=100)
    scores, labels, x = _queries(40)
    monitor.update("c", {"s": scores[:30]}, labels[:30], x[:30])
    rows_key = _space(redis_server)[:-1] + "-rows:c"
    assert client.strlen(rows_key) == 30 * 49 * 4  # 7x7 float32 features a query
    head = client.strlen(_space(redis_server) + "c")
    monitor.update("c", {"s": scores[30:31]}, labels[30:31], x[30:31])
    assert client.strlen(rows_key) == 31 * 49 * 4
    assert client.strlen(_space(redis_server) + "c") < head + 100  # one more distance, not the bag
    assert head < 30 * 49 * 4  # the head holds no rows


def test_forgetting_a_client_deletes_both_keys_and_a_new_life_starts_afresh(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    monitor = _monitor(_states(redis_server.url, _space(redis_server)))
    scores, labels, x = _queries(10)
    monitor.update("c", {"s": scores[:6]}, labels[:6], x[:6])
    assert monitor.forget("c") and not monitor.forget("c")
    assert list(client.scan_iter(match=_space(redis_server)[:-1] + "*")) == []
    ev = monitor.update("c", {"s": scores[6:]}, labels[6:], x[6:])  # this process's old copy must not be reused
    fresh = _monitor(None).update("c", {"s": scores[6:]}, labels[6:], x[6:])
    assert ev.queries == 4 and ev.log_evidence == fresh.log_evidence
    assert torch.equal(monitor.store.get("c").stream.points, _monitor(None).stream.features(x[6:]))


def test_a_state_stored_whole_by_an_older_version_is_read_and_rewritten(redis_server):
    import redis

    from sameguard.evidence.redis_store import RedisStore

    client = redis.Redis.from_url(redis_server.url)
    old = _monitor(RedisStore(client, _space(redis_server), ClientState.to_bytes, ClientState.from_bytes))
    scores, labels, x = _queries(12)
    old.update("c", {"s": scores[:8]}, labels[:8], x[:8])
    new = _monitor(_states(redis_server.url, _space(redis_server)))
    assert new.evidence("c").queries == 8
    ev = new.update("c", {"s": scores[8:]}, labels[8:], x[8:])
    assert ev.log_evidence == _monitor(None).update("c", {"s": scores}, labels, x).log_evidence
    assert client.get(_space(redis_server) + "c").startswith(b"SGH1")


def test_states_without_a_stream_test_and_clearing_an_alarm(redis_server):
    monitor = _monitor(_states(redis_server.url, _space(redis_server)), stream=False)
    scores, labels, _ = _queries(5)
    monitor.update("c", {"s": scores}, labels, None)
    assert monitor.evidence("c").queries == 5 and monitor.store.get("c").stream is None
    streamed = _monitor(_states(redis_server.url, redis_server.prefix + "other:"))
    scores, labels, x = _queries(5)
    streamed.update("c", {"s": scores}, labels, x)
    before = streamed.store.get("c").stream
    assert streamed.clear_alarm("c")  # keeps the bag and the count
    after = streamed.store.get("c").stream
    assert torch.equal(before.points, after.points) and after.seen == 5


def test_a_corrupted_rows_value_is_refused(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    store = _states(redis_server.url, _space(redis_server), cache_clients=0)
    monitor = _monitor(store)
    scores, labels, x = _queries(4)
    monitor.update("c", {"s": scores}, labels, x)
    client.set(_space(redis_server)[:-1] + "-rows:c", b"\x00" * 10)
    with pytest.raises(StateFormatError, match="rows"):
        store.get("c")
    client.set(_space(redis_server) + "c", b"SGH1garbage")
    with pytest.raises(StateFormatError):
        store.get("c")


def test_bad_settings_are_refused(redis_server):
    with pytest.raises(ValueError, match="prefix"):
        _states(redis_server.url, "")
    with pytest.raises(ValueError, match="rows_prefix"):
        _states(redis_server.url, "a:", rows_prefix="a:rows:")
    with pytest.raises(ValueError, match="cache_clients"):
        _states(redis_server.url, "a:", cache_clients=-1)


def _race(url, prefix, seed, n, out):
    monitor = _monitor(_states(url, prefix))
    scores, labels, x = _queries(n, seed)
    for i in range(n):
        monitor.update("shared", {"s": scores[i:i + 1]}, labels[i:i + 1], x[i:i + 1])
    out.put(n)


def test_concurrent_processes_lose_no_query_and_keep_a_consistent_bag(redis_server):
    n, procs = 15, 3
    out = _CTX.Queue()
    workers = [_CTX.Process(target=_race, args=(redis_server.url, _space(redis_server), seed, n, out))
               for seed in range(procs)]
    for w in workers:
        w.start()
    assert sum(out.get(timeout=120) for _ in workers) == n * procs
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    state = _monitor(_states(redis_server.url, _space(redis_server))).store.get("shared")
    assert state.queries == n * procs and state.stream.seen == n * procs
    rows = state.stream.points.shape[0]
    assert rows == (n * procs) % 20 or rows == 20  # the current block of the window of 20
    # the stored distances are the bag's own nearest-neighbour distances
    d = torch.cdist(state.stream.points.double(), state.stream.points.double())
    d.fill_diagonal_(float("inf"))
    assert torch.allclose(state.stream.nn_dist, d.min(dim=1).values, rtol=1e-9)


def test_an_update_that_loses_the_race_reads_again_and_keeps_both_writes(redis_server):
    """Another worker writes between this update's read and its compare-and-set: the write is refused,
    ``fn`` runs again on the new state, and neither query is lost."""
    first, second = (_states(redis_server.url, _space(redis_server)) for _ in range(2))
    start = ClientState(queries=0, martingales={"s": torch.zeros(3, dtype=torch.float64)})
    first.put("c", start)
    calls = []

    def add_one(old):
        calls.append(old.queries)
        if len(calls) == 1:  # the other worker's update lands in between
            second.update("c", lambda state: dataclasses.replace(state, queries=state.queries + 10))
        return dataclasses.replace(old, queries=old.queries + 1)

    assert first.update("c", add_one).queries == 11
    assert calls == [0, 10] and second.get("c").queries == 11
