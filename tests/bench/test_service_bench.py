"""The service benchmark's timing part, for real on loopback, with a tiny untrained victim."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from sameguard.bench.service_bench import measure_service
from sameguard.models import build_classifier
from sameguard.victim import Victim


class _MeanScore:
    """Score = mean pixel value, threshold 0 (the service tests' fake detector, in small)."""

    threshold_ = 0.0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)



def _victim():
    """A LeNet-5 victim with seeded random weights, 28x28x1 images, 10 classes."""
    torch.manual_seed(0)
    return Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="test", image_shape=(1, 28, 28),
                  classes=[str(i) for i in range(10)])

def test_measure_service_rows(tmp_path):
    victim = _victim()
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    lines: list[str] = []
    rows = measure_service(victim, _MeanScore(), images, settings=("off", "monitor"), batch_sizes=(1, 3), requests=5,
                           requests_large=5, concurrency=2, workdir=tmp_path, echo=lines.append)
    assert [(r.setting, r.batch, r.requests, r.errors) for r in rows] == [
        ("off", 1, 5, 0), ("off", 3, 5, 0), ("monitor", 1, 5, 0), ("monitor", 3, 5, 0)]
    assert all(r.p99_ms >= r.p50_ms > 0 and r.images_per_s == pytest.approx(r.requests_per_s * r.batch) for r in rows)
    assert all(r.gc_full is not None and r.gc_full >= 0 for r in rows)  # in process: full collections counted
    assert all(r.cpu_ms_per_request is not None and r.cpu_ms_per_request > 0 for r in rows)  # raw client: server only
    assert all(r.client_cpu_ms_per_request is not None and r.client_cpu_ms_per_request > 0 for r in rows)
    assert len(lines) == 4
    [threaded] = measure_service(victim, None, images, settings=("off",), batch_sizes=(1,), requests=3, concurrency=2,
                                 workdir=tmp_path, load_client="httpx", echo=lines.append)
    assert (threaded.errors, threaded.cpu_ms_per_request) == (0, None)  # its client threads would count too
    assert threaded.client_cpu_ms_per_request is None
    with pytest.raises(ValueError, match="positive"):
        measure_service(victim, None, images, settings=("off",), requests=0)


def test_measure_service_bare_and_batched_rows(tmp_path):
    victim = _victim()
    detector = _MeanScore()
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    rows = measure_service(victim, detector, images, settings=("bare", "monitor-batched"), batch_sizes=(1,),
                           requests=6, requests_large=1, concurrency=3, workdir=tmp_path, echo=lambda _: None)
    assert [(r.setting, r.batch, r.requests, r.errors) for r in rows] == [("bare", 1, 6, 0), ("monitor-batched", 1, 6, 0)]
    assert "logits" not in vars(victim) and "score" not in vars(detector)  # batching undone for the next setting


def test_measure_service_compiled_row_runs_on_compiled_copies(tmp_path, monkeypatch):
    from sameguard.bench import service_bench

    monkeypatch.setattr(service_bench, "COMPILE_BACKEND", "eager")  # inductor's compilation: minutes here
    victim = _victim()
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    rows = measure_service(victim, _MeanScore(), images, settings=("monitor-batched-compiled",), batch_sizes=(1,),
                           requests=6, requests_large=1, concurrency=3, workdir=tmp_path, echo=lambda _: None)
    assert [(r.setting, r.batch, r.requests, r.errors) for r in rows] == [("monitor-batched-compiled", 1, 6, 0)]
    assert victim.model._compiled_call_impl is None  # the copies were compiled, the next settings run eager


def _saved_models(folder):
    """A tiny untrained victim and a barely fitted, calibrated SAME detector saved in ``folder``, as ``serve`` loads them."""
    from sameguard.data.base import ImageDataset
    from sameguard.detectors import SAMEDetector

    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="fashion-mnist",
                    image_shape=(1, 28, 28), classes=[str(i) for i in range(10)])
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    data = ImageDataset("fashion-mnist", "train", x, torch.arange(64) % 10, tuple(str(i) for i in range(10)), False)
    detector = SAMEDetector.from_preset("tiny", mae_epochs=1, aux_epochs=1, seed=0, progress=False).fit(victim, data)
    detector.calibrate(x[:32], 0.05)
    return victim.save(folder / "victim"), detector.save(folder / "same")


