"""Selecting and exporting rows of the audit log: ``sameguard audit --client --flagged --since --until --export``.

:class:`AuditFilter` turns the command's filters into SQL conditions on ``sg_audit_log`` (and on
``sg_alarm_events``), :func:`iter_rows` streams the matching rows oldest first, :func:`export_rows`
writes them as CSV or JSON lines (one object per line, the columns of ``sg_audit_log``), and
:func:`score_stats` gives one client's score distribution. :func:`parse_time` reads the time bounds:
ISO 8601 (``2026-11-29T12:00:00Z``, ``2026-11-29``; UTC unless an offset is given), UNIX seconds, or
an age such as ``90m``, ``2h``, ``7d`` (that long before now).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy import Engine, inspect, select

from .db import alarm_events, audit_log

__all__ = [
    "EXPORT_COLUMNS",
    "AuditFilter",
    "export_format",
    "export_rows",
    "iter_rows",
    "parse_time",
    "require_audit_log",
    "score_stats",
]

#: Columns of an exported row, in order (those of ``sg_audit_log`` without the internal ``id``).
EXPORT_COLUMNS = tuple(c.name for c in audit_log.columns if c.name != "id")

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: float | None = None, flag: str = "time") -> float:
    """UNIX seconds of ``text``: ISO 8601 (UTC unless an offset is given), UNIX seconds, or an age (``2h``).

    Raises:
        ValueError: none of these forms.
    """
    age = _AGE.match(text)
    if age:
        seconds = (time.time() if now is None else now) - float(age.group(1)) * _UNIT_S[age.group(2)]
    else:
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = _dt.datetime.fromisoformat(text.strip())  # Python 3.11 reads a trailing Z
            except ValueError:
                seconds = math.nan
            else:
                seconds = (moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)).timestamp()
    if not math.isfinite(seconds):  # nan, inf, 1e400, an age of 1e400 days
        raise ValueError(f"{flag} {text[:64]!r} is not a time: give ISO 8601 (2026-11-29T12:00:00Z), UNIX seconds, "
                         "or an age such as 90m, 2h, 7d.")
    return seconds


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows a command looks at.

    Attributes:
        client: only this client's rows (``None``: every client).
        flagged: only rows the detector flagged.
        since, until: UNIX seconds; rows with ``since <= ts < until`` (``None``: unbounded).
    """

    client: str | None = None
    flagged: bool = False
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("The time range is empty: --until must be later than --since.")

    def audit_where(self) -> list[Any]:
        """SQL conditions on ``sg_audit_log``."""
        where = self._client_and_time(audit_log.c)
        if self.flagged:
            where.append(audit_log.c.flagged.is_(True))
        return where

    def alarm_where(self) -> list[Any]:
        """SQL conditions on ``sg_alarm_events`` (the client and the time range; ``flagged`` does not apply)."""
        return self._client_and_time(alarm_events.c)

    def _client_and_time(self, c: Any) -> list[Any]:
        """Conditions on the ``client`` and ``ts`` columns ``c.client`` and ``c.ts`` of either table."""
        where: list[Any] = []
        if self.client is not None:
            where.append(c.client == self.client)
        if self.since is not None:
            where.append(c.ts >= self.since)
        if self.until is not None:
            where.append(c.ts < self.until)
        return where


def require_audit_log(engine: Engine, url: str) -> None:
    """Raise ``ValueError`` unless the database holds sameguard's audit log (so that reading it creates nothing)."""
    if not inspect(engine).has_table(audit_log.name):
        raise ValueError(f"The database {url} holds no sameguard audit log (no {audit_log.name} table): check --db; "
                         "'sameguard serve' creates it.")


def iter_rows(engine: Engine, where: AuditFilter, *, chunk: int = 1000) -> Iterator[dict[str, Any]]:
    """The matching audit rows, oldest first, as dicts of :data:`EXPORT_COLUMNS` (read ``chunk`` at a time)."""
    c = audit_log.c
    last_id = 0
    while True:
        stmt = (select(c.id, *(c[name] for name in EXPORT_COLUMNS)).where(*where.audit_where(), c.id > last_id)
                .order_by(c.id).limit(chunk))
        with engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        if not rows:
            return
        for r in rows:
            yield {name: r[name] for name in EXPORT_COLUMNS}
        last_id = int(rows[-1]["id"])


def export_format(path: str, fmt: str | None) -> str:
    """``csv`` or ``jsonl``: ``fmt`` if given, else from the file's suffix (``.csv``; ``.jsonl``, ``.json``, ``-``: JSON lines)."""
    if fmt is not None:
        return fmt
    lower = path.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower == "-" or lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ValueError(f"--export {path}: cannot tell the format from the name; end it in .csv or .jsonl, or give "
                     "--format csv|jsonl.")


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def export_rows(rows: Iterator[dict[str, Any]], fh: IO[str], fmt: str) -> int:
    """Write ``rows`` to ``fh`` as ``csv`` (a header, then one line per row) or ``jsonl``; returns how many.

    Each row also gets ``time``, its ``ts`` in ISO 8601 UTC. Missing scores are empty in CSV and
    ``null`` in JSON; booleans are ``true``/``false`` in JSON and ``1``/``0`` in CSV.
    """
    columns = ("time", *EXPORT_COLUMNS)
    n = 0
    writer = csv.writer(fh) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(columns)
    for row in rows:
        row = {"time": _iso(row["ts"]), **row}
        if writer is not None:
            writer.writerow(["" if row[k] is None else int(row[k]) if isinstance(row[k], bool) else row[k]
                             for k in columns])
        else:
            fh.write(json.dumps({k: row[k] for k in columns}, allow_nan=False) + "\n")
        n += 1
    return n


def score_stats(engine: Engine, where: AuditFilter) -> dict[str, Any]:
    """The matching rows' score distribution: ``n``, ``scored``, ``flagged``, ``min``, ``p50``, ``p95``, ``p99``, ``max``.

    Quantiles use the "higher" rule (an observed score); ``None`` where no row has a score.
    """
    c = audit_log.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.score, c.flagged).where(*where.audit_where())).all()
    scores = sorted(float(s) for s, _ in rows if s is not None and math.isfinite(s))

    def quantile(q: float) -> float | None:
        return scores[min(len(scores) - 1, math.ceil(q * len(scores)) - 1)] if scores else None

    return {"n": len(rows), "scored": len(scores), "flagged": sum(bool(f) for _, f in rows),
            "min": scores[0] if scores else None, "p50": quantile(0.5), "p95": quantile(0.95),
            "p99": quantile(0.99), "max": scores[-1] if scores else None}
