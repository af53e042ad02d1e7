"""``sameguard audit`` filters (--client, --flagged, --since, --until), its export (CSV, JSON lines), the
per-client score distribution, and ``keys create --quiet``."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import insert

from _cli import run
from sameguard.service.audit_query import AuditFilter, parse_time
from sameguard.service.db import audit_log, init_db, make_engine

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z




def _row(i: int, client: str, score: float | None, flagged: bool, ts: float) -> dict:
    return {"ts": ts, "request_id": f"r{i}", "idx": 0, "client": client, "input_sha256": "0" * 64, "score": score,
            "threshold": 0.5, "flagged": flagged, "action": "reject" if flagged else "allow", "work_bits": 0,
            "victim_sha256": "v", "detector": "SAMEDetector", "detector_sha256": "d", "policy": "reject",
            "sameguard_version": "0", "evidence": None, "alarmed": False}


@pytest.fixture
def db(tmp_path) -> str:
    """An audit log: alice 10 queries (scores 0.0..0.9, above 0.5 flagged), bob 3 queries, one hour apart."""
    url = f"sqlite:///{tmp_path}/audit.db"
    engine = make_engine(url)
    init_db(engine)
    rows = [_row(i, "alice", i / 10, i / 10 > 0.5, T0 + 60 * i) for i in range(10)]
    rows += [_row(10 + i, "bob", None if i == 0 else 0.1, False, T0 + 3600 + i) for i in range(3)]
    with engine.begin() as conn:
        conn.execute(insert(audit_log), rows)
    engine.dispose()
    return url


def test_parse_time_forms():
    assert parse_time("2027-01-15T08:00:00Z") == T0
    assert parse_time("2027-01-15T09:00:00+01:00") == T0
    assert parse_time("2027-01-15T08:00:00") == T0  # UTC when no offset is given
    assert parse_time(str(T0)) == T0
    assert parse_time("2h", now=T0) == T0 - 7200
    assert parse_time("90m", now=T0) == T0 - 5400
    for bad in ("yesterday", "nan", "inf", "-inf", "1e400", "9" * 400 + "d"):  # float() reads nan/inf: refused too
        with pytest.raises(ValueError, match="is not a time"):
            parse_time(bad)
    with pytest.raises(ValueError, match="--until must be later"):
        AuditFilter(since=T0, until=T0)


def test_filters_select_the_summary(db):
    code, out = run("audit", "--db", db, "--json")
    assert code == 0
    assert {s["client"]: s["queries"] for s in json.loads(out)} == {"alice": 10, "bob": 3}
    code, out = run("audit", "--db", db, "--json", "--flagged")
    assert {s["client"]: s["queries"] for s in json.loads(out)} == {"alice": 4}
    code, out = run("audit", "--db", db, "--json", "--since", "2027-01-15T08:03:00Z", "--until", "2027-01-15T08:06:00Z")
    assert {s["client"]: s["queries"] for s in json.loads(out)} == {"alice": 3}


def test_client_statistics(db):
    code, out = run("audit", "--db", db, "--client", "alice")
    assert code == 0
    assert "| alice | 10 |" in out and "| bob |" not in out
    assert "Scores of alice: 10 queries (10 scored, 4 flagged); min 0, p50 0.4, p95 0.9, p99 0.9, max 0.9" in out
    code, out = run("audit", "--db", db, "--client", "bob", "--json")
    stats = json.loads(out)[0]["scores"]
    assert stats == {"n": 3, "scored": 2, "flagged": 0, "min": 0.1, "p50": 0.1, "p95": 0.1, "p99": 0.1, "max": 0.1}


def test_export_csv_and_json_lines(db, tmp_path):
    code, out = run("audit", "--db", db, "--client", "alice", "--flagged", "--export", str(tmp_path / "rows.csv"))
    assert code == 0 and "wrote 4 audit row(s)" in out
    with open(tmp_path / "rows.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["request_id"] for r in rows] == ["r6", "r7", "r8", "r9"]
    assert rows[0]["time"] == "2027-01-15T08:06:00.000Z" and rows[0]["flagged"] == "1"
    code, out = run("audit", "--db", db, "--client", "bob", "--export", "-")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]  # standard output holds only the rows
    assert [r["request_id"] for r in lines] == ["r10", "r11", "r12"]
    assert lines[0]["score"] is None and lines[1]["score"] == 0.1 and lines[0]["flagged"] is False


def test_export_needs_a_known_format(db, tmp_path, capsys):
    code, _ = run("audit", "--db", db, "--export", str(tmp_path / "rows.txt"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--format csv|jsonl" in err
    code, _ = run("audit", "--db", db, "--export", str(tmp_path / "rows.txt"), "--format", "csv")
    assert code == 0 and (tmp_path / "rows.txt").read_text().startswith("time,ts,")


def test_bad_time_is_one_sentence(db, capsys):
    code, _ = run("audit", "--db", db, "--since", "last tuesday")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--since 'last tuesday' is not a time" in err


def test_keys_create_quiet_prints_only_the_key(tmp_path):
    code, out = run("keys", "create", "--name", "alice", "--quiet", "--db", f"sqlite:///{tmp_path}/k.db")
    assert code == 0
    assert out.count("\n") == 1 and out.startswith("sg_") and " " not in out.strip()