@pytest.mark.slow  # two worker processes load torch and the models: ~20 s on a quiet machine
def test_measure_workers_starts_serve_with_redis_and_counts_the_audit(tmp_path, redis_server, caplog):
    import logging
    import re

    import redis

    from sameguard.bench.service_bench import ServiceBenchResult, measure_workers

    victim_dir, detector_dir = _saved_models(tmp_path)
    lines: list[str] = []
    caplog.set_level(logging.INFO, logger="sameguard.bench.service_bench")
    # uvicorn's supervisor with two workers, each with a listening socket of its own (SO_REUSEPORT).
    rows = measure_workers(victim_dir, detector_dir, torch.rand(8, 1, 28, 28) * 2 - 1, workers=(2,),
                           state_url=redis_server.url, requests=160, concurrency=16, workdir=tmp_path,
                           echo=lines.append, startup_timeout=120)
    [row] = rows
    assert (row.setting, row.workers, row.batch, row.requests, row.errors) == ("monitor-batched", 2, 1, 160, 0)
    assert row.p99_ms >= row.p50_ms > 0 and row.answered == row.audit_rows >= 160  # every answered image audited
    # The kernel spread the 16 keep-alive connections over both workers (all on one: probability 2^-15);
    # with the one shared socket of uvicorn's own supervisor, one worker often takes them all.
    assert row.worker_sockets == "balanced" and row.worker_connections is not None
    assert len(row.worker_connections) == 2 and sum(row.worker_connections) == 16
    assert sum(row.worker_connections_last) == 16
    assert "serve --workers 2" in lines[0] and "connections per worker" in lines[0]
    report = ServiceBenchResult(latency=rows).markdown()
    assert "monitor-batched, serve --workers 2 (Redis; connections per worker " in report
    client = redis.Redis.from_url(redis_server.url)
    try:
        [prefix] = re.findall(r"Redis keys under (sgbench:\w+:)", caplog.text)
        assert not list(client.scan_iter(match=prefix + "*", count=1000))  # the row's keys are gone
    finally:
        client.close()


def test_serve_command_per_engine_keeps_urls_off_the_command_line():
    from sameguard.bench.service_bench import LatencyRow, ServiceBenchResult, serve_command

    common = dict(policy="monitor", port=8123, workers=2, prefix="sgbench:x:", threads=1)
    uvicorn = serve_command("v", "d", **common)
    ray = serve_command("v", "d", engine="ray", **common)
    assert uvicorn[uvicorn.index("--workers") + 1] == "2" and "--engine" not in uvicorn
    assert ray[ray.index("--engine") + 1] == "ray" and ray[ray.index("--ray-replicas") + 1] == "2"
    assert ray[ray.index("--ray-replica-cpus") + 1] == "1" and "--workers" not in ray
    for cmd in (uvicorn, ray):
        assert not any("://" in a for a in cmd)  # database and Redis URLs go in the environment
        assert cmd[cmd.index("--state-prefix") + 1] == "sgbench:x:"
    assert "--compile" not in uvicorn and serve_command("v", "d", compile=True, **common)[-1] == "--compile"
    with pytest.raises(ValueError, match="engine"):
        serve_command("v", "d", engine="gunicorn", **common)
    row = dict(setting="monitor-batched", batch=1, requests=8, concurrency=4, seconds=1.0, requests_per_s=8.0,
               images_per_s=8.0, p50_ms=1.0, p99_ms=2.0, errors=0, workers=2)
    text = ServiceBenchResult(latency=[LatencyRow(**row), LatencyRow(**row, engine="ray")]).markdown()
    assert "| monitor-batched, serve --workers 2 (Redis) | 1 | 8 | 8.0 | 8.0 | 1.0 | 2.0 | 0 | - |" in text
    assert "| monitor-batched, serve --engine ray --ray-replicas 2 (Redis) |" in text
    assert "| monitor-batched, serve --workers 2 --compile (Redis) |" in \
        ServiceBenchResult(latency=[LatencyRow(**row, compiled=True)]).markdown()
    # Sockets: a listening socket per worker by default, uvicorn's shared one on request; the spread shown.
    assert uvicorn[uvicorn.index("--worker-sockets") + 1] == "balanced" and "--worker-sockets" not in ray
    shared = serve_command("v", "d", worker_sockets="shared", **common)
    assert shared[shared.index("--worker-sockets") + 1] == "shared"
    with pytest.raises(ValueError, match="worker_sockets"):
        serve_command("v", "d", worker_sockets="round-robin", **common)
    text = ServiceBenchResult(latency=[
        LatencyRow(**row, worker_sockets="shared", worker_connections=[16], worker_connections_last=[16]),
        LatencyRow(**row, worker_sockets="reuse-port", worker_connections=[9, 7], worker_connections_last=[9, 7]),
        LatencyRow(**row, worker_sockets="balanced", worker_connections=[10, 6], worker_connections_last=[8, 8])]
    ).markdown()
    assert "| monitor-batched, serve --workers 2 --worker-sockets shared (Redis; connections per worker 16) |" in text
    assert "| monitor-batched, serve --workers 2 --worker-sockets reuse-port (Redis; connections per worker 9/7) |" \
        in text
    assert "| monitor-batched, serve --workers 2 (Redis; connections per worker 10/6, then 8/8) |" in text


