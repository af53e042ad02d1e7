"""Evening out keep-alive connections over ``sameguard serve --workers N``'s worker processes (Linux).

With a listening socket per worker (``SO_REUSEPORT``), the kernel hashes each new connection to one
worker at random, and a keep-alive connection then stays with that worker for its life: 16
connections opened together split 8/8 only one time in five, and 10/6 or worse almost one time in
two (binomial). The busier worker's clients queue longer, which is what a tail latency shows.

A :class:`ConnectionBalancer` runs in each worker. Every ``interval`` seconds it compares the
connections its worker holds with its fair share of all the connections established to the port
(``ceil(total / workers)``, read from ``/proc/net/tcp``), and when it holds more it answers that many
of its next responses with ``Connection: close`` (RFC 9112, section 9.6: a server may close a
persistent connection after any response). Those clients open a new connection, which the kernel
hashes again, so the spread drifts toward even while a fair worker never sheds. Nothing is shared
between the workers: each reads the port's total from the kernel and knows its own count.

The service's middleware asks :func:`should_close` once per response; outside such a worker (one
process, tests, the in-process benchmark) no balancer is installed and it answers ``False``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["WORKER_SOCKETS", "WORKER_SOCKETS_ENV", "ConnectionBalancer", "established_inodes", "established_on_port",
           "install", "installed", "should_close", "uninstall"]

#: ``serve --worker-sockets`` choices, the default first: ``balanced`` (a listening socket per worker, and
#: each worker sheds the connections it holds beyond its share), ``reuse-port`` (a socket per worker, the
#: kernel's hash alone), ``shared`` (uvicorn's one socket, which all workers accept from).
WORKER_SOCKETS = ("balanced", "reuse-port", "shared")
#: How a worker learns the choice: ``run_workers`` sets it in the environment the workers inherit.
WORKER_SOCKETS_ENV = "SAMEGUARD_WORKER_SOCKETS"

#: ``st`` of an established connection in ``/proc/net/tcp`` (hexadecimal ``TCP_ESTABLISHED``).
_ESTABLISHED = "01"


def _established_rows(port: int) -> list[int] | None:
    """The inode of each established TCP connection (IPv4 and IPv6) whose local port is ``port``: the server
    ends of its clients' connections, whichever process holds them (the clients' own ends have ephemeral
    local ports); 0 for a connection still in a listening socket's accept queue (no process holds it yet).
    ``None`` where ``/proc/net/tcp`` cannot be read."""
    rows: list[int] = []
    read_any = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                read_any = True
                next(f, None)  # header
                for line in f:
                    # sl, local_address (ADDR:PORT in hex), rem_address, st, tx:rx, tr:when, retrnsmt, uid,
                    # timeout, inode
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _ESTABLISHED and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        rows.append(int(fields[9]))
        except OSError:
            continue
    return rows if read_any else None


def established_inodes(port: int) -> set[int] | None:
    """Socket inodes of the established connections to ``port`` that a process holds (accepted ones), to
    match against ``/proc/<pid>/fd``; ``None`` where ``/proc/net/tcp`` cannot be read."""
    rows = _established_rows(port)
    return None if rows is None else {inode for inode in rows if inode}


def established_on_port(port: int) -> int | None:
    """Established connections to ``port``, accepted or still queued (``None``: unknown)."""
    rows = _established_rows(port)
    return None if rows is None else len(rows)


class ConnectionBalancer:
    """One worker's share of the port's connections, kept near ``ceil(total / workers)``.

    Args:
        port: the port every worker listens on.
        workers: how many workers share it (``serve --workers N``).
        own_connections: the connections this worker holds now (uvicorn's ``server_state.connections``).
        interval: seconds between looks (each reads ``/proc/net/tcp`` once).
        total_connections: ``port -> established connections`` (default :func:`established_on_port`;
            tests pass their own).
    """

    def __init__(self, port: int, workers: int, own_connections: Callable[[], int], *, interval: float = 1.0,
                 total_connections: Callable[[int], int | None] = established_on_port) -> None:
        if workers < 2:
            raise ValueError(f"A connection balancer needs at least 2 workers, got {workers}.")
        if not interval > 0:
            raise ValueError(f"interval must be positive seconds, got {interval!r}.")
        self.port, self.workers, self.interval = int(port), int(workers), float(interval)
        self._own, self._total = own_connections, total_connections
        self._budget = 0  # responses still to close
        self.closed = 0  # responses answered with Connection: close so far
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def excess(self) -> int:
        """Connections this worker holds beyond its fair share now (0 when fair, or when unknown)."""
        total = self._total(self.port)
        if not total:
            return 0
        return max(0, int(self._own()) - math.ceil(total / self.workers))

    def rebalance(self) -> int:
        """Look once: set how many of the next responses close their connection; returns that number."""
        excess = self.excess()
        with self._lock:
            self._budget = excess
        if excess:
            logger.debug("Worker holds %d connection(s) over its share of port %d: closing them after their "
                         "next response.", excess, self.port)
        return excess

    def take(self) -> bool:
        """Per response: whether to close its connection after it (using up one unit of the budget)."""
        if self._budget <= 0:  # the common case, without the lock
            return False
        with self._lock:
            if self._budget <= 0:
                return False
            self._budget -= 1
            self.closed += 1
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.rebalance()
            except Exception:  # a look that fails must not stop the worker; the next one tries again
                logger.exception("Connection balancing failed; trying again in %.1f s.", self.interval)

    def start(self) -> ConnectionBalancer:
        """Look every ``interval`` seconds in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="connection-balancer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop looking (the budget already set is kept)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)


_installed: ConnectionBalancer | None = None


def install(balancer: ConnectionBalancer) -> None:
    """Make ``balancer`` the one :func:`should_close` asks (one per worker process)."""
    global _installed
    _installed = balancer


def uninstall() -> None:
    """Remove the installed balancer: :func:`should_close` answers ``False`` again."""
    global _installed
    _installed = None


def installed() -> ConnectionBalancer | None:
    """The balancer :func:`should_close` asks, or ``None``."""
    return _installed


def should_close() -> bool:
    """Whether the response being sent should close its connection (``Connection: close``)."""
    balancer = _installed
    return balancer is not None and balancer.take()
