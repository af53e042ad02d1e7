"""What a server's process tree uses, read from Linux ``/proc``: its CPU time, and how the open TCP
connections to its port are spread over its worker processes.

Both return ``None`` (or nothing) where there is no ``/proc``; the benchmark then leaves the figure out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ConnectionSampler", "established_inodes", "process_tree_cpu_s", "worker_connections"]

#: ``st`` of an established connection in ``/proc/net/tcp`` (hexadecimal ``TCP_ESTABLISHED``).
_ESTABLISHED = "01"


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


def established_inodes(port: int) -> set[int]:
    """Socket inodes of the established TCP connections (IPv4 and IPv6) whose local port is ``port``:
    the server's ends of its clients' connections."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split()
                    # sl, local_address (ADDR:PORT in hex), rem_address, st, tx:rx, tr:when, retrnsmt, uid,
                    # timeout, inode
                    if len(fields) > 9 and fields[3] == _ESTABLISHED and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(int(fields[9]))
        except OSError:
            continue
    return inodes


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
    open_now = established_inodes(port)
    counts = [len(_socket_inodes(p) & open_now) for p in _descendants(pid, table[0])]
    return sorted((c for c in counts if c), reverse=True)


class ConnectionSampler:
    """Samples :func:`worker_connections` in a thread every ``interval`` seconds while a load runs, and
    keeps the first sample in which ``expected`` connections (the load's concurrency) are all open:
    how the load's keep-alive connections were dealt out to the workers."""

    def __init__(self, pid: int, port: int, expected: int, interval: float = 0.2) -> None:
        self.pid, self.port, self.expected, self.interval = pid, port, expected, interval
        self.spread: list[int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            counts = worker_connections(self.pid, self.port)
            if counts is None:
                return
            if sum(counts) == self.expected:
                self.spread = counts
                return

    @contextmanager
    def running(self) -> Iterator[ConnectionSampler]:
        """Sample while the ``with`` body runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5 + self.interval)