@pytest.mark.slow  # the child process starts a local Ray instance and a Serve replica: ~30-60 s on 2 cores
def test_measure_workers_with_ray_serve_answers_and_audits(tmp_path, redis_server):
    from _servers import require_module
    from sameguard.bench.service_bench import measure_workers

    require_module("ray", "ray")  # skips on a user's machine without Ray; fails under CI=true

    victim_dir, detector_dir = _saved_models(tmp_path)
    lines: list[str] = []
    [row] = measure_workers(victim_dir, detector_dir, torch.rand(8, 1, 28, 28) * 2 - 1, workers=(1,),
                            state_url=redis_server.url, requests=8, concurrency=4, workdir=tmp_path, engine="ray",
                            echo=lines.append, startup_timeout=240)
    assert (row.engine, row.workers, row.requests, row.errors) == ("ray", 1, 8, 0)
    assert row.answered == row.audit_rows >= 8  # every answered image audited, through Ray's proxy
    assert "serve --engine ray --ray-replicas 1" in lines[0]


def test_measure_workers_rejects_bad_arguments(tmp_path):
    from sameguard.bench.service_bench import measure_workers, worker_threads

    images = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="redis://"):
        measure_workers("v", "d", images, state_url="memory://")
    with pytest.raises(ValueError, match="workers must be positive"):
        measure_workers("v", "d", images, workers=(0,))
    with pytest.raises(ValueError, match="positive"):
        measure_workers("v", "d", images, requests=0)
    with pytest.raises(ValueError, match="engine must be one of"):
        measure_workers("v", "d", images, engine="gunicorn")
    assert (worker_threads(1, cpus=2), worker_threads(2, cpus=2), worker_threads(4, cpus=2)) == (2, 1, 1)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_time_requests_counts_failed_connections_as_errors(client):
    from sameguard.bench.service_bench import _time_requests

    latencies, errors, _ = _time_requests(f"http://127.0.0.1:{_closed_port()}", [{}], ["{}"], 5, 2, client)
    assert (len(latencies), errors) == (5, 5)  # no client dies on a refused connection


def test_time_requests_refuses_an_unknown_load_client():
    from sameguard.bench.service_bench import _time_requests

    with pytest.raises(ValueError, match="load_client must be one of raw, httpx"):
        _time_requests("http://127.0.0.1:1", [{}], ["{}"], 1, 1, "wrk")


def test_measure_workers_unreachable_redis_is_one_sentence_without_the_password(tmp_path):
    from sameguard.bench.service_bench import measure_workers

    with pytest.raises(ValueError, match="Cannot reach the Redis state store") as info:
        measure_workers("v", "d", torch.zeros(2, 1, 28, 28), state_url=f"redis://:hunter2@127.0.0.1:{_closed_port()}/0",
                        workdir=tmp_path)
    assert "hunter2" not in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing started or written


