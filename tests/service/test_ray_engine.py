"""The service as a Ray Serve deployment (``sameguard serve --engine ray``), on a local Ray instance.

One small Ray instance for the whole module (2 CPUs, no dashboard); the service is deployed from
saved artifacts (a tiny seeded LeNet-5 victim and an MSP detector) exactly as the command line
does (:func:`sameguard.service.ray_engine.deploy`), and real HTTP requests go through Ray's proxy:
a prediction is answered and audited in the SQLite database, a request without a key gets 401;
then, with two replicas sharing Redis, a concurrent burst lets B images through in all (not 2B),
and Prometheus' per-replica counters show that both replicas served it.

Ray missing or unable to start: skipped with the reason on a user's machine, failed under
``CI=true``. The command-line checks at the end (missing Ray, refused settings) need no Ray.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx
from sqlalchemy import select

from _servers import concurrent_statuses, require_module, unavailable
from sameguard.service.settings import ServiceSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, kit) -> Path:
    """A saved victim (``victim/``) and a saved, calibrated MSP detector (``msp/``)."""
    from sameguard.detectors.msp import MSPDetector

    root = tmp_path_factory.mktemp("ray-artifacts")
    victim = kit.make_victim()
    victim.save(root / "victim")
    MSPDetector().fit(victim).calibrate(kit.dark(200), 0.05).save(root / "msp")
    return root


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[int]:
    """A local Ray instance (2 CPUs) with Serve's HTTP proxy on a free loopback port (yielded)."""
    require_module("ray", "ray")
    import ray
    from ray import serve

    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=80 * 1024 * 1024, namespace="sameguard-test")
    except Exception as exc:  # noqa: BLE001 - whatever keeps Ray from starting on this machine
        unavailable(f"Ray could not start a local instance ({type(exc).__name__}: {exc})")
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def _settings(artifacts: Path, db: Path, port: int, **overrides) -> ServiceSettings:
    return ServiceSettings(victim=artifacts / "victim", detector=artifacts / "msp", policy="monitor",
                           db_url=f"sqlite:///{db}", engine="ray", host="127.0.0.1", port=port, torch_threads=1,
                           ray_replica_cpus=0.5, key_cache_s=0, **overrides)


def _key(db: Path, name: str = "alice") -> str:
    from sameguard.service.db import init_db, make_engine
    from sameguard.service.keys import KeyStore

    engine = make_engine(f"sqlite:///{db}")
    init_db(engine)
    _, token = KeyStore(engine).create(name)
    engine.dispose()
    return token


def _audit(db: Path) -> list:
    from sameguard.service.db import audit_log, make_engine

    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.client, audit_log.c.request_id, audit_log.c.score)).all()
    engine.dispose()
    return rows


def test_one_replica_answers_audits_and_refuses_unknown_keys(ray_serve, artifacts, tmp_path, kit):
    from sameguard.service.ray_engine import deploy

    db = tmp_path / "audit.db"
    token = _key(db)
    deploy(_settings(artifacts, db, ray_serve), log_level="warning")
    url = f"http://127.0.0.1:{ray_serve}"
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        images = kit.dark(2, seed=3)
        r = http.post("/v1/predict", json={"instances": images.tolist()}, headers={"X-API-Key": token})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["predictions"]) == 2 and all(abs(sum(p) - 1) < 1e-4 for p in body["predictions"])
        # The same answer as the victim in process: the replica serves the saved model.
        expected = kit.make_victim().predict_proba(images)
        assert [max(range(10), key=p.__getitem__) for p in body["predictions"]] == expected.argmax(1).tolist()
        assert http.post("/v1/predict", json={"instances": images.tolist()}).status_code == 401
        refused = http.post("/v1/predict", json={"instances": images.tolist()}, headers={"X-API-Key": "sg_wrong"})
        assert refused.status_code == 401 and "detail" in refused.json()
        assert http.get("/v1/model", headers={"X-API-Key": token}).json()["policy"] == "monitor"
    rows = _audit(db)
    assert len(rows) == 2 and {row.client for row in rows} == {"alice"}
    assert {row.request_id for row in rows} == {body["request_id"]}
    assert all(row.score is not None for row in rows)  # scored by the detector loaded in the replica


