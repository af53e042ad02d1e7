"""Evening out keep-alive connections over the workers: the share arithmetic, the response header that
sheds a connection, uvicorn closing it, and the kernel's count of a port's connections."""

from __future__ import annotations

import os
import socket
import time

import pytest

from sameguard.service import connection_balance
from sameguard.service.connection_balance import ConnectionBalancer, established_inodes, established_on_port


class Counts:
    """Connections this worker holds, and on the whole port, set by the test."""

    def __init__(self, own: int, total: int | None) -> None:
        self.own, self.total = own, total

    def balancer(self, workers: int = 2, interval: float = 1.0) -> ConnectionBalancer:
        return ConnectionBalancer(8000, workers, lambda: self.own, interval=interval,
                                  total_connections=lambda port: self.total)


@pytest.mark.parametrize(("own", "total", "workers", "excess"), [
    (10, 16, 2, 2),   # 10/6: two over the fair 8
    (9, 16, 2, 1),
    (8, 16, 2, 0),    # fair
    (6, 16, 2, 0),    # under its share: never sheds
    (16, 16, 2, 8),   # every connection on one worker
    (7, 17, 2, 0),    # ceil(17 / 2) = 9
    (10, 17, 2, 1),
    (6, 16, 3, 0),    # ceil(16 / 3) = 6
    (7, 16, 3, 1),
    (5, 0, 2, 0),     # nothing established (yet): no opinion
    (5, None, 2, 0),  # the port's count is unknown (no /proc): no opinion
])
def test_excess_is_what_a_worker_holds_over_its_fair_share(own, total, workers, excess):
    assert Counts(own, total).balancer(workers).excess() == excess


def test_a_rebalance_closes_that_many_of_the_next_responses_then_none():
    counts = Counts(10, 16)
    balancer = counts.balancer()
    assert [balancer.take() for _ in range(3)] == [False] * 3  # nothing before a look
    assert balancer.rebalance() == 2
    assert [balancer.take() for _ in range(4)] == [True, True, False, False]
    assert balancer.closed == 2
    counts.own = 12
    assert balancer.rebalance() == 4  # each look sets the budget afresh, it does not add up
    counts.own = 8
    assert balancer.rebalance() == 0 and not balancer.take()  # fair again: the rest of the budget is dropped
    assert balancer.closed == 2


def test_the_balancer_looks_in_its_thread_until_stopped():
    counts = Counts(11, 16)
    balancer = counts.balancer(interval=0.01).start()
    try:
        deadline = time.monotonic() + 5
        while not balancer.take():
            assert time.monotonic() < deadline, "the thread never set a budget"
            time.sleep(0.01)
    finally:
        balancer.stop()
    assert balancer.closed == 1


def test_the_settings_offer_the_same_socket_kinds():
    from typing import get_args

    from sameguard.service import ServiceSettings

    assert get_args(ServiceSettings.model_fields["worker_sockets"].annotation) == connection_balance.WORKER_SOCKETS
    assert ServiceSettings().worker_sockets == connection_balance.WORKER_SOCKETS[0] == "balanced"


def test_bad_balancer_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2 workers"):
        ConnectionBalancer(8000, 1, lambda: 0)
    with pytest.raises(ValueError, match="interval"):
        ConnectionBalancer(8000, 2, lambda: 0, interval=0)


def test_should_close_asks_the_installed_balancer_only():
    counts = Counts(10, 16)
    balancer = counts.balancer()
    balancer.rebalance()
    assert not connection_balance.should_close()  # none installed: a single process never sheds
    connection_balance.install(balancer)
    try:
        assert connection_balance.installed() is balancer
        assert [connection_balance.should_close() for _ in range(3)] == [True, True, False]
    finally:
        connection_balance.uninstall()
    assert connection_balance.installed() is None


@pytest.mark.skipif(established_on_port(1) is None, reason="needs Linux /proc/net/tcp")
def test_established_connections_on_a_port_are_counted_from_the_kernel():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        assert established_on_port(port) == 0  # a listening socket is not a connection
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            accepted = listener.accept()[0]
            # All three are established, one accepted (held by this process), two still queued (held by none).
            deadline = time.monotonic() + 5
            while established_on_port(port) != 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            [inode] = established_inodes(port)
            assert f"socket:[{inode}]" in {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                                           if os.path.islink(f"/proc/self/fd/{fd}")}
            accepted.close()
        finally:
            for c in clients:
                c.close()


def test_the_service_sheds_a_connection_when_its_balancer_asks(make_app, kit):
    """The responses the balancer picks say ``Connection: close`` and uvicorn closes those connections
    (the client reads the end of the stream); the others stay open; ``/metrics`` counts the shed ones."""
    import httpx

    app, token = make_app("monitor")
    balancer = Counts(10, 16).balancer()
    request = (f"GET /v1/model HTTP/1.1\r\nHost: test\r\nX-API-Key: {token}\r\n\r\n").encode()

    def exchange(url: str) -> tuple[bytes, bool]:
        """One request on a fresh connection: (the response head, whether the server then closed it)."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.settimeout(1.0)
            try:
                closed = conn.recv(1) == b""
            except TimeoutError:  # still open: the server waits for the next request
                closed = False
        assert head.startswith(b"HTTP/1.1 200")
        return head.lower(), closed

    with kit.live(app) as url:
        head, closed = exchange(url)
        assert b"connection: close" not in head and not closed
        connection_balance.install(balancer)
        try:
            balancer.rebalance()  # two over its share
            shed = [exchange(url) for _ in range(3)]
        finally:
            connection_balance.uninstall()
        assert [(b"connection: close" in h, c) for h, c in shed] == [(True, True), (True, True), (False, False)]
        assert balancer.closed == 2
        metrics = httpx.get(url + "/metrics").text
    assert "sameguard_connections_shed_total 2.0" in metrics