def test_measure_service_alarms_row_runs_the_alarms_batched(tmp_path):
    victim = _victim()
    detector = _MeanScore()
    images = torch.rand(40, 1, 28, 28) * 2 - 1
    rows = measure_service(victim, detector, images, settings=("alarms-batched",), batch_sizes=(1,), requests=6,
                           requests_large=1, concurrency=3, workdir=tmp_path, echo=lambda _: None)
    assert [(r.setting, r.batch, r.requests, r.errors) for r in rows] == [("alarms-batched", 1, 6, 0)]
    assert "logits" not in vars(victim) and "score" not in vars(detector)  # batching undone for the next setting
    from sqlalchemy import create_engine, select

    from sameguard.service.db import audit_log

    engine = create_engine(f"sqlite:///{next(tmp_path.glob('service-bench-*')) / 'audit-alarms-batched.db'}")
    with engine.connect() as conn:  # every answered query was audited, with the client's evidence
        evidence = conn.execute(select(audit_log.c.evidence)).scalars().all()
    engine.dispose()
    assert len(evidence) == 2 + 6 and all(e is not None for e in evidence)


def test_measure_service_spreads_the_load_over_several_api_keys(tmp_path):
    """--keys N: client thread i sends with key i mod N, so the audit holds several clients (rate limits and
    the per-client alarms see them apart; a thread that found no request left sends nothing); the warm-up's
    two requests go with the first key."""
    victim = _victim()
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    rows = measure_service(victim, _MeanScore(), images, settings=("monitor",), batch_sizes=(1,), requests=30,
                           requests_large=1, concurrency=3, keys=3, workdir=tmp_path, echo=lambda _: None)
    assert [(r.setting, r.requests, r.errors) for r in rows] == [("monitor", 30, 0)]
    from sqlalchemy import create_engine, func, select

    from sameguard.service.db import audit_log

    engine = create_engine(f"sqlite:///{next(tmp_path.glob('service-bench-*')) / 'audit-monitor.db'}")
    with engine.connect() as conn:
        clients = dict(conn.execute(select(audit_log.c.client, func.count()).group_by(audit_log.c.client)).all())
    engine.dispose()
    assert set(clients) <= {"bench-0", "bench-1", "bench-2"} and len(clients) >= 2
    assert sum(clients.values()) == 2 + 30
    with pytest.raises(ValueError, match="keys"):
        measure_service(victim, None, images, settings=("off",), keys=0)


def test_full_gc_pauses_counts_full_collections_only():
    import gc

    from sameguard.bench.service_bench import LatencyRow, ServiceBenchResult, full_gc_pauses

    with full_gc_pauses() as pauses:
        gc.collect(0)
        gc.collect(1)
        assert pauses == []
        gc.collect()
        gc.collect(2)
    assert len(pauses) == 2 and all(p >= 0 for p in pauses)
    gc.collect()
    assert len(pauses) == 2  # the hook is gone after the with
    row = LatencyRow(setting="monitor", batch=1, requests=8, concurrency=4, seconds=1.0, requests_per_s=8.0,
                     images_per_s=8.0, p50_ms=1.0, p99_ms=2.0, errors=0, gc_full=2, gc_full_max_ms=183.4)
    assert "| monitor | 1 | 8 | 8.0 | 8.0 | 1.0 | 2.0 | 0 | 2 (183) |" in ServiceBenchResult(latency=[row]).markdown()


def test_measure_service_gc_freeze_reaches_the_apps(tmp_path, monkeypatch):
    """The guarded rows' apps are built with the gc_freeze asked for (serve's default: on)."""
    from sameguard import service

    seen = []
    original = service.create_app
    monkeypatch.setattr(service, "create_app", lambda settings, **kw: seen.append(settings.gc_freeze) or
                        original(settings, **kw))
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    for freeze in (True, False):
        measure_service(_victim(), _MeanScore(), images, settings=("monitor",), batch_sizes=(1,), requests=2,
                        requests_large=1, concurrency=1, workdir=tmp_path, gc_freeze=freeze, echo=lambda _: None)
    assert seen == [True, False]
