"""The audit schema with per-client alarms, on SQLite and on a real PostgreSQL.

PostgreSQL: ``$SAMEGUARD_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
each test works in its own schema, dropped afterwards. Where the server or the driver is missing
the PostgreSQL cases are skipped with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import argparse
import base64
import os
import uuid
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from sqlalchemy import Column, MetaData, Table, create_engine, insert, select, text

from sameguard.alarms import ClientAlarms
from sameguard.guard import Guard
from sameguard.service import ServiceSettings, create_app
from sameguard.service.audit import alarm_history, summarize
from sameguard.service.db import alarm_events, audit_log, init_db, make_engine

POSTGRES_URL = os.environ.get("SAMEGUARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(f"PostgreSQL not available: {reason}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh database: a SQLite file, or a new schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install 'psycopg[binary]')")
    schema = f"sg_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means: not reachable
        admin.dispose()
        _unavailable(f"{POSTGRES_URL} is not reachable ({type(exc).__name__})")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _b64(x: torch.Tensor) -> dict:
    return {"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), "shape": list(x.shape)}


def test_alarm_audit_path_through_the_app(db_url, victim, kit, capsys):
    from sameguard.service.commands import audit_main

    detector = kit.FakeDetector(threshold=2.0)
    alarms = ClientAlarms.calibrate(victim, {"fake": detector}, kit.dark(600, seed=3), delta=1e-3)
    app = create_app(ServiceSettings(db_url=db_url, key_cache_s=0),
                     guard=Guard(victim, detector, "reject", alarms=alarms))
    _, token = app.state.sameguard.keys.create("mallory")
    with TestClient(app) as client:
        r = client.post("/v1/predict", json=_b64(kit.bright(20, seed=7)), headers={"X-API-Key": token})
        assert r.status_code == 200, r.text
        first = r.json()["refused"][0]
        r = client.post("/v1/predict", json=_b64(kit.dark(2)), headers={"X-API-Key": token})
        assert (r.status_code, r.json()["error"]) == (403, "client_alarmed")
    engine = app.state.sameguard.audit.engine
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.alarmed, audit_log.c.evidence).order_by(audit_log.c.id)).all()
    assert [bool(a) for a, _ in rows] == [False] * first + [True] * (20 - first + 2)
    assert all(isinstance(e, float) for _, e in rows)
    [event] = alarm_history(engine)
    assert (event.client, event.event, event.queries) == ("mallory", "raised", first + 1)
    assert summarize(engine)[0].queries == 22
    assert audit_main(argparse.Namespace(db=db_url, since_hours=None, json=False)) == 0
    assert "| mallory | " in capsys.readouterr().out.split("Per-client alarms")[1]


def test_init_db_adds_the_alarm_columns_to_an_older_audit_log(db_url):
    engine = make_engine(db_url)
    old = MetaData()
    Table(audit_log.name, old, *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                 for c in audit_log.columns if c.name not in ("evidence", "alarmed")))
    old.create_all(engine)
    row = {"ts": 1.0, "request_id": "r", "idx": 0, "client": "old", "input_sha256": "0" * 64, "score": 0.5,
           "threshold": 1.0, "flagged": False, "action": "allow", "work_bits": 0, "policy": "reject",
           "sameguard_version": "0"}
    with engine.begin() as conn:
        conn.execute(insert(old.tables[audit_log.name]).values(**row))
    init_db(engine)
    init_db(engine)  # idempotent
    with engine.begin() as conn:
        conn.execute(insert(audit_log).values(**(row | {"client": "new", "evidence": 3.5, "alarmed": True})))
        got = conn.execute(select(audit_log.c.client, audit_log.c.evidence, audit_log.c.alarmed)
                           .order_by(audit_log.c.id)).all()
        assert conn.execute(select(alarm_events)).all() == []
    engine.dispose()
    assert [tuple(r) for r in got] == [("old", None, False), ("new", 3.5, True)]
