"""The service's state store, in memory and in a real Redis: rate limits, challenges, revocation, values.

The Redis tests need a Redis server (skipped without one, failing under ``CI=true``); each uses its
own key prefix. Atomicity is tested with several processes racing on one Redis.
"""

from __future__ import annotations

import math
import multiprocessing
import time

import pytest

pytest.importorskip("limits")

from sameguard.evidence import InMemoryStore, StateStore
from sameguard.service.store import (
    TOO_MANY_CLIENT,
    TOO_MANY_SERVER,
    MemoryServiceStore,
    RateLimit,
    RedisServiceStore,
    open_store,
)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryServiceStore()
        return
    server = request.getfixturevalue("redis_server")
    s = RedisServiceStore(server.url, prefix=server.prefix)
    yield s
    s.close()


def test_rate_limit_grants_the_burst_then_refuses_with_a_wait(store):
    limit = RateLimit("img", rate=5, burst=10)  # 10 per 2 s
    assert store.hit(limit, "alice", 6) == 0
    assert store.hit(limit, "alice", 4) == 0
    wait = store.hit(limit, "alice", 1)
    assert 0 < wait <= 2.5
    assert store.hit(limit, "bob", 10) == 0  # per client
    assert store.hit(limit, "bob", 11) == math.inf  # over the burst: never


def test_rate_limit_refills(store):
    limit = RateLimit("req", rate=2, burst=2)  # 2 per 1 s window
    assert store.hit(limit, "alice", 2) == 0
    assert store.hit(limit, "alice", 1) > 0
    time.sleep(2.05)  # the sliding window has moved on entirely
    assert store.hit(limit, "alice", 2) == 0


def test_challenges_are_held_with_caps_and_taken_once(store):
    now = time.time()
    exp = int(now) + 60
    assert store.hold_challenge("c1", "alice", exp, {"a": 1}, now=now, max_per_client=2, max_total=3) is None
    assert store.hold_challenge("c2", "alice", exp, {"a": 2}, now=now, max_per_client=2, max_total=3) is None
    assert store.hold_challenge("c3", "alice", exp, {}, now=now, max_per_client=2, max_total=3) == TOO_MANY_CLIENT
    assert store.hold_challenge("c4", "bob", exp, {}, now=now, max_per_client=2, max_total=3) is None
    assert store.hold_challenge("c5", "carol", exp, {}, now=now, max_per_client=2, max_total=3) == TOO_MANY_SERVER
    assert store.pending_challenges(now) == 3
    assert store.challenge_state("c1") == "held"
    outcome, value = store.take_challenge("c1", "alice", exp)
    assert outcome == "taken"
    assert value == {"a": 1}
    assert store.take_challenge("c1", "alice", exp) == ("redeemed", None)
    assert store.challenge_state("c1") == "redeemed"
    assert store.take_challenge("nope", "alice", exp) == ("unknown", None)
    assert store.challenge_state("nope") == "unknown"
    # Redeeming freed alice's slot.
    assert store.hold_challenge("c6", "alice", exp, {}, now=now, max_per_client=2, max_total=4) is None
    store.drop_challenge("c6", "alice")
    assert store.challenge_state("c6") == "unknown"
    assert store.pending_challenges(now) == 2


def test_expired_challenges_free_their_slots(store):
    now = time.time()
    assert store.hold_challenge("old", "alice", int(now) + 5, {}, now=now, max_per_client=1, max_total=10) is None
    assert store.hold_challenge("x", "alice", int(now) + 5, {}, now=now, max_per_client=1, max_total=10) \
        == TOO_MANY_CLIENT
    later = now + 10
    assert store.pending_challenges(later) == 0
    assert store.hold_challenge("new", "alice", int(later) + 5, {}, now=later, max_per_client=1, max_total=10) is None


def test_revocation(store):
    assert not store.is_revoked("0123456789abcdef")
    store.revoke_keys(["0123456789abcdef"])
    assert store.is_revoked("0123456789abcdef")
    assert not store.is_revoked("fedcba9876543210")


def test_kv_is_a_state_store(store):
    kv = store.kv("counts", lambda v: str(v).encode(), lambda b: int(b))
    assert isinstance(kv, StateStore)
    assert kv.get("a") is None
    kv.put("a", 1)
    assert kv.update("a", lambda old: old + 1) == 2
    assert kv.update("b", lambda old: 10 if old is None else old) == 10
    assert sorted(kv.keys()) == ["a", "b"]
    assert kv.delete("a") is True and kv.delete("a") is False
    assert kv.get("b") == 10


def test_open_store_picks_by_url_and_says_what_is_wrong():
    assert isinstance(open_store(None), MemoryServiceStore)
    assert isinstance(open_store("memory://"), MemoryServiceStore)
    with pytest.raises(ValueError, match="Unknown state store"):
        open_store("mysql://x")
    with pytest.raises(ValueError, match="Cannot reach the Redis state store redis://u:\\*\\*\\*@127.0.0.1:1/0"):
        open_store("redis://u:secret@127.0.0.1:1/0")


def test_in_memory_kv_is_the_evidence_in_memory_store():
    assert isinstance(MemoryServiceStore().kv("alarms", bytes, bytes), InMemoryStore)


