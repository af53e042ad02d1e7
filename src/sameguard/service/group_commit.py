"""Group commit: concurrent writers share one database transaction, and each still waits for its own.

Every answered query has its audit row, written before the answer (the service fails closed). One
transaction per request made that write the largest single cost of a request the guard does not score:
about half a millisecond of CPU for a one-row SQLite transaction on one thread, more with sixteen
threads taking turns at the database's single writer lock. Databases have long solved this with *group
commit*: the writers that arrive while a transaction is being committed are committed together in the
next one. :class:`GroupCommit` does that for any ``write(items)`` function:

* a caller queues its item, then takes its turn at the writer lock; whoever holds the lock takes
  *every* queued item and writes them in one call; a caller whose item an earlier turn already wrote
  finds the queue without it and just returns;
* a caller returns only after the call holding its item has returned (its rows are committed), and
  raises if it failed: nothing changes for the caller but the number of transactions;
* when a call of several items fails, each of them is written again on its own, so one caller's bad
  item (a constraint it violates) fails that caller only, and a database that is down fails them all.

With one writer at a time and no waiting for others to arrive, an idle service commits each request at
once, as before; under load the transactions grow with the number of requests that arrived during the
previous one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Entry(Generic[T]):
    __slots__ = ("error", "item", "written")

    def __init__(self, item: T) -> None:
        self.item = item
        self.written = False
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    """Coalesce concurrent :meth:`submit` calls into calls of ``write(items)``, one at a time.

    Args:
        write: writes a non-empty list of items in one transaction (all or none), raising on failure.
        name: for the log.

    Attributes:
        stats: ``{"items", "writes"}``: calls of ``write`` so far and the items they held, failed ones
            included (``items / writes`` is the mean group).
    """

    def __init__(self, write: Callable[[Sequence[T]], None], *, name: str = "") -> None:
        self._write = write
        self.name = name
        self._lock = threading.Lock()  # guards the queue and the stats
        self._writer = threading.Lock()  # one write at a time
        self._queue: list[_Entry[T]] = []
        self.stats = {"items": 0, "writes": 0}

    @property
    def pending(self) -> int:
        """Items queued and not yet taken by a write."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: T) -> None:
        """Write ``item`` (with whatever else is queued); returns once it is written, raises if its write failed."""
        entry = _Entry(item)
        with self._lock:
            self._queue.append(entry)
        with self._writer:
            if not entry.written:  # else an earlier turn wrote it while this one waited for the lock
                with self._lock:
                    group, self._queue = self._queue, []
                self._commit(group)
        if entry.error is not None:
            raise entry.error

    def _commit(self, group: list[_Entry[T]]) -> None:
        """Write ``group`` in one call (under the writer lock); on failure, each of several items alone."""
        try:
            self._call([e.item for e in group])
        except BaseException as exc:  # noqa: BLE001 - each caller gets its own outcome below
            if len(group) == 1:
                group[0].error = exc
            else:
                logger.warning("A group write of %d items to %s failed (%s); writing them one by one", len(group),
                               self.name or "the database", exc)
                for e in group:
                    try:
                        self._call([e.item])
                    except BaseException as own:  # noqa: BLE001
                        e.error = own
        for e in group:
            e.written = True

    def _call(self, items: list[T]) -> None:
        with self._lock:
            self.stats["items"] += len(items)
            self.stats["writes"] += 1
        self._write(items)
