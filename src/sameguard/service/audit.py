"""The append-only audit log: one row per query, written before the query is answered.

The service's prediction endpoint writes the decisions of each batch with
:meth:`AuditLog.append`, in one transaction, after ``guard.protect`` and before it answers; if that
fails the batch is not answered (503), so every answer has its row. :func:`summarize` reads the log back per client, for
``sameguard audit --db URL``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, case, func, insert, select

from .db import audit_log, pow_events

logger = logging.getLogger(__name__)

__all__ = ["AuditLog", "ClientSummary", "summarize", "format_summary"]


class AuditLog:
    """Writes decisions (and proof-of-work events) to the database.

    Args:
        engine: the database engine (tables created by :func:`~sameguard.service.db.init_db`).
        versions: the model versions stored with every row (``Guard.versions``).
    """

    def __init__(self, engine: Engine, versions: Mapping[str, Any]) -> None:
        self.engine = engine
        self.versions = dict(versions)

    def append(self, decisions: Iterable[Any]) -> None:
        """Insert one row per :class:`~sameguard.guard.Decision`, in one transaction."""
        v = self.versions
        rows = []
        for d in decisions:
            score = None if d.score is None or not math.isfinite(d.score) else float(d.score)
            rows.append({
                "ts": d.time, "request_id": d.request_id, "idx": d.index, "client": d.client,
                "input_sha256": d.input_sha256, "score": score, "threshold": d.threshold, "flagged": bool(d.flagged),
                "action": d.action, "work_bits": int(d.work_bits), "victim_sha256": v.get("victim_sha256"),
                "detector": v.get("detector"), "detector_sha256": v.get("detector_sha256"),
                "policy": str(v.get("policy")), "sameguard_version": str(v.get("sameguard")),
            })
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(insert(audit_log), rows)

    def pow_event(self, client: str, outcome: str, *, challenge_id: str | None = None, request_id: str | None = None,
                  bits: int | None = None) -> None:
        """Record a proof-of-work event (``issued``, ``redeemed``, or why a redemption was refused)."""
        with self.engine.begin() as conn:
            conn.execute(insert(pow_events).values(ts=time.time(), client=client, challenge_id=challenge_id,
                                                   request_id=request_id, bits=bits, outcome=outcome[:32]))

    def count(self, client: str | None = None) -> int:
        """Number of audit rows (for one client or all)."""
        stmt = select(func.count()).select_from(audit_log)
        if client is not None:
            stmt = stmt.where(audit_log.c.client == client)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())


@dataclass
class ClientSummary:
    """One client's queries in the audit log.

    Attributes:
        client: the key's name.
        queries: rows (images).
        requests: distinct requests (batches).
        flagged: rows flagged by the detector.
        actions: rows per action label.
        mean_score, max_score: over rows with a score (``None`` when none has).
        work_bits: total proof-of-work bits asked of the client's queries.
        first, last: UNIX seconds of the first and last query.
    """

    client: str
    queries: int
    requests: int
    flagged: int
    mean_score: float | None
    max_score: float | None
    first: float
    last: float
    work_bits: int = 0
    actions: dict[str, int] = field(default_factory=dict)

    @property
    def flagged_rate(self) -> float:
        return self.flagged / self.queries if self.queries else 0.0


def summarize(engine: Engine, *, since: float | None = None) -> list[ClientSummary]:
    """Per-client summary of the audit log (optionally only rows with ``ts >= since``), most flagged first."""
    c = audit_log.c
    where = [] if since is None else [c.ts >= since]
    stmt = (select(c.client, func.count().label("queries"), func.count(func.distinct(c.request_id)).label("requests"),
                   func.sum(case((c.flagged, 1), else_=0)).label("flagged"), func.avg(c.score).label("mean_score"),
                   func.max(c.score).label("max_score"), func.min(c.ts).label("first"), func.max(c.ts).label("last"),
                   func.sum(c.work_bits).label("work_bits"))
            .where(*where).group_by(c.client))
    by_action = select(c.client, c.action, func.count().label("n")).where(*where).group_by(c.client, c.action)
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
        actions = conn.execute(by_action).mappings().all()
    out = {r["client"]: ClientSummary(client=r["client"], queries=int(r["queries"]), requests=int(r["requests"]),
                                      flagged=int(r["flagged"] or 0), mean_score=r["mean_score"],
                                      max_score=r["max_score"], first=float(r["first"]), last=float(r["last"]),
                                      work_bits=int(r["work_bits"] or 0))
           for r in rows}
    for a in actions:
        out[a["client"]].actions[a["action"]] = int(a["n"])
    return sorted(out.values(), key=lambda s: (-s.flagged_rate, -s.queries, s.client))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_summary(summaries: list[ClientSummary]) -> str:
    """A Markdown table of :func:`summarize`'s result."""
    lines = ["| client | queries | requests | flagged | flagged % | mean score | max score | allow | reject | "
             "misinform | pow | PoW bits | first (UTC) | last (UTC) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in summaries:
        a = s.actions
        lines.append(
            f"| {s.client} | {s.queries} | {s.requests} | {s.flagged} | {100 * s.flagged_rate:.1f} | "
            f"{_fmt(s.mean_score)} | {_fmt(s.max_score)} | {a.get('allow', 0)} | {a.get('reject', 0)} | "
            f"{a.get('misinform', 0)} | {a.get('pow', 0)} | {s.work_bits} | "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(s.first))} | "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(s.last))} |")
    if not summaries:
        lines.append("| (no queries) | 0 | 0 | 0 | 0 | - | - | 0 | 0 | 0 | 0 | 0 | - | - |")
    return "\n".join(lines)
