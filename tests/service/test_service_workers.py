"""Several worker processes sharing Redis (state) and one database (keys, audit), for real.

Two independent service processes (``_worker_app.py``) share a Redis key prefix and a PostgreSQL schema,
as two workers behind a load balancer do; the client alternates between them, so every check
crosses workers on purpose: a challenge issued by one is redeemed at the other, exactly once; a
burst of B images lets B through in all; every answered image has its audit row; a revoked key is
refused by both at once. ``sameguard serve --workers N`` refusing the in-memory store is checked
without starting anything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("limits")
import httpx
import torch
from sqlalchemy import func, select

from _servers import concurrent_statuses
from sameguard.actions import solve
from sameguard.service.db import audit_log, init_db, make_engine, pow_events
from sameguard.service.keys import KeyStore
from sameguard.service.server import wait_until_healthy

WORKER = Path(__file__).with_name("_worker_app.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _workers(n: int, policy: str, env: dict[str, str]):
    procs, urls = [], []
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAMEGUARD_")} | env
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"),
                                                           full_env.get("PYTHONPATH")]))
    try:
        for _ in range(n):
            port = _free_port()
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(port), policy], env=full_env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 90
        for proc, url in zip(procs, urls):
            wait_until_healthy(url, proc, deadline - time.monotonic(), what="a worker",
                               exit_detail=lambda p=proc: p.stderr.read().decode()[-2000:])
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _dark(n: int, seed: int) -> list:
    """Benign images (little or no proof-of-work due)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) * 0.8 - 1.0).tolist()


