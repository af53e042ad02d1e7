"""The versioned schema (Alembic) and the audit log on PostgreSQL, for real.

* A new database runs the whole chain and ends at exactly the tables of ``sameguard.service.db``;
  a database made before the schema was versioned, or at an older version, is upgraded in place
  with its rows kept.
* Several processes write the audit log of one PostgreSQL database at once: N x M requests give
  N x M x B rows, none lost, none twice; several processes starting together migrate it once.
* ``sameguard audit`` prints the same summary from PostgreSQL as from SQLite for the same rows.

PostgreSQL tests need the server (skipped without it, failing under ``CI=true``); each runs in its own schema.
"""

from __future__ import annotations

import argparse
import multiprocessing
import uuid

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, func, insert, inspect, select

from sameguard.decisions import Decision
from sameguard.service.audit import AlarmEvent, AuditLog
from sameguard.service.db import audit_log, head_version, init_db, make_engine, metadata, schema_version

VERSIONS = {"victim_sha256": "v" * 64, "detector": "FakeDetector", "detector_sha256": "d" * 64, "policy": "reject",
            "sameguard": "test"}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("postgres_url")


def _shape(engine):
    insp = inspect(engine)
    return {t: ({c["name"] for c in insp.get_columns(t)}, {ix["name"] for ix in insp.get_indexes(t) if not ix.get("duplicates_constraint")})
            for t in insp.get_table_names() if t.startswith("sg_") and t != "sg_alembic_version"}


def _expected():
    return {t.name: ({c.name for c in t.columns}, {ix.name for ix in t.indexes}) for t in metadata.sorted_tables}


def test_a_new_database_runs_the_chain_to_exactly_the_current_tables(any_db):
    engine = make_engine(any_db)
    assert schema_version(engine) is None
    init_db(engine)
    init_db(engine)  # at the head: nothing to do
    assert schema_version(engine) == head_version()
    assert _shape(engine) == _expected()
    engine.dispose()


def test_a_database_from_before_versioning_is_upgraded_with_its_rows(any_db):
    engine = make_engine(any_db)
    first = MetaData()  # the first release's tables
    old_audit = Table(audit_log.name, first, *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                               for c in audit_log.columns
                                               if c.name not in ("evidence", "alarmed", "client_request_id")))
    Table("sg_api_keys", first, Column("id", Integer, primary_key=True), Column("key_id", String(32)),
          Column("name", String(64)), Column("key_sha256", String(64)), Column("created_at", Float),
          Column("revoked_at", Float))
    first.create_all(engine)
    row = {"ts": 1.0, "request_id": "r", "idx": 0, "client": "old", "input_sha256": "0" * 64, "score": 0.5,
           "threshold": 1.0, "flagged": False, "action": "allow", "work_bits": 0, "policy": "reject",
           "sameguard_version": "0"}
    with engine.begin() as conn:
        conn.execute(insert(old_audit).values(**row))
    init_db(engine)
    assert schema_version(engine) == head_version()
    shape = _shape(engine)
    assert {"evidence", "alarmed", "client_request_id"} <= shape[audit_log.name][0]
    assert set(shape) == set(_expected())  # the missing tables were created
    with engine.connect() as conn:
        assert conn.execute(select(audit_log.c.client, audit_log.c.alarmed)).all() == [("old", False)]
    engine.dispose()


def test_an_older_version_is_upgraded_step_by_step(any_db):
    from alembic import command

    from sameguard.service.db import _alembic_config

    engine = make_engine(any_db)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001")
    assert schema_version(engine) == "0001"
    assert "sg_alarm_events" not in _shape(engine)
    init_db(engine)
    assert schema_version(engine) == head_version()
    assert _shape(engine) == _expected()
    engine.dispose()


def _decisions(client: str, request_id: str, n: int, t0: float) -> list[Decision]:
    return [Decision(time=t0 + i, client=client, input_sha256=f"{i:064x}", score=0.1 * i - 0.3, threshold=0.0,
                     flagged=0.1 * i - 0.3 > 0, action="reject" if 0.1 * i - 0.3 > 0 else "allow",
                     work_bits=i % 3, request_id=request_id, index=i) for i in range(n)]


def _writer(url: str, worker: int, m: int, b: int, out) -> None:
    engine = make_engine(url)
    init_db(engine)  # every worker migrates at start-up, together
    log = AuditLog(engine, VERSIONS)
    for j in range(m):
        log.append(_decisions(f"client{worker % 2}", uuid.uuid4().hex, b, 1000.0 + j))
    engine.dispose()
    out.put(worker)


def test_postgres_audit_with_concurrent_writers_from_several_processes(postgres_url):
    n, m, b = 4, 25, 3
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(postgres_url, w, m, b, out)) for w in range(n)]
    for p in procs:
        p.start()
    assert sorted(out.get(timeout=120) for _ in procs) == list(range(n))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    engine = make_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
        pairs = conn.execute(select(func.count()).select_from(
            select(audit_log.c.request_id, audit_log.c.idx).distinct().subquery())).scalar_one()
        requests = conn.execute(select(func.count(func.distinct(audit_log.c.request_id)))).scalar_one()
    engine.dispose()
    assert rows == pairs == n * m * b
    assert requests == n * m


def _fill(url: str) -> None:
    engine = make_engine(url)
    init_db(engine)
    log = AuditLog(engine, VERSIONS)
    for j, client in enumerate(["alice", "bob", "alice", "mallory", "mallory", "mallory"]):
        log.append(_decisions(client, f"req{j}", 4, 1_700_000_000.0 + 60 * j),
                   [AlarmEvent(time=1_700_000_400.0, client="mallory", event="raised", queries=9, evidence=3.25,
                               request_id="req5")] if j == 5 else [])
    log.alarm_event(AlarmEvent(time=1_700_000_500.0, client="mallory", event="cleared", queries=12, evidence=1.5))
    engine.dispose()


def test_sameguard_audit_prints_the_same_from_postgres_as_from_sqlite(postgres_url, tmp_path, capsys):
    from sameguard.service.commands import audit_main

    sqlite_url = f"sqlite:///{tmp_path / 'audit.db'}"
    outputs = {}
    for name, url in (("sqlite", sqlite_url), ("postgresql", postgres_url)):
        _fill(url)
        for as_json in (False, True):
            args = argparse.Namespace(db=url, since_hours=None, json=as_json, client=None, flagged=False, since=None,
                                      until=None, export=None, export_format=None)
            assert audit_main(args) == 0
            outputs[name, as_json] = capsys.readouterr().out
    assert "| mallory | 12 | 3 |" in outputs["sqlite", False]
    assert outputs["postgresql", False] == outputs["sqlite", False]
    # JSON: the same, up to the last bits of floating-point averages (the databases sum in different orders).
    import json

    pg, lite = json.loads(outputs["postgresql", True]), json.loads(outputs["sqlite", True])
    assert [{k: v for k, v in c.items() if k != "mean_score"} for c in pg] == \
        [{k: v for k, v in c.items() if k != "mean_score"} for c in lite]
    assert [c["mean_score"] for c in pg] == pytest.approx([c["mean_score"] for c in lite], abs=1e-12)


