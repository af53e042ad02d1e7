"""Running the app with uvicorn: in the foreground (``sameguard serve``) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.supervisors import multiprocess

from . import connection_balance
from .connection_balance import WORKER_SOCKETS, WORKER_SOCKETS_ENV, ConnectionBalancer

#: Seconds a worker of ``run_workers`` may take to answer uvicorn's health check (it is loading models).
WORKER_HEALTHCHECK_SECONDS = 60
#: The same with ``serve --compile``: compiling the networks at start-up takes minutes on a busy 2-core machine.
COMPILE_HEALTHCHECK_SECONDS = 900

logger = logging.getLogger(__name__)

__all__ = ["ReusePortProcess", "ServerThread", "reuse_port_available", "reuse_port_socket", "run_server", "run_workers",
           "wait_until_healthy"]


class ServerThread:
    """Serve an ASGI app with uvicorn in a background thread on ``host`` (default ``127.0.0.1``).

    The socket is bound before the thread starts (``port=0`` picks a free port), so :attr:`url` is
    known at once; :meth:`start` waits until uvicorn accepts connections. Use as a context
    manager::

        with ServerThread(app) as server:
            httpx.get(server.url + "/healthz")

    Args:
        app: the ASGI app.
        host: interface to bind; loopback by default.
        port: TCP port, ``0`` for a free one.
        log_level: uvicorn's log level (default ``"warning"``).
        startup_timeout: seconds to wait for the server to start.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 startup_timeout: float = 30.0) -> None:
        self.app = app
        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.startup_timeout = float(startup_timeout)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:
            self._error = exc

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"The server thread stopped during startup: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"The server did not start within {self.startup_timeout:.0f} s.")
            time.sleep(0.02)
        logger.info("Serving on %s", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        try:
            self._sock.close()
        except OSError:  # pragma: no cover
            pass

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until interrupted (one worker process: the guard's state,
    rate limits and proof-of-work challenges live in it)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


def reuse_port_available() -> bool:
    """Whether each worker can have its own listening socket on one port with the kernel spreading new
    connections over them: ``SO_REUSEPORT`` on Linux (other systems either lack it or hand every
    connection to one of the sockets)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuse_port_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``(host, port)`` with ``SO_REUSEPORT``: every worker binds one, and
    Linux hashes each new connection to one of them (only sockets of the same user join the group)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortProcess(multiprocess.Process):
    """A uvicorn worker process that listens on a socket of its own (:func:`reuse_port_socket`) instead
    of the one socket uvicorn's supervisor shares among its workers, and with ``balanced`` sockets runs a
    :class:`~sameguard.service.connection_balance.ConnectionBalancer`. With a shared socket, the worker
    that wakes first accepts every connection then waiting: measured with ``bench-service``'s 16
    keep-alive connections and two workers, one worker held all 16 while the other idled."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # in the child process
        listener = reuse_port_socket(self.config.host, self.config.port, self.config.backlog)
        if self.config.workers > 1 and os.environ.get(WORKER_SOCKETS_ENV, WORKER_SOCKETS[0]) == "balanced":
            server = self.server
            connection_balance.install(ConnectionBalancer(self.config.port, self.config.workers,
                                                          lambda: len(server.server_state.connections)).start())
        super().target([listener])


def run_workers(host: str, port: int, workers: int, log_level: str = "info", *, sockets: str = WORKER_SOCKETS[0],
                healthcheck_s: float = WORKER_HEALTHCHECK_SECONDS) -> None:
    """Serve with ``workers`` uvicorn worker processes, each building its app with
    :func:`~sameguard.service.app.create_app` from the ``SAMEGUARD_*`` environment; until interrupted.

    uvicorn's supervisor starts, watches and restarts the workers. ``sockets`` (one of
    :data:`WORKER_SOCKETS`): with ``balanced`` or ``reuse-port`` (and :func:`reuse_port_available`) each
    worker listens on a socket of its own (:class:`ReusePortProcess`), so the kernel spreads new
    connections over the workers, and with ``balanced`` each worker also sheds the keep-alive connections
    it holds beyond its share (:mod:`.connection_balance`); with ``shared`` they accept from one socket,
    as ``uvicorn --workers N`` does.

    The state (rate limits, challenges, revocations, per-client alarms) must be in a shared store
    (``SAMEGUARD_STATE_URL=redis://...``): :class:`~sameguard.service.settings.ServiceSettings`
    refuses more than one worker with the in-memory store. ``healthcheck_s``: how long a starting
    worker may take to answer uvicorn's health check.
    """
    # A worker answers uvicorn's health check only once its app is built (torch imported, models loaded): on
    # a busy machine that takes longer than uvicorn's 5 s default, and the supervisor would kill and restart
    # loading workers for ever.
    options: dict[str, Any] = {"timeout_worker_healthcheck": healthcheck_s}
    if sockets not in WORKER_SOCKETS:
        raise ValueError(f"sockets must be one of {list(WORKER_SOCKETS)}, got {sockets!r}.")
    reuse_port = sockets != "shared"
    if reuse_port and not reuse_port_available():
        logger.warning("SO_REUSEPORT does not spread connections on %s: the %d workers share one socket.",
                       sys.platform, workers)
        reuse_port = False
    if not reuse_port:
        uvicorn.run("sameguard.service.app:create_app", factory=True, host=host, port=port, workers=int(workers),
                    log_level=log_level, **options)
        return
    os.environ[WORKER_SOCKETS_ENV] = sockets  # the workers inherit it
    config = uvicorn.Config("sameguard.service.app:create_app", factory=True, host=host, port=port,
                            workers=int(workers), log_level=log_level, **options)
    # uvicorn's supervisor names its process class at each (re)start; ours differs only in the socket
    # it hands the server, so the supervisor's start, health checks, restarts and signals stay uvicorn's.
    uvicorn_process, multiprocess.Process = multiprocess.Process, ReusePortProcess
    try:
        multiprocess.Multiprocess(config, sockets=[]).run()
    finally:
        multiprocess.Process = uvicorn_process


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float, *,
                       exit_detail: Callable[[], str] = lambda: "", what: str = "sameguard serve",
                       timeout_hint: str = "") -> None:
    """Wait until the server process ``proc`` answers ``GET url/healthz`` with 200.

    Raises:
        RuntimeError: ``proc`` exited first (the message ends with ``exit_detail()``, e.g. its log's tail).
        TimeoutError: no answer within ``timeout`` seconds (the message ends with ``timeout_hint``).
    """
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during startup: {exit_detail()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer {url}/healthz within {timeout:.0f} s{timeout_hint}")
        time.sleep(0.2)
