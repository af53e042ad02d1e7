"""Benchmark of the protected service: throughput and latency over HTTP, and the actions against attacks.

Part 1 (**service**): the FastAPI app served by uvicorn on ``127.0.0.1`` (one worker, in a
thread of this process) is sent a bounded number of ``POST /v1/predict`` requests (base64
float32 bodies, benign test images) by ``concurrency`` concurrent clients (the light load generator of
:mod:`sameguard.bench.load_client` in a child process, or client threads of this process with
``load_client="httpx"``), for each service setting
(``off``: the bare victim, no scoring; ``monitor``/``reject``/``misinformation``: the guard
scores every query with the detector) and batch size. Reported: requests per second, images per
second, and the p50 / p99 latency of a request as the client sees it (including the audit-log
write), and the server's CPU time per request. Rate limits are set out of the way.

Part 2 (**attacks**): the extraction attacks of :mod:`sameguard.attacks` (Knockoff Nets,
Orekondy et al. 2019; JBDA, Papernot et al. 2017) are run in process through the
:class:`~sameguard.guard.Guard` (a :class:`~sameguard.prediction_api.PredictionAPI`) with no defense
(``monitor``: answers unchanged), ``reject`` and ``misinformation`` (Kariyappa & Qureshi 2020,
training-free misleading vector), the detector's threshold calibrated at ``target_fpr`` (1 %)
on benign test images. Reported: the substitute's accuracy and fidelity on held-out test images,
the fraction of the attack's queries flagged, and the accuracy benign users still get on other
test images (a refused answer counts as wrong).

Part 1b (**workers**, optional): the real server, ``sameguard serve --workers N --state
redis://...`` in a child process (N uvicorn worker processes, each with a listening socket of its own
unless ``worker_sockets`` says ``shared``; rate limits and
challenges in Redis under a key prefix of this run, deleted afterwards), is timed the same way with
guarded (``monitor``, dynamic batching as ``serve`` does) single-image requests, for each N; the
audit rows are counted afterwards (every answered image must have its row).

Benchmarks are not tests: the numbers are measured here and now, on this machine.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..compilation import DEFAULT_BACKEND
from ..service.connection_balance import WORKER_SOCKETS
from .load_client import LOAD_CLIENTS, time_requests
from .process_tree import ConnectionSampler, process_tree_cpu_s

logger = logging.getLogger(__name__)

__all__ = ["LatencyRow", "AttackRow", "ServiceBenchResult", "measure_service", "measure_workers", "measure_attacks",
           "run_service_bench", "SERVICE_SETTINGS", "DEFAULT_WORKERS_STATE"]

#: Service settings the latency part knows. ``bare``: the smallest FastAPI endpoint serving the same
#: victim (no key, no limits, no audit, no guard), the reference; ``monitor-batched``: ``monitor`` with
#: dynamic batching of concurrent requests (:mod:`sameguard.service.batching`, as ``sameguard serve`` does).
#: ``monitor-batched-compiled``: ``monitor-batched`` on copies of the models whose networks are compiled
#: (:func:`sameguard.compilation.compile_networks`, as ``sameguard serve --compile`` does), before the timing.
#: ``alarms-batched``: ``monitor-batched`` with per-client alarms (SAME, MSP, Energy and the stream test,
#: state in memory) calibrated on the images sent (a timing setting: those are not held-out images).
SERVICE_SETTINGS = ("bare", "off", "monitor", "monitor-batched", "monitor-batched-compiled", "alarms-batched", "reject",
                    "misinformation")
#: Dynamic batching of ``monitor-batched``: at most this many images, this long a wait.
BENCH_BATCH_MAX, BENCH_BATCH_WAIT_S = 64, 0.002
#: ``torch.compile`` backend of ``monitor-batched-compiled``: ``serve --compile``'s default.
COMPILE_BACKEND = DEFAULT_BACKEND
#: Redis of the worker rows (each row uses its own key prefix, deleted afterwards).
DEFAULT_WORKERS_STATE = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class LatencyRow:
    """One (setting, batch size) of the service part. Latencies in milliseconds."""

    setting: str
    batch: int
    requests: int
    concurrency: int
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: ``None``: the app in a uvicorn thread of this process; ``N``: ``sameguard serve --workers N`` (Redis state),
    #: or N Ray Serve replicas with ``engine="ray"``.
    workers: int | None = None
    #: worker rows: ``"uvicorn"`` (``serve --workers N``) or ``"ray"`` (``serve --engine ray --ray-replicas N``).
    engine: str = "uvicorn"
    #: worker rows: audit rows found for the run's client afterwards (answered images, warm-up included).
    audit_rows: int | None = None
    #: worker rows: images answered with 200 (warm-up included), what ``audit_rows`` must equal.
    answered: int | None = None
    #: worker rows: the server ran with ``--compile`` (networks compiled at start-up).
    compiled: bool = False
    #: in-process rows: full (generation 2) garbage collections of this process during the timed requests,
    #: and the longest in milliseconds (every thread stops while one runs); ``None`` for worker rows.
    gc_full: int | None = None
    gc_full_max_ms: float | None = None
    #: the server's CPU time per timed request in milliseconds, all its threads and processes (user + system):
    #: in-process rows, this process's (measured only with the ``raw`` load client, which runs in a child);
    #: worker rows, the server's process tree (Linux ``/proc``). ``None`` where it cannot be measured.
    #: Steadier than requests/s on a shared machine: it does not grow while other processes hold the cores.
    cpu_ms_per_request: float | None = None
    #: the ``raw`` load generator's own CPU time per timed request in milliseconds (its child process, from the
    #: resource usage of reaped children); ``None`` with the ``httpx`` client threads or without ``resource``.
    client_cpu_ms_per_request: float | None = None
    #: ``serve --workers N`` rows with ``N > 1``: ``serve --worker-sockets``, one of
    #: :data:`~sameguard.service.connection_balance.WORKER_SOCKETS`; ``None`` for the other rows.
    worker_sockets: str | None = None
    #: ``serve --workers N`` rows: how the timed load's keep-alive connections were spread over the worker
    #: processes, most first (e.g. ``[9, 7]``; a worker with none is not listed), sampled from ``/proc`` while
    #: all were open: the first such sample and the last (they differ where the workers moved connections);
    #: ``None`` where that could not be read.
    worker_connections: list[int] | None = None
    worker_connections_last: list[int] | None = None


@dataclass(frozen=True)
class AttackRow:
    """One (defense, attack) of the attack part; accuracies and rates in ``[0, 1]``."""

    defense: str
    attack: str
    budget: int
    substitute_accuracy: float | None
    fidelity: float | None
    attack_flagged: float
    benign_accuracy: float
    benign_flagged: float
    seconds: float


@dataclass
class ServiceBenchResult:
    """Both parts' rows, the configuration, and the Markdown report."""

    latency: list[LatencyRow] = field(default_factory=list)
    attacks: list[AttackRow] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "latency": [asdict(r) for r in self.latency],
                "attacks": [asdict(r) for r in self.attacks], "notes": self.notes}

    def markdown(self) -> str:
        c = self.config
        lines = []
        if self.latency:
            keys = c.get("keys", 1)
            clients = ("client threads" if c.get("load_client") == "httpx" else
                       "clients (raw load client)" if c.get("load_client") == "raw" else "clients")
            lines += [f"### Service throughput and latency (uvicorn, 127.0.0.1, {c.get('concurrency')} {clients}, "
                      f"{keys} API key{'s' if keys != 1 else ''} in process, "
                      f"{c.get('cpus')} CPUs, torch threads {c.get('torch_threads')}"
                      f"{'' if c.get('gc_freeze', True) else ', start-up objects not frozen for the GC'})", "",
                      ("| setting | batch | requests | req/s | images/s | p50 ms | p99 ms | errors | full GCs (longest ms) "
                       "| server CPU ms / request | load client CPU ms / request |"),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in self.latency:
                setting = r.setting if r.workers is None else \
                    f"{r.setting}, {server_label(r.engine, r.workers, r.compiled, r.worker_sockets)} (Redis" + \
                    _spread_text(r) + ")"
                lines.append(f"| {setting} | {r.batch} | {r.requests} | {r.requests_per_s:.1f} | {r.images_per_s:.1f} "
                             f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {_gc_cell(r)} "
                             f"| {_ms_cell(r.cpu_ms_per_request)} | {_ms_cell(r.client_cpu_ms_per_request)} |")
            lines.append("")
        if self.attacks:
            fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
            lines += [f"### Attacks through the guard (threshold at {100 * c.get('target_fpr', 0):.0f} % benign FPR, "
                      f"budget {c.get('budget')} queries)", "",
                      f"Victim test accuracy: {fmt(c.get('victim_accuracy'))} %. Accuracies and rates in %.", "",
                      "| defense | attack | substitute acc | fidelity | attack queries flagged | benign acc | "
                      "benign flagged |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for r in self.attacks:
                lines.append(f"| {r.defense} | {r.attack} | {fmt(r.substitute_accuracy)} | {fmt(r.fidelity)} | "
                             f"{fmt(r.attack_flagged)} | {fmt(r.benign_accuracy)} | {fmt(r.benign_flagged)} |")
            lines.append("")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in ``[0, 100]`` of ``values`` (non-empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _guard_for(setting: str, victim: Any, detector: Any, images: torch.Tensor | None = None) -> Any:
    from ..actions import Misinformation, Policy
    from ..guard import Guard

    if setting == "off":
        return Guard(victim, None, "monitor", keep_decisions=0)
    if setting not in SERVICE_SETTINGS or setting == "bare":
        raise ValueError(f"Unknown service setting {setting!r}; choose from {SERVICE_SETTINGS}.")
    if setting == "alarms-batched":
        from ..alarms import ClientAlarms
        from ..detectors import EnergyDetector, MSPDetector
        from ..service.batching import batch_guard

        if images is None:
            raise ValueError("The alarms-batched setting calibrates its alarms on the images sent: pass images.")
        scorers = {"SAME": detector, "MSP": MSPDetector().fit(victim), "Energy": EnergyDetector().fit(victim)}
        alarms = ClientAlarms.calibrate(victim, scorers, images, delta=1e-3, stream=True)
        guard = Guard(victim, detector, "monitor", alarms=alarms, keep_decisions=0)
        batch_guard(guard, max_batch=BENCH_BATCH_MAX, max_wait_s=BENCH_BATCH_WAIT_S)
        return guard
    if setting in ("monitor-batched", "monitor-batched-compiled"):
        from ..service.batching import batch_guard

        if setting == "monitor-batched-compiled":  # on copies: the next settings run the eager models
            from ..compilation import compile_networks

            victim, detector = copy.deepcopy((victim, detector))  # one copy: the detector's victim is the copy
            compile_networks(victim, [detector], backend=COMPILE_BACKEND)
        guard = Guard(victim, detector, "monitor", keep_decisions=0)
        batch_guard(guard, max_batch=BENCH_BATCH_MAX, max_wait_s=BENCH_BATCH_WAIT_S)
        return guard
    policy = Policy(Misinformation()) if setting == "misinformation" else Policy(setting)
    return Guard(victim, detector, policy, keep_decisions=0)


def bare_app(victim: Any) -> Any:
    """The smallest FastAPI app serving ``victim``: ``POST /v1/predict`` with ``{"b64", "shape"}`` -> probabilities.

    No API key, rate limit, audit log, validation beyond the shape, or guard: the reference the
    service's overhead is measured against.
    """
    import base64

    import numpy as np
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI()

    async def predict(request: Any) -> JSONResponse:
        body = await request.json()
        x = torch.from_numpy(np.frombuffer(base64.b64decode(body["b64"]), dtype="<f4").reshape(body["shape"]).copy())
        probs = await run_in_threadpool(victim.predict_proba, x)
        return JSONResponse({"predictions": probs.tolist()})

    app.add_route("/v1/predict", predict, methods=["POST"])  # a plain route: no parameter parsing either
    return app


def measure_service(victim: Any, detector: Any, images: torch.Tensor, *, settings: Sequence[str] = ("off", "monitor"),
                    batch_sizes: Sequence[int] = (1, 64), requests: int = 200, requests_large: int = 30,
                    concurrency: int = 4, keys: int = 1, workdir: Path | None = None, gc_freeze: bool = True,
                    load_client: str = "raw", echo: Callable[[str], None] = logger.info) -> list[LatencyRow]:
    """Time the HTTP service (see the module docstring); returns one row per (setting, batch size).

    Args:
        victim, detector: the models (``detector`` may be ``None`` when only ``"off"`` is timed).
        images: ``(M, C, H, W)`` benign images in ``[-1, 1]`` to send (cycled).
        settings: service settings among :data:`SERVICE_SETTINGS`.
        batch_sizes: images per request.
        requests: requests per setting at batch sizes ``<= 8``; ``requests_large`` above.
        concurrency: client threads.
        keys: API keys the client threads send with (thread ``i`` uses key ``i mod keys``): each key is
            a client of its own for the rate limits and the per-client alarms (default 1: one client).
        workdir: where the throw-away audit databases go (default: a temporary folder).
        gc_freeze: the guarded apps freeze their start-up objects for the garbage collector (the service's
            default, ``ServiceSettings.gc_freeze``); ``False``: as ``serve --no-gc-freeze``.
        load_client: the load generator, one of :data:`LOAD_CLIENTS` (the warm-up requests go through
            ``httpx`` either way).
    """
    import httpx

    from ..service import ServerThread

    if requests < 1 or requests_large < 1 or concurrency < 1 or keys < 1:
        raise ValueError("requests, requests_large, concurrency and keys must be positive integers.")
    _check_load_client(load_client)
    rows: list[LatencyRow] = []
    base = Path(tempfile.mkdtemp(prefix="service-bench-", dir=workdir))
    payloads = {b: _payloads(images, b) for b in batch_sizes}
    for setting in settings:
        if setting == "bare":
            app, tokens = bare_app(victim), ["-"]
        else:
            app, tokens = _bench_app(setting, victim, detector, base / f"audit-{setting}.db", images, batch_sizes, keys,
                                     gc_freeze)
        headers = [{"X-API-Key": token, "content-type": "application/json"} for token in tokens]
        with ServerThread(app) as server:
            for b in batch_sizes:
                n_requests = requests if b <= 8 else requests_large
                with httpx.Client(base_url=server.url, headers=headers[0], timeout=120) as warm:
                    for body in payloads[b][:2]:
                        warm.post("/v1/predict", content=body).raise_for_status()
                with full_gc_pauses() as pauses:
                    cpu, client_cpu = time.process_time(), _children_cpu_s()
                    latencies, errors, wall = _time_requests(server.url, headers, payloads[b], n_requests, concurrency,
                                                             load_client)
                    cpu, client_cpu = time.process_time() - cpu, _cpu_delta(client_cpu, _children_cpu_s())
                row = LatencyRow(setting=setting, batch=b, requests=n_requests, concurrency=concurrency,
                                 seconds=wall, requests_per_s=n_requests / wall, images_per_s=n_requests * b / wall,
                                 p50_ms=1000 * statistics.median(latencies), p99_ms=1000 * _percentile(latencies, 99),
                                 errors=errors, gc_full=len(pauses), gc_full_max_ms=max(pauses, default=0.0),
                                 cpu_ms_per_request=1000 * cpu / n_requests if load_client == "raw" else None,
                                 client_cpu_ms_per_request=_per_request_ms(client_cpu, n_requests, load_client))
                rows.append(row)
                echo(f"service {setting:<15} batch {b:>3}: {row.requests_per_s:7.1f} req/s, {row.images_per_s:8.1f} img/s, "
                     f"p50 {row.p50_ms:6.1f} ms, p99 {row.p99_ms:6.1f} ms, errors {row.errors}")
        if setting != "bare":
            from ..service.batching import unbatch_guard

            unbatch_guard(app.state.sameguard.guard)  # the models are shared by the next settings
            app.state.sameguard.audit.engine.dispose()
    return rows


@contextmanager
def full_gc_pauses() -> Iterator[list[float]]:
    """The milliseconds of each full (generation 2) garbage collection of this process inside the ``with``,
    appended to the yielded list as they end (:class:`~sameguard.service.gc_pauses.GCPauseTimer`)."""
    from ..service.gc_pauses import GCPauseTimer

    pauses: list[float] = []

    def full(generation: int, seconds: float) -> None:
        if generation == 2:
            pauses.append(1000 * seconds)

    with GCPauseTimer(full):
        yield pauses


def _gc_cell(row: LatencyRow) -> str:
    return "-" if row.gc_full is None else f"{row.gc_full} ({row.gc_full_max_ms or 0:.0f})"


def _payloads(images: torch.Tensor, batch: int, count: int = 4) -> list[str]:
    """``count`` different JSON bodies of ``batch`` images each (base64 float32), to cycle through."""
    import base64

    bodies = []
    for i in range(count):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(images)
        data = images[idx].contiguous().numpy().astype("<f4").tobytes()
        bodies.append(json.dumps({"b64": base64.b64encode(data).decode(), "shape": [batch, *images.shape[1:]]}))
    return bodies


def _bench_app(setting: str, victim: Any, detector: Any, db_path: Path, images: torch.Tensor,
               batch_sizes: Sequence[int], keys: int = 1, gc_freeze: bool = True) -> tuple[Any, list[str]]:
    """The service app for one setting (its own audit database, limits out of the way) and ``keys`` API keys
    for it (clients ``bench``, or ``bench-0``, ``bench-1``, ... with several)."""
    from ..service import ServiceSettings, create_app

    svc = ServiceSettings(db_url=f"sqlite:///{db_path}", rate_per_second=1e9,
                          rate_burst=10 ** 9, request_rate_per_second=1e9, request_burst=10 ** 9,
                          max_batch=max(batch_sizes), key_cache_s=60, gc_freeze=gc_freeze,
                          max_request_bytes=max(8 * 1024 * 1024, 4 * max(batch_sizes) * images[0].numel() * 2))
    app = create_app(svc, guard=_guard_for(setting, victim, detector, images))
    names = ["bench"] if keys == 1 else [f"bench-{i}" for i in range(keys)]
    return app, [app.state.sameguard.keys.create(name)[1] for name in names]


def _time_requests(url: str, headers: Sequence[Mapping[str, str]], bodies: Sequence[str], n_requests: int,
                   concurrency: int, load_client: str = "raw") -> tuple[list[float], int, float]:
    """Send ``n_requests`` bodies (cycled) from ``concurrency`` clients, client ``i`` with ``headers[i mod
    len(headers)]`` (one API key per client); (latencies in s, non-200 answers or failed requests, wall s).
    ``load_client``: one of :data:`LOAD_CLIENTS`."""
    _check_load_client(load_client)
    if load_client == "raw":
        return time_requests(url, headers, bodies, n_requests, concurrency)
    import httpx

    latencies: list[float] = []
    errors = [0]
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def worker(own: Mapping[str, str]) -> None:
        with httpx.Client(base_url=url, headers=dict(own), timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    ok = client.post("/v1/predict", content=bodies[i % len(bodies)]).status_code == 200
                except httpx.HTTPError:  # a dropped connection or a timeout is an error, not a dead thread
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += not ok

    threads = [threading.Thread(target=worker, args=(headers[i % len(headers)],)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - start


def _children_cpu_s() -> float | None:
    """User + system CPU seconds of this process's reaped children so far (the ``raw`` load client is one once
    its run returns); ``None`` without :mod:`resource` (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _per_request_ms(client_cpu: float | None, requests: int, load_client: str) -> float | None:
    """The ``raw`` load client's CPU milliseconds per request (``None`` for the ``httpx`` threads)."""
    return None if client_cpu is None or load_client != "raw" else 1000 * client_cpu / requests


def _ms_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _check_load_client(client: str) -> None:
    if client not in LOAD_CLIENTS:
        raise ValueError(f"load_client must be one of {', '.join(LOAD_CLIENTS)}, got {client!r}.")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop ``serve`` (SIGINT: uvicorn's supervisor stops its workers), then its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("serve (pid %d) did not stop within %.0f s: killing its process group", proc.pid, timeout)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def _delete_prefix(state_url: str, prefix: str) -> int:
    """Delete every Redis key under ``prefix``; returns how many."""
    import redis

    client = redis.Redis.from_url(state_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
        return len(keys)
    finally:
        client.close()


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Default torch threads of each of ``workers`` worker processes: the cores shared out, at least 1."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, workers))


#: How a worker row's server is started, per engine (followed by the worker or replica count).
SERVER_OPTIONS = {"uvicorn": "serve --workers", "ray": "serve --engine ray --ray-replicas"}


def server_label(engine: str, n: int, compiled: bool = False, worker_sockets: str | None = None) -> str:
    """How a worker row's server was started, for the report."""
    sockets = f" --worker-sockets {worker_sockets}" if worker_sockets not in (None, WORKER_SOCKETS[0]) else ""
    return f"{SERVER_OPTIONS[engine]} {n}{sockets}" + (" --compile" if compiled else "")


def serve_command(victim_dir: str | os.PathLike, detector_dir: str | os.PathLike, *, policy: str, port: int,
                  workers: int, prefix: str, threads: int, engine: str = "uvicorn", compile: bool = False,
                  worker_sockets: str = WORKER_SOCKETS[0]) -> list[str]:
    """The argv of ``sameguard serve`` for one worker row: ``workers`` uvicorn workers (taking connections as
    ``worker_sockets`` says), or as many Ray Serve replicas (one CPU reserved each, on a local Ray instance)
    with ``engine="ray"``; rate limits out of the way; no URL with a password in it (those go in the
    environment). ``compile``: ``serve --compile``."""
    if engine not in SERVER_OPTIONS:
        raise ValueError(f"engine must be one of {sorted(SERVER_OPTIONS)}, got {engine!r}.")
    if worker_sockets not in WORKER_SOCKETS:
        raise ValueError(f"worker_sockets must be one of {list(WORKER_SOCKETS)}, got {worker_sockets!r}.")
    scale = ["--workers", str(workers), "--worker-sockets", worker_sockets] if engine == "uvicorn" else \
        ["--engine", "ray", "--ray-replicas", str(workers), "--ray-replica-cpus", "1"]
    return [sys.executable, "-m", "sameguard.cli", "serve", "--victim", str(victim_dir), "--detector",
            str(detector_dir), "--policy", policy, "--host", "127.0.0.1", "--port", str(port), *scale,
            "--state-prefix", prefix, "--torch-threads", str(threads),
            "--rate", "1e9", "--burst", str(10 ** 9), "--request-rate", "1e9", "--request-burst", str(10 ** 9),
            "--log-level", "warning", *(["--compile"] if compile else [])]


def _start_serve_workers(cmd: list[str], *, db_url: str, state_url: str, log_path: Path) -> subprocess.Popen:
    """``cmd`` (:func:`serve_command`) in a child process (its own session), output to ``log_path``; the
    database and Redis URLs in its environment, not on its command line, where ``ps`` would show their
    passwords."""
    env = dict(os.environ, SAMEGUARD_KEY_CACHE_S="60", SAMEGUARD_DB_URL=db_url, SAMEGUARD_STATE_URL=state_url)
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def measure_workers(victim_dir: str | os.PathLike, detector_dir: str | os.PathLike, images: torch.Tensor, *,
                    workers: Sequence[int] = (1, 2), state_url: str = DEFAULT_WORKERS_STATE, db_url: str | None = None,
                    requests: int = 200, concurrency: int = 16, torch_threads: int | None = None,
                    policy: str = "monitor", workdir: Path | None = None, startup_timeout: float = 180.0,
                    engine: str = "uvicorn", compile: bool = False, load_client: str = "raw",
                    worker_sockets: Sequence[str] = WORKER_SOCKETS[:1],
                    echo: Callable[[str], None] = logger.info) -> list[LatencyRow]:
    """Time ``sameguard serve --workers N --state REDIS`` (a child process) for each ``N`` and each of
    ``worker_sockets``; one row each (``engine="ray"``: ``serve --engine ray --ray-replicas N``, a local Ray
    instance started by the server, one row per ``N``).

    Each row starts the real server on a free port of 127.0.0.1 with the saved models, ``policy``
    (``monitor``: every query scored), dynamic batching at ``serve``'s defaults, rate limits out of
    the way, and a Redis key prefix of its own (``sgbench:<random>:``, its keys deleted afterwards,
    so runs never share counters), sends ``requests`` single-image requests from ``concurrency``
    client threads after a warm-up, stops the server and counts the audit rows of its client.

    Args:
        victim_dir, detector_dir: saved (calibrated) artifacts, as ``serve`` loads them.
        images: ``(M, C, H, W)`` benign images to send (cycled).
        workers: worker (or Ray Serve replica) counts, one row each.
        state_url: the Redis URL (``redis://HOST:PORT/DB``).
        db_url: keys and audit database (default: a fresh SQLite file per row under ``workdir``);
            a shared one (PostgreSQL) gets a client name of its own per row.
        torch_threads: torch threads per worker (default :func:`worker_threads`: the cores shared out).
        startup_timeout: seconds to wait for the workers to load the models and answer (with ``compile``
            at least the server's own allowance, ``COMPILE_HEALTHCHECK_SECONDS``).
        compile: start the server with ``--compile`` (networks compiled at start-up, before the timing).
        load_client: the load generator of the timed requests, one of :data:`LOAD_CLIENTS`.
        worker_sockets: ``serve --worker-sockets`` of the uvicorn rows with ``N > 1``, each of
            :data:`WORKER_SOCKETS` (a row per value). Each uvicorn row reports how the load's connections were
            spread over the workers (:class:`~sameguard.bench.process_tree.ConnectionSampler`).
    """
    from sqlalchemy import func, select

    from ..service.db import audit_log, init_db, make_engine
    from ..service.keys import KeyStore
    from ..service.server import COMPILE_HEALTHCHECK_SECONDS, wait_until_healthy

    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be positive integers.")
    _check_load_client(load_client)
    if not workers or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in workers):
        raise ValueError(f"workers must be positive integers, got {list(workers)!r}.")
    if engine not in SERVER_OPTIONS:
        raise ValueError(f"engine must be one of {sorted(SERVER_OPTIONS)}, got {engine!r}.")
    if not worker_sockets or any(w not in WORKER_SOCKETS for w in worker_sockets):
        raise ValueError(f"worker_sockets must be values of {list(WORKER_SOCKETS)}, got {list(worker_sockets)!r}.")
    from ..service.store import open_store, redact_store_url

    if not str(state_url).startswith(("redis://", "rediss://")):
        raise ValueError(f"The worker rows share their state in Redis: state_url must be redis://..., got "
                         f"{redact_store_url(str(state_url))!r}.")
    # Fails now, before anything starts, in one sentence (the URL without its password) when the Redis
    # client is missing or Redis is unreachable.
    open_store(state_url, prefix="sgbench:").close()
    base = Path(tempfile.mkdtemp(prefix="service-bench-workers-", dir=workdir))
    bodies = _payloads(images, 1)
    rows: list[LatencyRow] = []
    # One row per socket kind for N > 1 uvicorn workers; one worker serves alone, and Ray's proxy holds the
    # connections of every replica.
    runs = [(n, w) for n in workers for w in (worker_sockets if engine == "uvicorn" and n > 1 else (None,))]
    for n, sockets in runs:
        run_id = uuid.uuid4().hex[:10]
        prefix, client_name = f"sgbench:{run_id}:", f"bench-w{n}-{run_id}"
        row_name = f"{engine}-{n}" + (f"-{sockets}" if sockets else "")
        url = db_url or f"sqlite:///{base / f'audit-{row_name}.db'}"
        database = make_engine(url)
        init_db(database)
        _, token = KeyStore(database, cache_s=0).create(client_name)
        port = _free_port()
        threads = torch_threads or worker_threads(n)
        log_path = base / f"serve-{row_name}.log"
        cmd = serve_command(victim_dir, detector_dir, policy=policy, port=port, workers=n, prefix=prefix,
                            threads=threads, engine=engine, compile=compile,
                            **({} if sockets is None else {"worker_sockets": sockets}))
        proc = _start_serve_workers(cmd, db_url=url, state_url=state_url, log_path=log_path)
        headers = [{"X-API-Key": token, "content-type": "application/json"}]
        server_url = f"http://127.0.0.1:{port}"
        warm_ok, spread = 0, (None, None)
        try:
            wait_until_healthy(server_url, proc,
                               max(startup_timeout, COMPILE_HEALTHCHECK_SECONDS) if compile else startup_timeout,
                               exit_detail=lambda path=log_path: path.read_text(errors="replace")[-1500:].strip(),
                               timeout_hint=f" (log: {log_path}).")
            # Warm-up: enough concurrent requests that every worker has answered a few.
            warm_lat, warm_errors, _ = _time_requests(server_url, headers, bodies, 4 * n * max(2, concurrency // 4),
                                                      min(concurrency, 4 * n))
            warm_ok = len(warm_lat) - warm_errors
            (latencies, errors, wall), cpu, client_cpu, sampler = _timed_server_load(
                proc.pid, port, functools.partial(_time_requests, server_url, headers, bodies, requests, concurrency,
                                                  load_client), min(concurrency, requests))
            if engine == "uvicorn":  # Ray's proxy holds every replica's connections
                spread = (sampler.first, sampler.last)
        finally:
            _stop(proc)
            deleted = _delete_prefix(state_url, prefix)
            logger.info("Deleted %d Redis keys under %s", deleted, prefix)
        with database.connect() as conn:
            audit_rows = int(conn.execute(select(func.count()).select_from(audit_log)
                                          .where(audit_log.c.client == client_name)).scalar_one())
        database.dispose()
        row = LatencyRow(setting=f"{policy}-batched", batch=1, requests=requests, concurrency=concurrency, seconds=wall,
                         requests_per_s=requests / wall, images_per_s=requests / wall,
                         p50_ms=1000 * statistics.median(latencies), p99_ms=1000 * _percentile(latencies, 99),
                         errors=errors, workers=n, audit_rows=audit_rows, answered=warm_ok + requests - errors,
                         engine=engine, compiled=compile,
                         cpu_ms_per_request=None if cpu is None else 1000 * cpu / requests,
                         client_cpu_ms_per_request=_per_request_ms(client_cpu, requests, load_client),
                         worker_sockets=sockets, worker_connections=spread[0], worker_connections_last=spread[1])
        rows.append(row)
        echo(f"{server_label(engine, n, compile, sockets)} (Redis, {threads} torch thread(s) each) batch 1: "
             f"{row.requests_per_s:7.1f} req/s, p50 {row.p50_ms:6.1f} ms, p99 {row.p99_ms:6.1f} ms, errors {row.errors}, audit rows "
             f"{audit_rows}/{row.answered}" + _spread_text(row, ", "))
    return rows


def _timed_server_load(pid: int, port: int, send: Callable[[], tuple[list[float], int, float]], connections: int
                       ) -> tuple[tuple[list[float], int, float], float | None, float | None, ConnectionSampler]:
    """Run ``send()`` (the timed requests) against the server process ``pid`` listening on ``port``; returns its
    result, the CPU seconds of the server's process tree and of this process's reaped children (the ``raw``
    load client) during it, and the sampler of how the load's ``connections`` were spread over the workers."""
    cpu, client_cpu = process_tree_cpu_s(pid), _children_cpu_s()
    sampler = ConnectionSampler(pid, port, connections)
    with sampler.running():
        result = send()
    return result, _cpu_delta(cpu, process_tree_cpu_s(pid)), _cpu_delta(client_cpu, _children_cpu_s()), sampler


def _spread_text(row: LatencyRow, sep: str = "; ") -> str:
    """``"; connections per worker 10/6, then 8/8"`` (the first and last samples, after ``sep``), or nothing."""
    if row.worker_connections is None:
        return ""
    first, last = ("/".join(map(str, c)) or "-" for c in (row.worker_connections, row.worker_connections_last or []))
    return f"{sep}connections per worker {first}" + (f", then {last}" if row.worker_connections_last not in (
        None, row.worker_connections) else "")


def _benign_accuracy(guard: Any, images: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """(accuracy benign users get, fraction flagged); a refused answer counts as wrong."""
    correct = flagged = 0
    for s in range(0, len(images), batch):
        verdict = guard.protect(images[s:s + batch], "benign-user")
        ok = (verdict.probabilities.argmax(1) == labels[s:s + batch]) & ~verdict.refused
        correct += int(ok.sum())
        flagged += sum(d.flagged for d in verdict.decisions)
    return correct / len(images), flagged / len(images)


def measure_attacks(victim: Any, detector: Any, *, calibration: torch.Tensor, benign: Any, test: Any, seeds: Any,
                    proxies: dict[str, Any], attacks: Sequence[str] = ("knockoff", "jbda"),
                    defenses: Sequence[str] = ("none", "reject", "misinformation"), budget: int = 1000,
                    epochs: int = 10, lr: float = 0.05, momentum: float = 0.9, target_fpr: float = 0.01,
                    seed: int = 0, progress: bool | None = None,
                    echo: Callable[[str], None] = logger.info) -> list[AttackRow]:
    """Run the attacks in process through the guard with each defense (see the module docstring).

    Args:
        calibration: benign images for the threshold at ``target_fpr``.
        benign: an :class:`~sameguard.data.ImageDataset` of benign users' queries (for their accuracy).
        test: an :class:`~sameguard.data.ImageDataset` to evaluate the substitutes on.
        seeds: in-distribution images JBDA starts from.
        proxies: Knockoff's image pools by name; Knockoff runs once per pool.
        epochs, lr, momentum: substitute training of both attacks (SGD, cosine schedule). The
            defaults are a short schedule for a benchmark on CPU, not the papers' (Knockoff: 100
            epochs at lr 0.01, momentum 0.5).
    """
    from ..actions import Misinformation, Policy
    from ..attacks import JBDA, KnockoffNets
    from ..guard import Guard

    detector.calibrate(calibration, target_fpr)
    logger.info("Threshold %.6g at %.2f %% benign FPR on %d images", detector.threshold_, 100 * target_fpr,
                len(calibration))
    policies = {"none": lambda: Policy("monitor"), "reject": lambda: Policy("reject"),
                "misinformation": lambda: Policy(Misinformation())}
    rows = []
    for defense in defenses:
        if defense not in policies:
            raise ValueError(f"Unknown defense {defense!r}; choose from {sorted(policies)}.")
        guard = Guard(victim, detector, policies[defense](), keep_decisions=0)
        benign_acc, benign_flag = _benign_accuracy(guard, benign.images, benign.labels)
        runs = []
        for name in attacks:
            if name == "knockoff":
                runs += [(f"knockoff ({pname})", KnockoffNets(pool, epochs=epochs, lr=lr, momentum=momentum,
                                                              query_batch_size=64, seed=seed, progress=progress))
                         for pname, pool in proxies.items()]
            elif name == "jbda":
                runs.append(("jbda", JBDA(seeds, num_seeds=min(150, len(seeds)), epochs=epochs, lr=lr,
                                          momentum=momentum, seed=seed, progress=progress)))
            else:
                raise ValueError(f"The service benchmark runs the attacks 'knockoff' and 'jbda', not {name!r}.")
        for name, attack in runs:
            start = time.perf_counter()
            result = attack.run(guard, budget, victim=victim, test_data=test)
            stats = guard.stats(result.client)
            row = AttackRow(defense=defense, attack=name, budget=budget, substitute_accuracy=result.test_accuracy,
                            fidelity=result.fidelity, attack_flagged=stats.flagged / max(stats.queries, 1),
                            benign_accuracy=benign_acc, benign_flagged=benign_flag, seconds=time.perf_counter() - start)
            rows.append(row)
            echo(f"{defense:<15} {name:<22} substitute acc {row.substitute_accuracy:.4f} fidelity {row.fidelity:.4f} "
                 f"flagged {row.attack_flagged:.2%}; benign acc {benign_acc:.4f} (flagged {benign_flag:.2%})")
    return rows


def _bench_models(victim_dir: str | os.PathLike | None, detector_dir: str | os.PathLike | None, workdir: Path,
                  seed: int, progress: bool | None) -> tuple[Any, Any]:
    """(victim, SAME detector): loaded from the folders given, else trained once and cached in ``workdir``."""
    from ..cache import cached_detector, cached_victim
    from ..data import load_dataset
    from ..detectors import SAMEDetector
    from ..victim import Victim

    if victim_dir is not None:
        victim = Victim.load(victim_dir)
    else:
        train = load_dataset("fashion-mnist", "train").take(10_000, seed=seed)
        victim = cached_victim(workdir, train, load_dataset("fashion-mnist", "test"), arch="conv3", epochs=3,
                               seed=seed, device="cpu", progress=progress)
    if detector_dir is not None:
        return victim, SAMEDetector.load(detector_dir, victim)
    train = load_dataset(victim.dataset, "train").take(10_000, seed=seed)
    fit, held = train.split_off(0.1, seed=seed)
    return victim, cached_detector(workdir, victim, fit, held, preset="cpu", seed=seed, device="cpu", progress=progress,
                                   max_train_samples=9000)


def run_service_bench(*, victim_dir: str | os.PathLike | None = None, detector_dir: str | os.PathLike | None = None,
                      workdir: Path = Path("runs/service-bench"), requests: int = 200, requests_large: int = 30,
                      batch_sizes: Sequence[int] = (1, 64), concurrency: int = 4, keys: int = 1, gc_freeze: bool = True,
                      settings: Sequence[str] = ("off", "monitor"), attacks: Sequence[str] = ("knockoff", "jbda"),
                      budget: int = 1000, attack_epochs: int = 10, benign: int = 1000, target_fpr: float = 0.01,
                      knockoff_proxies: Sequence[str] = ("digits", "fashion-mnist"), seed: int = 0, progress: bool | None = None,
                      workers: Sequence[int] = (), workers_state: str = DEFAULT_WORKERS_STATE,
                      workers_db: str | None = None, workers_threads: int | None = None,
                      ray_replicas: Sequence[int] = (), workers_compile: bool = False, load_client: str = "raw",
                      workers_sockets: Sequence[str] = WORKER_SOCKETS[:1], workers_policies: Sequence[str] = ("monitor",),
                      echo: Callable[[str], None] = logger.info) -> ServiceBenchResult:
    """Both parts on a Fashion-MNIST victim; returns the rows and a Markdown report.

    ``victim_dir`` / ``detector_dir``: saved artifacts (e.g. from ``sameguard demo``'s cache); by
    default a small conv3 victim (10000 images, 3 epochs) and a SAME detector (``cpu`` preset on
    9000 images) are trained once and cached in ``workdir``. Knockoff runs once per pool in
    ``knockoff_proxies`` (dataset names, train split; scikit-learn's digits: natural
    images of another distribution; ``fashion-mnist`` is the in-distribution attacker); JBDA starts
    from 150 Fashion-MNIST training images.

    ``keys``: API keys the in-process rows' client threads send with (:func:`measure_service`); the worker rows
    send with one. ``gc_freeze``: the in-process rows' apps freeze their start-up objects for the garbage
    collector (:func:`measure_service`; the worker rows' servers always do, the service's default).

    ``workers``: worker counts of the rows that start the real server (:func:`measure_workers`:
    ``sameguard serve --workers N --state workers_state``, guarded single images, ``concurrency``
    clients, ``requests`` requests); empty (default): none. Without ``victim_dir`` / ``detector_dir``
    the trained models are saved under ``workdir/workers-artifacts`` for the server to load.
    ``workers_sockets``: ``serve --worker-sockets`` of those rows (a row per value and N).
    ``workers_policies``: ``serve --policy`` of those rows (a row per value; ``off`` scores nothing, so that
    its row against ``monitor``'s says what scoring costs in the workers).
    ``ray_replicas``: the same rows for ``sameguard serve --engine ray --ray-replicas N``.
    ``workers_compile``: each of those rows a second time with ``serve ... --compile``.
    ``load_client``: the load generator of every timed row, one of :data:`LOAD_CLIENTS`.
    """
    from ..data import load_dataset

    if not 1 <= benign <= 3000:
        raise ValueError(f"benign must be between 1 and 3000 test images, got {benign!r}.")
    torch.manual_seed(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    victim, detector = _bench_models(victim_dir, detector_dir, workdir, seed, progress)
    test = load_dataset(victim.dataset, "test")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    cal_idx, benign_idx, eval_idx = perm[:2000], perm[2000:2000 + benign], perm[5000:7000]
    result = ServiceBenchResult(config={
        "sameguard": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "concurrency": concurrency, "keys": keys,
        "gc_freeze": gc_freeze, "load_client": load_client,
        "victim": getattr(victim, "arch", None), "victim_dataset": victim.dataset, "detector": type(detector).__name__,
        "victim_accuracy": None, "budget": budget, "target_fpr": target_fpr, "attack_epochs": attack_epochs,
        "knockoff_proxies": list(knockoff_proxies), "seed": seed, "batch_sizes": list(batch_sizes), "settings": list(settings),
        "workers": list(workers), "ray_replicas": list(ray_replicas), "workers_compile": workers_compile,
        "workers_sockets": list(workers_sockets), "workers_policies": list(workers_policies),
    })
    with torch.no_grad():
        eval_set = test.subset(eval_idx)
        result.config["victim_accuracy"] = float((victim.predict(eval_set.images) == eval_set.labels).float().mean())
    if settings:
        result.latency = measure_service(victim, detector, test.images[benign_idx[:256]], settings=settings,
                                         batch_sizes=batch_sizes, requests=requests, requests_large=requests_large,
                                         concurrency=concurrency, keys=keys, workdir=workdir, gc_freeze=gc_freeze,
                                         load_client=load_client, echo=echo)
    if workers or ray_replicas:
        from ..service.store import redact_store_url

        v_dir, d_dir = victim_dir, detector_dir
        if v_dir is None or d_dir is None:  # the server loads folders: save what was trained or loaded
            v_dir, d_dir = victim.save(workdir / "workers-artifacts" / "victim"), detector.save(
                workdir / "workers-artifacts" / "same")
        result.config.update(workers_state=redact_store_url(workers_state))
        for engine, counts, what in (("uvicorn", workers, "uvicorn workers"), ("ray", ray_replicas, "Ray Serve replicas")):
            if not counts:
                continue
            rows = []
            for compile in (False, True) if workers_compile else (False,):
                for policy in workers_policies:
                    rows += measure_workers(v_dir, d_dir, test.images[benign_idx[:256]], workers=counts,
                                            state_url=workers_state, db_url=workers_db, requests=requests,
                                            concurrency=concurrency, torch_threads=workers_threads, workdir=workdir,
                                            engine=engine, compile=compile, load_client=load_client, policy=policy,
                                            worker_sockets=workers_sockets, echo=echo)
            result.latency += rows
            threads = {r.workers: workers_threads or worker_threads(r.workers) for r in rows}
            result.config["workers_threads" if engine == "uvicorn" else "ray_replica_threads"] = threads
            result.notes.append(
                f"'{SERVER_OPTIONS[engine]} N' rows: the real server in a child process (N {what}, "
                "rate limits and challenges in Redis under a key prefix of the row, deleted afterwards; torch threads "
                "each: " + ", ".join(f"N = {n}: {t}" for n, t in threads.items())
                + "); audit rows found / images answered: "
                + ", ".join(f"{r.setting}, {server_label(r.engine, r.workers, r.compiled, r.worker_sockets)}: "
                            f"{r.audit_rows}/{r.answered}" for r in rows) + ".")
    if attacks:
        train = load_dataset(victim.dataset, "train")
        seeds_set = train.take(150, seed=seed + 1)
        proxies = {name: (train if name == victim.dataset else load_dataset(name, "train"))
                   for name in knockoff_proxies}
        result.attacks = measure_attacks(victim, detector, calibration=test.images[cal_idx],
                                         benign=test.subset(benign_idx), test=eval_set, seeds=seeds_set, proxies=proxies,
                                         attacks=attacks, budget=budget, epochs=attack_epochs, target_fpr=target_fpr,
                                         seed=seed, progress=progress, echo=echo)
        result.notes.append("Benign accuracy: a refused answer counts as wrong. 'none' answers every query unchanged "
                            "(the guard only monitors).")
        result.notes.append(f"Knockoff (random policy) queries training images of the named dataset; JBDA starts from "
                            f"150 {victim.dataset} training images; substitutes have the victim's architecture, "
                            f"trained {attack_epochs} epochs (SGD lr 0.05, momentum 0.9, cosine), and are evaluated "
                            f"on {len(eval_idx)} held-out test images.")
    return result
