"""Which per-client alarms the audit log already holds, so that each alarm is recorded once.

The guard's :class:`~sameguard.alarms.ClientAlarms` latch a client's alarm; every later decision of
that client carries ``alarmed=True``. :class:`AlarmLedger` turns the first alarmed decision of an
alarm into one :class:`~sameguard.service.audit.AlarmEvent` (``raised``), written in the same
transaction as the batch's audit rows, and remembers it (an alarm is identified by its client and
its alarm time) until an operator clears it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .audit import AlarmEvent

__all__ = ["AlarmLedger", "AlarmRecord", "ledger_store"]


@dataclass(frozen=True)
class AlarmRecord:
    """One client's current alarm: when it was raised, after how many queries, with what evidence (log10)."""

    alarm_time: float
    queries: int | None
    evidence: float | None


class AlarmLedger:
    """The alarms already written to the audit log, per client (thread-safe).

    Args:
        store: where the records live: a :class:`~sameguard.evidence.store.StateStore` of
            :class:`AlarmRecord` (default: in memory, one process). With several workers, pass the
            shared state store's ``kv("alarm-ledger", ...)`` (:func:`ledger_store`): the worker that
            claims an alarm first writes its event, the others do not, so each alarm is recorded once.
    """

    def __init__(self, store: Any = None) -> None:
        from ..evidence.store import InMemoryStore

        self._store = store if store is not None else InMemoryStore()

    def raised(self, alarms: Any, client: str, decisions: Sequence[Any], request_id: str) -> AlarmEvent | None:
        """The ``raised`` event to write with this batch, or ``None`` (no alarm, or already recorded).

        Args:
            alarms: the guard's :class:`~sameguard.alarms.ClientAlarms` (``None``: no alarms).
            client: the batch's client.
            decisions: the batch's decisions; the first alarmed one is the alarm's query when the
                alarm was raised in this batch.
            request_id: the batch's request id.
        """
        first = next((d for d in decisions if getattr(d, "alarmed", False)), None)
        if alarms is None or first is None:
            return None
        ev = alarms.evidence(client)
        alarm_time = float(ev.alarm_time) if ev is not None and ev.alarm_time is not None else float(first.time)
        queries = ev.alarm_query if ev is not None else None
        record = AlarmRecord(alarm_time, queries, first.evidence)
        claimed: list[bool] = []

        def claim(old: AlarmRecord | None) -> AlarmRecord:  # pure: a shared store may run it again
            first_time = old is None or not math.isclose(old.alarm_time, alarm_time)
            claimed[:] = [first_time]
            return record if first_time else old

        self._store.update(client, claim)
        if not claimed[0]:
            return None
        return AlarmEvent(time=alarm_time, client=client, event="raised", queries=queries, evidence=first.evidence,
                          request_id=request_id)

    def undo(self, event: AlarmEvent) -> None:
        """Forget ``event`` (its audit write failed), so the next batch records it again."""
        record = self._store.get(event.client)
        if record is not None and math.isclose(record.alarm_time, event.time):
            self._store.delete(event.client)

    def get(self, client: str) -> AlarmRecord | None:
        """The client's recorded alarm, if any."""
        return self._store.get(client)

    def cleared(self, client: str) -> None:
        """The operator cleared the client's alarm: a new alarm of it will be recorded afresh."""
        self._store.delete(client)


def ledger_store(service_store: Any) -> Any:
    """The alarm ledger's records in the service's state store (JSON values), for :class:`AlarmLedger`."""
    import json

    return service_store.kv("alarm-ledger", lambda r: json.dumps(r.__dict__).encode(),
                            lambda b: AlarmRecord(**json.loads(b)))
