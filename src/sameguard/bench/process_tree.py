"""What a server's process tree uses, read from Linux ``/proc``: its CPU time, and how the open TCP
connections to its port are spread over its worker processes.

Both return ``None`` (or nothing) where there is no ``/proc``; the benchmark then leaves the figure out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..service.connection_balance import established_inodes

__all__ = ["ConnectionSampler", "process_tree_cpu_s", "worker_connections"]


def _process_table() -> tuple[dict[int, int], dict[int, float]] | None:
    """``(ppid of each pid, its user + system CPU seconds)`` of every process, or ``None`` without ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # exited meanwhile
            continue
        parents[int(entry)] = int(fields[1])  # ppid: field 4 of stat
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15
    return parents, cpu


def _descendants(pid: int, parents: dict[int, int]) -> list[int]:
    """``pid`` and every process below it, ``pid`` first."""
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        found.append(p)
        frontier += children.get(p, [])
    return found


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds so far of process ``pid`` and all its descendants (``None`` where there is
    no ``/proc`` or ``pid`` is gone). Processes that already exited are not counted."""
    table = _process_table()
    if table is None or pid not in table[1]:
        return None
    parents, cpu = table
    return sum(cpu[p] for p in _descendants(pid, parents))


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (empty when it is gone or not readable)."""
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def worker_connections(pid: int, port: int) -> list[int] | None:
    """How many established connections to ``port`` each process of ``pid``'s tree holds, most first,
    counting only the processes that hold any (the workers of a server started as ``pid``); ``None``
    without ``/proc`` or when ``pid`` is gone."""
    table = _process_table()
    if table is None or pid not in table[0]:
        return None
    open_now = established_inodes(port) or set()
    counts = [len(_socket_inodes(p) & open_now) for p in _descendants(pid, table[0])]
    return sorted((c for c in counts if c), reverse=True)


class ConnectionSampler:
    """Samples :func:`worker_connections` in a thread every ``interval`` seconds while a load runs, keeping
    the first and the last sample in which ``expected`` connections (the load's concurrency) were all
    open: how the load's keep-alive connections were dealt out to the workers, and how they stood at the
    end (where the workers move connections, :mod:`sameguard.service.connection_balance`)."""

    def __init__(self, pid: int, port: int, expected: int, interval: float = 0.2) -> None:
        self.pid, self.port, self.expected, self.interval = pid, port, expected, interval
        self.first: list[int] | None = None
        self.last: list[int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            counts = worker_connections(self.pid, self.port)
            if counts is None:
                return
            if sum(counts) == self.expected:
                self.first = self.first or counts
                self.last = counts

    @contextmanager
    def running(self) -> Iterator[ConnectionSampler]:
        """Sample while the ``with`` body runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5 + self.interval)
