"""Group commit: concurrent writers share a transaction, each waits for its own, failures stay their own."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from sameguard.service.group_commit import GroupCommit


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_one_caller_writes_its_item_at_once():
    calls = []
    group = GroupCommit(calls.append)
    group.submit("a")
    group.submit("b")
    assert calls == [["a"], ["b"]] and group.stats == {"items": 2, "writes": 2} and group.pending == 0


def test_callers_that_arrive_during_a_write_share_the_next_one_and_return_after_it():
    calls: list[list[int]] = []
    release = threading.Event()
    group: GroupCommit[int] = GroupCommit(lambda items: (calls.append(list(items)), items == [0] and release.wait(10)))
    first = threading.Thread(target=group.submit, args=(0,))
    first.start()
    _wait_until(lambda: calls == [[0]])  # the first write holds the writer lock
    returned: list[int] = []
    others = [threading.Thread(target=lambda i=i: (group.submit(i), returned.append(i))) for i in range(1, 9)]
    for t in others:
        t.start()
    _wait_until(lambda: group.pending == 8)
    assert returned == []  # nobody returns before the write holding its item
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert calls[0] == [0] and sorted(calls[1]) == list(range(1, 9)) and len(calls) == 2
    assert sorted(returned) == list(range(1, 9)) and group.stats == {"items": 9, "writes": 2}


def test_a_failing_item_fails_its_caller_only_and_the_others_are_written_once():
    written: list[str] = []
    release = threading.Event()

    def write(items):
        if items == ["hold"]:
            release.wait(10)
        if "bad" in items:
            raise ValueError("constraint violated")
        written.extend(items)

    group: GroupCommit[str] = GroupCommit(write)
    holder = threading.Thread(target=group.submit, args=("hold",))
    holder.start()
    _wait_until(lambda: group.stats["writes"] == 1)
    errors: dict[str, BaseException | None] = {}

    def submit(item: str) -> None:
        try:
            group.submit(item)
            errors[item] = None
        except ValueError as exc:
            errors[item] = exc

    threads = [threading.Thread(target=submit, args=(item,)) for item in ("g1", "bad", "g2", "g3")]
    for t in threads:
        t.start()
    _wait_until(lambda: group.pending == 4)
    release.set()
    for t in [holder, *threads]:
        t.join(10)
    assert isinstance(errors.pop("bad"), ValueError) and set(errors.values()) == {None}
    assert sorted(written) == ["g1", "g2", "g3", "hold"]  # each good item exactly once


def test_a_database_that_is_down_fails_every_caller():
    def write(items):
        raise ConnectionError("down")

    group = GroupCommit(write)
    failures = []

    def submit(i):
        try:
            group.submit(i)
        except ConnectionError:
            failures.append(i)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(failures) == list(range(6))


def test_audit_log_appends_from_many_threads_lose_nothing_and_a_duplicate_fails_alone(tmp_path):
    from sqlalchemy import func, select

    from sameguard.decisions import Decision
    from sameguard.service.audit import AuditLog
    from sameguard.service.db import audit_log, init_db, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    init_db(engine)
    log = AuditLog(engine, {"sameguard": "test", "policy": "monitor"})

    def decision(request_id: str, client: str) -> Decision:
        return Decision(time=time.time(), request_id=request_id, index=0, client=client, input_sha256="0" * 64,
                        score=0.5, threshold=1.0, flagged=False, action="allow")

    taken = decision(uuid.uuid4().hex, "dup")
    log.append([taken])
    failed = []

    def client(i: int) -> None:
        for j in range(20):
            if i == 0 and j == 10:
                try:
                    log.append([taken])  # (request_id, idx) already in the log
                except Exception:  # noqa: BLE001 - the IntegrityError SQLAlchemy wraps
                    failed.append(j)
                continue
            log.append([decision(uuid.uuid4().hex, f"c{i}")])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with engine.connect() as conn:
        per_client = dict(conn.execute(select(audit_log.c.client, func.count()).group_by(audit_log.c.client)).all())
    engine.dispose()
    assert failed == [10]
    assert per_client == {"dup": 1, "c0": 19, **{f"c{i}": 20 for i in range(1, 8)}}
    assert log._group.stats["items"] >= 1 + 8 * 20  # every append went through the group commit



def test_audit_write_benchmark_counts_the_transactions_of_each_kind(tmp_path):
    from sameguard.bench.audit_write import main, measure

    url = f"sqlite:///{tmp_path / 'bench.db'}"
    each = measure(url, 4, 40, group=False)
    grouped = measure(url, 1, 40, group=True)
    assert each["transactions"] == 40 and grouped["transactions"] == 40  # one writer: nothing to group
    assert each["cpu_ms"] > 0 and each["wall_ms"] > 0
    assert 1 <= measure(url, 8, 80, group=True)["transactions"] <= 80
    assert main(["--threads", "2", "--appends", "10", "--repeat", "1", "--db", url]) == 0
    with pytest.raises(SystemExit):
        main(["--threads", "0"])
