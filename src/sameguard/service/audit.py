"""The append-only audit log: one row per query, written before the query is answered.

The service's prediction endpoint writes the decisions of each batch with
:meth:`AuditLog.append`, in one transaction (shared with the batches of other requests that arrive
meanwhile: group commit), after ``guard.protect`` and before it answers; if that fails the batch is not
answered (503), so every answer has its row. When a client's per-client
alarm is raised in that batch, the alarm event is written in the same transaction; an operator's
clearing of an alarm is written by :meth:`AuditLog.alarm_event`. :func:`summarize` reads the log
back per client and :func:`alarm_history` the alarms, for ``sameguard audit --db URL``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, case, func, insert, select

from .db import alarm_events, audit_log, pow_events
from .group_commit import GroupCommit

logger = logging.getLogger(__name__)

__all__ = ["AuditLog", "AlarmEvent", "ClientSummary", "summarize", "format_summary", "alarm_history", "format_alarms"]


@dataclass(frozen=True)
class AlarmEvent:
    """A per-client alarm raised (``event="raised"``) or cleared by an operator (``event="cleared"``).

    Attributes:
        time: UNIX seconds of the alarm (or of the clearing).
        client: the key's name.
        event: ``"raised"`` or ``"cleared"``.
        queries: the client's query count at the alarm (the 1-based index of the query at which its
            evidence reached ``1/delta``), or at the clearing.
        evidence: log10 of the client's martingale at that query (at the clearing: just before it).
        request_id: the request whose batch raised the alarm (``None`` for a clearing).
    """

    time: float
    client: str
    event: str
    queries: int | None
    evidence: float | None
    request_id: str | None = None


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class AuditLog:
    """Writes decisions (and proof-of-work events) to the database.

    Args:
        engine: the database engine (tables created by :func:`~sameguard.service.db.init_db`).
        versions: the model versions stored with every row (``Guard.versions``).
        group_commit: concurrent :meth:`append` calls share transactions (default); ``False``: a transaction
            per call (``python -m sameguard.bench.audit_write`` compares the two).
    """

    def __init__(self, engine: Engine, versions: Mapping[str, Any], *, group_commit: bool = True) -> None:
        self.engine = engine
        self.versions = dict(versions)
        # Concurrent appends (the service's request threads) share transactions: :mod:`.group_commit`.
        self._group: GroupCommit[tuple[list[dict[str, Any]], list[dict[str, Any]]]] | None = GroupCommit(
            self._insert, name="the audit log") if group_commit else None

    def append(self, decisions: Iterable[Any], alarms: Iterable[AlarmEvent] = (), *,
               client_request_id: str | None = None) -> None:
        """Insert one row per :class:`~sameguard.guard.Decision` and the alarm events, in one transaction;
        returns once they are committed, raises if they could not be.

        Calls from several threads at once share transactions (group commit, :mod:`.group_commit`): the
        rows of the calls that arrive while one transaction commits go in the next one together, and a
        call whose rows a shared transaction could not take (a constraint they violate) is retried alone,
        so it fails on its own.

        ``client_request_id``: the client's own ``X-Request-ID``, recorded beside the server's id.
        """
        v = self.versions
        rows = []
        for d in decisions:
            rows.append({
                "ts": d.time, "request_id": d.request_id, "idx": d.index, "client": d.client,
                "input_sha256": d.input_sha256, "score": _finite(d.score), "threshold": d.threshold, "flagged": bool(d.flagged),
                "action": d.action, "work_bits": int(d.work_bits), "victim_sha256": v.get("victim_sha256"),
                "detector": v.get("detector"), "detector_sha256": v.get("detector_sha256"),
                "policy": str(v.get("policy")), "sameguard_version": str(v.get("sameguard")),
                "evidence": _finite(getattr(d, "evidence", None)), "alarmed": bool(getattr(d, "alarmed", False)),
                "client_request_id": client_request_id,
            })
        events = [_event_row(e) for e in alarms]
        if rows or events:
            if self._group is None:
                self._insert([(rows, events)])
            else:
                self._group.submit((rows, events))

    def _insert(self, groups: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> None:
        """The rows and events of several :meth:`append` calls, in one transaction."""
        rows = [row for own, _ in groups for row in own]
        events = [event for _, own in groups for event in own]
        with self.engine.begin() as conn:
            if rows:
                conn.execute(insert(audit_log), rows)
            if events:
                conn.execute(insert(alarm_events), events)

    def alarm_event(self, event: AlarmEvent) -> None:
        """Record one alarm event on its own (an operator clearing an alarm)."""
        with self.engine.begin() as conn:
            conn.execute(insert(alarm_events).values(**_event_row(event)))

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


def _event_row(e: AlarmEvent) -> dict[str, Any]:
    return {"ts": e.time, "client": e.client, "event": e.event[:16], "queries": e.queries,
            "evidence": _finite(e.evidence), "request_id": e.request_id}


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


def summarize(engine: Engine, *, since: float | None = None, where: Sequence[Any] = ()) -> list[ClientSummary]:
    """Per-client summary of the audit log, most flagged first.

    Only rows with ``ts >= since`` when given, and that meet the SQL conditions ``where`` (e.g.
    :meth:`sameguard.service.audit_query.AuditFilter.audit_where`).
    """
    c = audit_log.c
    where = [*where] + ([] if since is None else [c.ts >= since])
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


def alarm_history(engine: Engine, *, since: float | None = None, where: Sequence[Any] = ()) -> list[AlarmEvent]:
    """Every alarm event (raised and cleared), oldest first (optionally only those with ``ts >= since``
    and that meet the SQL conditions ``where``)."""
    c = alarm_events.c
    stmt = select(alarm_events).where(*where).order_by(c.ts, c.id)
    if since is not None:
        stmt = stmt.where(c.ts >= since)
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [AlarmEvent(time=float(r["ts"]), client=r["client"], event=r["event"], queries=r["queries"],
                       evidence=r["evidence"], request_id=r["request_id"]) for r in rows]


def format_alarms(events: list[AlarmEvent]) -> str:
    """A Markdown table of the alarms: one row per alarm raised, with whether (and when) it was cleared."""
    lines = ["| client | alarm (UTC) | queries at alarm | evidence (log10) | cleared (UTC) |", "|---|---|---:|---:|---|"]
    open_rows: dict[str, int] = {}
    rows: list[list[str]] = []
    for e in events:
        if e.event == "raised":
            open_rows[e.client] = len(rows)
            rows.append([e.client, _utc(e.time), "-" if e.queries is None else str(e.queries), _fmt(e.evidence), "-"])
        elif e.event == "cleared" and e.client in open_rows:
            rows[open_rows.pop(e.client)][4] = _utc(e.time)
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if not rows:
        lines.append("| (no alarms) | - | - | - | - |")
    return "\n".join(lines)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