# ---------------------------------------------------------------------- across processes (Redis)
_CTX = multiprocessing.get_context("fork")


def _race_take(url, prefix, start, out):
    store = RedisServiceStore(url, prefix=prefix)
    while time.time() < start:
        pass
    out.put(store.take_challenge("shared", "alice", int(start) + 60)[0])


def _race_hits(url, prefix, start, n, out):
    store = RedisServiceStore(url, prefix=prefix)
    limit = RateLimit("img", rate=1, burst=60)
    while time.time() < start:
        pass
    out.put(sum(store.hit(limit, "alice", 1) == 0 for _ in range(n)))


def _race_increments(url, prefix, n, out):
    store = RedisServiceStore(url, prefix=prefix)
    kv = store.kv("counts", lambda v: str(v).encode(), lambda b: int(b))
    for _ in range(n):
        kv.update("alice", lambda old: (old or 0) + 1)
    out.put(n)


def _run(target, args_list):
    out = _CTX.Queue()
    procs = [_CTX.Process(target=target, args=(*args, out)) for args in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_redis_a_challenge_is_taken_by_exactly_one_of_many_processes(redis_server):
    store = RedisServiceStore(redis_server.url, prefix=redis_server.prefix)
    now = time.time()
    assert store.hold_challenge("shared", "alice", int(now) + 60, {"answer": 1}, now=now, max_per_client=5,
                                max_total=10) is None
    start = time.time() + 0.5
    results = _run(_race_take, [(redis_server.url, redis_server.prefix, start)] * 8)
    assert sorted(results) == ["redeemed"] * 7 + ["taken"]
    assert store.pending_challenges(time.time()) == 0


def test_redis_a_burst_holds_across_processes(redis_server):
    start = time.time() + 0.5
    granted = _run(_race_hits, [(redis_server.url, redis_server.prefix, start, 40)] * 4)
    assert sum(granted) == 60  # 4 processes x 40 hits against a burst of 60


def test_redis_value_updates_are_atomic_across_processes(redis_server):
    _run(_race_increments, [(redis_server.url, redis_server.prefix, 50)] * 4)
    store = RedisServiceStore(redis_server.url, prefix=redis_server.prefix)
    assert store.kv("counts", lambda v: str(v).encode(), lambda b: int(b)).get("alice") == 200


def test_remaining_looks_without_charging(store):
    limit = RateLimit("img", rate=1, burst=5)
    assert store.remaining(limit, "alice") == 5
    assert store.hit(limit, "alice", 3) == 0
    assert store.remaining(limit, "alice") == 2
    assert store.remaining(limit, "alice") == 2


def test_redis_holds_the_per_client_alarm_state_for_every_worker(redis_server, victim, kit):
    """Two workers' alarms over one Redis: evidence gathered by one is seen, and continued, by the other."""
    from sameguard.alarms import ClientAlarms
    from sameguard.evidence.redis_state import RedisClientStates

    detector = kit.FakeDetector(threshold=2.0)
    benign = kit.dark(600, seed=3)

    def worker_alarms():
        kv = RedisServiceStore(redis_server.url, prefix=redis_server.prefix).client_states()
        return ClientAlarms.calibrate(victim, {"fake": detector}, benign, delta=1e-3, stream=True, store=kv)

    first, second = worker_alarms(), worker_alarms()
    x = kit.bright(6, seed=7)
    probs = victim.predict_proba(x)
    first.update("mallory", x[:3], probs[:3])
    seen = second.evidence("mallory")
    assert seen is not None and seen.queries == 3
    second.update("mallory", x[3:], probs[3:])
    assert first.evidence("mallory").queries == 6
    assert first.evidence("mallory").log_evidence == pytest.approx(second.evidence("mallory").log_evidence)
    assert sorted(first.monitor.clients()) == ["mallory"]
    assert isinstance(first.monitor.store, RedisClientStates)  # the layout that appends each query's rows
    assert first.monitor.store.get("mallory").stream.seen == 6
    assert isinstance(MemoryServiceStore().client_states(), InMemoryStore)


def test_redis_alarm_ledger_records_each_alarm_once_across_workers(redis_server, victim, kit):
    from types import SimpleNamespace

    from sameguard.service.alarm_log import AlarmLedger, ledger_store

    evidence = SimpleNamespace(alarm_time=1000.0, alarm_query=7)
    alarms = SimpleNamespace(evidence=lambda client: evidence)
    decision = SimpleNamespace(alarmed=True, time=1000.0, evidence=3.5)
    ledgers = [AlarmLedger(ledger_store(RedisServiceStore(redis_server.url, prefix=redis_server.prefix)))
               for _ in range(2)]
    events = [ledger.raised(alarms, "mallory", [decision], f"req{i}") for i, ledger in enumerate(ledgers)]
    assert [e is not None for e in events] == [True, False]  # the second worker sees it recorded
    assert ledgers[1].get("mallory").queries == 7
    ledgers[1].cleared("mallory")
    evidence.alarm_time = 2000.0  # a new alarm after the clearing is recorded afresh, once
    assert ledgers[1].raised(alarms, "mallory", [decision], "req3") is not None
    assert ledgers[0].raised(alarms, "mallory", [decision], "req4") is None
