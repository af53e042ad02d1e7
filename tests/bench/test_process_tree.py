"""Reading a server's process tree from /proc: CPU time and how its clients' connections are spread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sameguard.bench.process_tree import ConnectionSampler, process_tree_cpu_s, worker_connections
from sameguard.service.connection_balance import established_inodes

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")

#: A server in two processes: the parent accepts one connection, then forks a child that accepts two more;
#: each closes the other's connections, so the parent holds 1 and the child 2. Prints the port, then "ready".
TWO_PROCESS_SERVER = """
import os, socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
print(listener.getsockname()[1], flush=True)
first, _ = listener.accept()
if os.fork() == 0:
    first.close()
    held = [listener.accept()[0] for _ in range(2)]
    print("ready", flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_worker_connections_counts_each_process_of_the_tree():
    server = subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SERVER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    clients: list[socket.socket] = []
    try:
        port = int(server.stdout.readline())
        clients.append(_connect(port))
        time.sleep(0.2)  # the parent accepts the first and forks before the others arrive
        clients += [_connect(port), _connect(port)]
        assert server.stdout.readline().strip() == "ready"
        # The server's ends only: the clients' own ends (ephemeral local ports) are not counted.
        assert len(established_inodes(port)) == 3
        assert worker_connections(server.pid, port) == [2, 1]
        sampler = ConnectionSampler(server.pid, port, expected=3, interval=0.02)
        with sampler.running():
            time.sleep(0.3)
        assert sampler.first == sampler.last == [2, 1]
        missing = ConnectionSampler(server.pid, port, expected=4, interval=0.02)  # never all open: no sample kept
        with missing.running():
            time.sleep(0.1)
        assert missing.first is None and missing.last is None
        for c in clients:
            c.close()
        deadline = time.monotonic() + 10
        while worker_connections(server.pid, port):  # closed by the clients: nothing established any more
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert worker_connections(server.pid, port) is None  # gone


def test_process_tree_cpu_counts_the_children():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while (process_tree_cpu_s(parent.pid) or 0.0) < 0.5:  # the grandchild's busy loop is counted
            assert time.monotonic() < deadline, "the grandchild's CPU time was not counted"
            time.sleep(0.1)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert process_tree_cpu_s(parent.pid) is None  # gone
    assert process_tree_cpu_s(os.getpid()) >= time.process_time() - 0.05