def _bright(n: int, seed: int) -> list:
    """Flagged images: proof-of-work due (202)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) * 0.8 + 0.2).tolist()


def test_two_workers_share_rate_limits_challenges_revocation_and_the_audit(redis_server, postgres_url):
    db_url = postgres_url
    engine = make_engine(db_url)
    init_db(engine)
    _, token = KeyStore(engine).create("alice")
    burst = 24
    env = {"SAMEGUARD_DB_URL": db_url, "SAMEGUARD_STATE_URL": redis_server.url,
           "SAMEGUARD_STATE_PREFIX": redis_server.prefix, "SAMEGUARD_POW_SECRET": "s" * 32,
           "SAMEGUARD_RATE_BURST": str(burst), "SAMEGUARD_RATE_PER_SECOND": "0.05",  # no refill during the test
           "SAMEGUARD_REQUEST_BURST": "10000", "SAMEGUARD_REQUEST_RATE_PER_SECOND": "10000",
           "SAMEGUARD_KEY_CACHE_S": "60", "SAMEGUARD_MAX_BATCH": "8"}
    headers = {"X-API-Key": token}
    with _workers(2, "pow", env) as urls, httpx.Client(headers=headers, timeout=30) as http:
        # Proof-of-work across workers: issued by one, redeemed at the other, once.
        n_pow = 6
        for i in range(n_pow):
            r = http.post(urls[i % 2] + "/v1/predict", json={"instances": _bright(1, i)})
            assert r.status_code == 202, r.text
            ch = r.json()["challenge"]
            body = {"challenge": ch["challenge"], "signature": ch["signature"],
                    "nonce": solve(ch["challenge"], ch["bits"])}
            redeemed = http.post(urls[(i + 1) % 2] + "/v1/pow/redeem", json=body)
            assert redeemed.status_code == 200, redeemed.text
            assert len(redeemed.json()["predictions"]) == 1
            assert [http.post(u + "/v1/pow/redeem", json=body).status_code for u in urls] == [409, 409]
        # A concurrent burst against both workers: B images in all, not 2B.
        def predict(c: httpx.Client, j: int, k: int) -> int:
            return c.post(urls[(j + k) % 2] + "/v1/predict", json={"instances": _dark(1, 100 + 10 * j + k)}).status_code

        statuses = concurrent_statuses(8, 5, predict, join_timeout=60, headers=headers, timeout=30)
        assert len(statuses) == 40
        answered = statuses.count(200) + statuses.count(202)  # a benign image may owe a little work
        assert answered == burst - n_pow
        assert statuses.count(429) == 40 - answered
        # Revocation through the shared store: both workers refuse the key at once (key cache 60 s).
        from sameguard.service.store import RedisServiceStore

        store = RedisServiceStore(redis_server.url, prefix=redis_server.prefix)
        assert KeyStore(engine, cache_s=0, store=store).revoke(name="alice") == 1
        store.close()
        assert [http.get(u + "/v1/model").status_code for u in urls] == [401, 401]
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
        requests = conn.execute(select(func.count(func.distinct(audit_log.c.request_id)))).scalar_one()
        outcomes = dict(conn.execute(select(pow_events.c.outcome, func.count()).group_by(pow_events.c.outcome)).all())
    engine.dispose()
    assert rows == requests == burst  # one audit row per answered image, none lost, none twice
    assert outcomes == {"issued": n_pow + statuses.count(202), "redeemed": n_pow, "replayed": 2 * n_pow}


def test_serve_refuses_several_workers_with_the_in_memory_store(capsys):
    from sameguard.cli import main

    assert main(["serve", "--victim", "nowhere", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 workers need a shared state store" in err and "--state redis://" in err


def test_workers_get_time_to_load_their_models_before_uvicorns_health_check(monkeypatch):
    """uvicorn's supervisor kills a worker that misses its health check (5 s by default); a worker
    still importing torch and loading models on a busy machine must not be killed and restarted."""
    import uvicorn

    from sameguard.service import server

    seen = {}

    def fake_run(app, *, timeout_worker_healthcheck: int = 5, **kwargs):  # uvicorn >= 0.54's keyword
        seen.update(kwargs, timeout_worker_healthcheck=timeout_worker_healthcheck)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    server.run_workers("127.0.0.1", 8123, 2, sockets="shared")  # one shared socket: uvicorn.run as is
    assert seen["workers"] == 2 and seen["factory"] is True
    assert seen["timeout_worker_healthcheck"] == server.WORKER_HEALTHCHECK_SECONDS >= 30


def test_each_worker_gets_a_listening_socket_of_its_own(monkeypatch):
    """With a socket per worker, uvicorn's supervisor runs (health checks, restarts, signals) with no shared
    socket, each worker process it starts is a ReusePortProcess, which binds its own SO_REUSEPORT socket,
    and the workers learn from their environment whether to balance their connections."""
    from uvicorn.supervisors import multiprocess

    from sameguard.service import server

    if not server.reuse_port_available():
        pytest.skip("SO_REUSEPORT spreads connections on Linux only")
    seen = {}

    class FakeSupervisor:
        def __init__(self, config, sockets):
            seen.update(config=config, sockets=sockets)

        def run(self):
            seen["process"] = multiprocess.Process  # the class the supervisor starts its workers with

    monkeypatch.setattr(multiprocess, "Multiprocess", FakeSupervisor)
    monkeypatch.setenv("SAMEGUARD_WORKER_SOCKETS", "")  # restored after the test, which run_workers sets
    monkeypatch.delenv("SAMEGUARD_WORKER_SOCKETS")
    server.run_workers("127.0.0.1", 8123, 2)
    assert seen["sockets"] == [] and seen["process"] is server.ReusePortProcess
    assert os.environ["SAMEGUARD_WORKER_SOCKETS"] == "balanced"
    server.run_workers("127.0.0.1", 8123, 2, sockets="reuse-port")
    assert os.environ["SAMEGUARD_WORKER_SOCKETS"] == "reuse-port"
    with pytest.raises(ValueError, match="sockets"):
        server.run_workers("127.0.0.1", 8123, 2, sockets="round-robin")
    config = seen["config"]
    assert (config.workers, config.port, config.factory) == (2, 8123, True)
    assert config.timeout_worker_healthcheck == server.WORKER_HEALTHCHECK_SECONDS
    assert multiprocess.Process is not server.ReusePortProcess  # restored once the supervisor returns


@pytest.mark.parametrize(("kind", "workers", "balanced"), [("balanced", 2, True), ("reuse-port", 2, False),
                                                         ("balanced", 1, False)])
def test_a_worker_binds_its_own_socket_and_balances_when_asked(monkeypatch, kind, workers, balanced):
    """What a worker process does first (in the child, so here with uvicorn's own worker body replaced):
    bind a listening socket of its own on the port, and with ``balanced`` and several workers install a
    connection balancer that counts this worker's uvicorn connections."""
    import uvicorn
    from uvicorn.supervisors import multiprocess

    from sameguard.service import connection_balance, server

    if not server.reuse_port_available():
        pytest.skip("SO_REUSEPORT spreads connections on Linux only")
    seen = {}
    monkeypatch.setattr(multiprocess.Process, "target", lambda self, sockets=None: seen.update(sockets=sockets))
    monkeypatch.setenv("SAMEGUARD_WORKER_SOCKETS", kind)
    port = _free_port()
    worker = server.ReusePortProcess(uvicorn.Config("sameguard.service.app:create_app", factory=True,
                                                    host="127.0.0.1", port=port, workers=workers), [])
    try:
        worker.target()
        [listener] = seen["sockets"]
        assert listener.getsockname() == ("127.0.0.1", port)
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        balancer = connection_balance.installed()
        assert (balancer is not None) is balanced
        if balanced:
            assert (balancer.port, balancer.workers) == (port, 2)
            assert balancer.excess() == 0  # no connection anywhere yet
            worker.server.server_state.connections.update({object(), object()})  # uvicorn's own count is read
            assert balancer._own() == 2
    finally:
        if connection_balance.installed() is not None:
            connection_balance.installed().stop()
            connection_balance.uninstall()
        for sock in seen.get("sockets") or []:
            sock.close()


def test_reuse_port_sockets_share_a_port_and_both_take_connections():
    from sameguard.service import server

    if not server.reuse_port_available():
        pytest.skip("SO_REUSEPORT spreads connections on Linux only")
    first = server.reuse_port_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = server.reuse_port_socket("127.0.0.1", port)
    clients = []
    try:
        with pytest.raises(OSError), socket.socket() as plain:  # a server without SO_REUSEPORT cannot join
            plain.bind(("127.0.0.1", port))
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
        first.setblocking(False)
        second.setblocking(False)
        taken = []
        for listener in (first, second):
            n = 0
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            taken.append(n)
        # The kernel hashed each connection to one of the two: both got some (all 32 on one: p = 2^-31).
        assert sum(taken) == 32 and min(taken) > 0
    finally:
        for s in (*clients, first, second):
            s.close()


def test_serve_workers_choose_their_sockets(monkeypatch):
    from sameguard.cli import main
    from sameguard.service import commands, server

    seen = {}
    monkeypatch.setattr(commands, "_check_store_and_database", lambda settings: None)
    monkeypatch.setattr(server, "run_workers", lambda *a, **kw: seen.update(kw))
    environ = dict(os.environ)
    try:
        for extra, expected in (([], "balanced"), (["--worker-sockets", "shared"], "shared"),
                                (["--worker-sockets", "reuse-port"], "reuse-port")):
            os.environ.pop("SAMEGUARD_WORKER_SOCKETS", None)  # 'serve --workers' hands its settings on in the environment
            assert main(["serve", "--victim", "v", "--workers", "2", "--state", "redis://127.0.0.1:6379/0", "--port",
                         str(_free_port()), *extra]) == 0
            assert seen["sockets"] == expected
    finally:
        os.environ.clear()
        os.environ.update(environ)
    with pytest.raises(SystemExit):
        main(["serve", "--victim", "v", "--workers", "2", "--worker-sockets", "round-robin"])