def _post_counts(metrics_text: str) -> int:
    """POST requests one replica counted (``sameguard_http_requests_total{method="POST",...}``)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("sameguard_http_requests_total{") and 'method="POST"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_two_replicas_share_the_rate_limit_through_redis(ray_serve, artifacts, tmp_path, kit, redis_server):
    from sameguard.service.ray_engine import deploy

    db = tmp_path / "audit.db"
    token = _key(db)
    burst = 12
    deploy(_settings(artifacts, db, ray_serve, ray_replicas=2, state_url=redis_server.url,
                     state_prefix=redis_server.prefix, rate_burst=burst, rate_per_second=0.05, max_batch=4,
                     request_burst=10_000, request_rate_per_second=10_000), log_level="warning")
    url = f"http://127.0.0.1:{ray_serve}"
    def predict(c: httpx.Client, j: int, k: int) -> int:
        return c.post("/v1/predict", json={"instances": kit.dark(1, seed=100 + 10 * j + k).tolist()}).status_code

    statuses = concurrent_statuses(6, 4, predict, join_timeout=120, base_url=url, timeout=60,
                                   headers={"X-API-Key": token})
    assert len(statuses) == 24
    assert statuses.count(200) == burst and statuses.count(429) == 24 - burst  # B in all across replicas, not 2B
    assert len(_audit(db)) == burst
    # Each replica has its own Prometheus registry, so /metrics (routed to either) shows one replica's
    # POST count. A count strictly between 0 and 24 proves the other replica served the rest; Ray's
    # router may send every /metrics call to the same replica, so seeing one of the two is enough.
    seen: set[int] = set()
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(40):
            seen.add(_post_counts(http.get("/metrics").text))
            if len(seen) == 2:
                break
    assert seen and all(0 < n < 24 for n in seen), seen
    assert len(seen) == 1 or sum(seen) == 24, seen


def test_deployment_options_fixed_and_autoscaling():
    from sameguard.service.ray_engine import deployment_options

    fixed = deployment_options(ServiceSettings(engine="ray", ray_replicas=3, state_url="redis://127.0.0.1:6379/0",
                                               ray_replica_cpus=0.5))
    assert fixed == {"num_replicas": 3, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}}
    auto = deployment_options(ServiceSettings(engine="ray", ray_replicas=2, ray_max_replicas=8,
                                              state_url="redis://127.0.0.1:6379/0", ray_max_ongoing_requests=16))
    assert "num_replicas" not in auto and auto["max_ongoing_requests"] == 16
    assert auto["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 8}


def test_replica_env_makes_paths_absolute_and_shares_one_pow_secret(tmp_path, monkeypatch, artifacts):
    from sameguard.service.ray_engine import replica_env

    monkeypatch.chdir(artifacts)
    env = replica_env(ServiceSettings(victim="victim", detector="msp", db_url="sqlite:///rel.db", engine="ray"))
    assert env["SAMEGUARD_VICTIM"] == str(artifacts / "victim")
    assert env["SAMEGUARD_DETECTOR"] == str(artifacts / "msp")
    assert env["SAMEGUARD_DB_URL"] == f"sqlite:///{artifacts / 'rel.db'}"
    assert len(env["SAMEGUARD_POW_SECRET"]) == 64
    back = ServiceSettings.from_env(environ=env)  # what each replica builds its app from
    assert back.engine == "ray" and back.victim == artifacts / "victim"
    pg = "postgresql+psycopg://u:pw@db/x"
    assert replica_env(ServiceSettings(db_url=pg, pow_secret="s" * 32))["SAMEGUARD_DB_URL"] == pg


def test_serve_engine_ray_without_ray_says_what_to_install(monkeypatch, capsys):
    from sameguard.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--engine", "ray", "--victim", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'sameguard[ray]'" in err, err


def test_require_ray_refuses_a_ray_too_old(monkeypatch):
    pytest.importorskip("ray")
    import ray

    from sameguard.service.commands import MissingDependencyError
    from sameguard.service.ray_engine import require_ray

    require_ray()  # the installed one is recent enough
    monkeypatch.setattr(ray, "__version__", "2.40.0")
    with pytest.raises(MissingDependencyError, match=r"Ray 2\.60 or newer .* found 2\.40\.0: pip install -U"):
        require_ray()


@pytest.mark.parametrize("argv, message", [
    (["--ray-replicas", "2"], "2 Ray Serve replicas need a shared state store"),
    (["--ray-max-replicas", "4"], "4 Ray Serve replicas need a shared state store"),
    (["--workers", "2", "--state", "redis://127.0.0.1:6379/0"], "with the ray engine set the number of Ray Serve"),
    (["--ray-replicas", "3", "--ray-max-replicas", "2", "--state", "redis://127.0.0.1:6379/0"],
     "ray_max_replicas (2) must be at least ray_replicas (3)"),
])
def test_serve_engine_ray_refuses_inconsistent_settings(argv, message, capsys):
    pytest.importorskip("ray")
    from sameguard.cli import main

    assert main(["serve", "--engine", "ray", "--victim", "nowhere", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "shared state store" in message:
        assert "--state redis://" in err
    assert re.search(r"^sameguard serve: error: ", err)


def test_serve_on_a_ray_cluster_does_not_check_the_local_port(monkeypatch):
    """With --ray-address the HTTP proxies run on the cluster's nodes (or are Ray's own, bound to the
    port already): a busy local port is no reason to refuse; without it, it is."""
    import socket

    pytest.importorskip("ray")
    from sameguard.cli import main
    from sameguard.service import commands

    started = []
    monkeypatch.setattr(commands, "_serve_ray", lambda settings, log_level: started.append(settings) or 0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        assert main(["serve", "--engine", "ray", "--ray-address", "auto", "--victim", "nowhere", "--port", port]) == 0
        assert started and started[0].ray_address == "auto"
        assert main(["serve", "--engine", "ray", "--victim", "nowhere", "--port", port]) == 2
    assert len(started) == 1
