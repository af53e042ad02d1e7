"""Command-line entry points of the service: ``serve``, ``keys`` and ``audit``.

:func:`add_service_commands` adds the three sub-commands to the ``sameguard`` parser and returns
their functions by name; each function takes the parsed ``argparse.Namespace`` and returns an
exit code. Heavy imports (FastAPI, SQLAlchemy, torch models) happen inside the functions.
``bench-service`` is wired from :mod:`sameguard.bench.commands` (the benchmark imports the
service, never the other way round).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

from ..api import SameguardError
from .connection_balance import WORKER_SOCKETS

logger = logging.getLogger(__name__)

__all__ = ["add_service_commands", "serve_main", "keys_main", "audit_main", "SERVICE_COMMANDS",
           "MissingDependencyError", "require_serve_extra"]


class MissingDependencyError(SameguardError, ImportError):
    """An optional dependency of the service is not installed."""


def _require(*modules: str, extra: str = "serve") -> None:
    """Raise :class:`MissingDependencyError` naming the extra to install when a module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"This command needs {', '.join(missing)}: pip install 'sameguard[{extra}]'.")


_SERVE_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "httpx", "prometheus_client", "multipart", "pydantic")


def require_serve_extra() -> None:
    """Raise :class:`MissingDependencyError` unless every module of the ``serve`` extra is installed."""
    _require(*_SERVE_MODULES)


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the library's log (-vv for debug)")


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None,
                   help="SQLAlchemy database URL of keys and audit log (default: $SAMEGUARD_DB_URL, else "
                        "sqlite:///sameguard.db); e.g. postgresql+psycopg://user@host/db")


def _db_url(args: argparse.Namespace) -> str:
    import os

    return args.db or os.environ.get("SAMEGUARD_DB_URL") or "sqlite:///sameguard.db"


def add_service_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``serve``, ``keys`` and ``audit`` to the sub-parsers ``sub``.

    Returns:
        ``{command name: function(args) -> exit code}`` to merge into the CLI's command table.
    """
    _add_serve_parser(sub)
    _add_keys_parser(sub)
    _add_audit_parser(sub)
    return dict(SERVICE_COMMANDS)


def _add_serve_parser(sub: Any) -> None:
    """``sameguard serve``: the victim, the detector, the policy, the limits."""
    p = sub.add_parser("serve", help="serve a victim behind SAME and an action policy over HTTP",
                       description="Serve the victim as an HTTP prediction API (FastAPI + uvicorn) behind a detector "
                                   "and a policy; every query is audited. Create API keys with 'sameguard keys "
                                   "create'. Settings may also come from SAMEGUARD_* environment variables "
                                   "(SAMEGUARD_POW_SECRET for the proof-of-work HMAC key).")
    p.add_argument("--victim", default=None, help="folder of a saved victim")
    p.add_argument("--detector", default=None, help="folder of a saved, calibrated detector (not needed with --policy off)")
    p.add_argument("--policy", default=None, choices=["off", "monitor", "reject", "misinformation", "pow"],
                   help="what to do above the threshold (default: monitor; off = bare victim, no scoring)")
    _db(p)
    p.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    p.add_argument("--output", default=None, choices=["probabilities", "labels"], help="what clients get (default probabilities)")
    p.add_argument("--threshold", type=float, default=None, help="override the detector's calibrated threshold")
    p.add_argument("--max-batch", type=int, default=None, help="most images per request (default 256)")
    p.add_argument("--max-request-bytes", type=int, default=None, help="largest request body (default 8 MiB)")
    p.add_argument("--rate", type=float, default=None, dest="rate_per_second", help="per-key images per second (default 50)")
    p.add_argument("--burst", type=int, default=None, dest="rate_burst", help="per-key burst in images (default 256)")
    p.add_argument("--pow-benign-bits", type=int, default=None, help="bits paid at the benign p99 score (default 12)")
    p.add_argument("--pow-max-bits", type=int, default=None, help="cap on proof-of-work bits (default 26)")
    p.add_argument("--pow-ttl-s", type=float, default=None, help="seconds a proof-of-work challenge stays valid (default 120)")
    p.add_argument("--calibration", default=None,
                   help="benign images for the proof-of-work calibration: .npy, PNG folder or dataset:NAME[:SPLIT] "
                        "(default: the victim's dataset, test split)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="compile the victim's and the detectors' networks with torch.compile at start-up (needs a C "
                        "compiler; each worker takes tens of seconds longer to start, then answers faster)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend with --compile (default inductor)")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false", default=None,
                   help="do not freeze the start-up objects for the garbage collector (by default they are, so that a "
                        "full collection, which stops every request, skips the models and libraries)")
    p.add_argument("--log-level", default="info",
                   help="log level of uvicorn, or of the Ray Serve replicas with --engine ray (default info)")
    p.add_argument("--alarms", default=None,
                   help="folder of per-client alarms from 'sameguard alarms calibrate': once a client's evidence "
                        "reaches 1/delta, every later query of it gets the policy's action")
    p.add_argument("--alarm-detector", action="append", default=[], metavar="NAME=DIR",
                   help="the detector folder of the alarms' scorer NAME, overriding the one recorded with the "
                        "alarms (repeatable)")
    p.add_argument("--require-authenticated-artifacts", action="store_true", default=None,
                   help="refuse to start unless the victim, detector and alarms folders are each signed with "
                        "$SAMEGUARD_ARTIFACT_KEY or pinned (--artifact-digest); see 'sameguard artifacts'")
    p.add_argument("--artifact-digest", action="append", default=[], metavar="HEX",
                   help="pin an artifact folder's digest ('sameguard artifacts digest DIR'); repeatable "
                        "(default: $SAMEGUARD_ARTIFACT_DIGESTS, comma-separated)")
    p.add_argument("--admin-token-env", default=None, metavar="NAME",
                   help="environment variable holding the operator's token for /v1/admin (at least 16 bytes; "
                        "unset: admin routes disabled)")
    p.add_argument("--request-rate", type=float, default=None, dest="request_rate_per_second",
                   help="per-key requests per second, valid or not (default 10)")
    p.add_argument("--request-burst", type=int, default=None, help="per-key burst in requests (default 20)")
    _state(p)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default 1); more than 1 needs a shared --state redis://...")
    p.add_argument("--worker-sockets", default=None, choices=list(WORKER_SOCKETS),
                   help="with --workers N: balanced (default) gives each worker its own listening socket "
                        "(SO_REUSEPORT, Linux: the kernel spreads new connections over the workers) and has a "
                        "worker holding more than its share of the keep-alive connections close a few after "
                        "their next response; reuse-port, the sockets alone; shared (uvicorn's way) has all "
                        "workers accept from one socket, where a burst of connections can all land on one worker")
    p.add_argument("--batch-max-size", type=int, default=None,
                   help="dynamic batching: most images of concurrent requests in one forward pass (default 64)")
    p.add_argument("--batch-max-wait-ms", type=float, default=None,
                   help="dynamic batching: longest a request waits for others, in ms (default 2; 0 turns it off)")
    p.add_argument("--engine", default=None, choices=["uvicorn", "ray"],
                   help="what serves the app: uvicorn (default) or a Ray Serve deployment (ray; "
                        "pip install 'sameguard[ray]'), same HTTP API, state store and database")
    p.add_argument("--ray-replicas", type=int, default=None,
                   help="--engine ray: replicas of the deployment (default 1); more than 1 needs --state redis://...")
    p.add_argument("--ray-max-replicas", type=int, default=None,
                   help="--engine ray: autoscale between --ray-replicas and this many replicas on the requests "
                        "in flight (default: no autoscaling)")
    p.add_argument("--ray-replica-cpus", type=float, default=None,
                   help="--engine ray: CPUs Ray reserves per replica (default 1; fractions allowed)")
    p.add_argument("--ray-max-ongoing-requests", type=int, default=None,
                   help="--engine ray: requests one replica handles at once, which its batcher can batch "
                        "(default 64)")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: the Ray cluster to deploy to (auto: the one this host joined with 'ray "
                        "start'; ray://HOST:10001); default: start a local Ray instance")
    _verbose(p)


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default=None, dest="state_url", metavar="URL",
                   help="where rate limits, proof-of-work challenges, key revocations and per-client alarm state "
                        "live: memory:// (default, one process) or redis://HOST:PORT/DB (shared by every worker; "
                        "default: $SAMEGUARD_STATE_URL)")
    p.add_argument("--state-prefix", default=None, help="prefix of the service's Redis keys (default sameguard:)")


def _add_keys_parser(sub: Any) -> None:
    """``sameguard keys create|list|revoke``."""
    p = sub.add_parser("keys", help="create, list or revoke API keys of the service",
                       description="API keys are shown once at creation and stored as SHA-256 hashes.")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser("create", help="create a key for a client and print it once")
    k.add_argument("--name", required=True, help="the client's name (used in the audit log)")
    k.add_argument("-q", "--quiet", action="store_true",
                   help="print only the key (for scripts: KEY=$(sameguard keys create --name alice --quiet))")
    _db(k)
    _verbose(k)
    k = ksub.add_parser("list", help="list keys (no secrets)")
    _db(k)
    _verbose(k)
    k = ksub.add_parser("revoke", help="revoke a key (--key-id) or every key of a client (--name)")
    group = k.add_mutually_exclusive_group(required=True)
    group.add_argument("--name", help="revoke every key of this client")
    group.add_argument("--key-id", help="revoke this key (16 hex characters from 'keys list')")
    _db(k)
    _state(k)
    _verbose(k)
    _verbose(p)


def _add_audit_parser(sub: Any) -> None:
    """``sameguard audit``."""
    p = sub.add_parser("audit", help="summarise the service's audit log per client",
                       description="Per client: queries, requests, flagged queries, mean and max score, actions "
                                   "taken and proof-of-work asked, as a Markdown table (or JSON); then the "
                                   "per-client alarms: client, alarm time, queries at the alarm, evidence, and "
                                   "when an operator cleared it.")
    _db(p)
    p.add_argument("--since-hours", type=float, default=None, help="only the last H hours")
    p.add_argument("--client", default=None, help="only this client's queries (and its score distribution)")
    p.add_argument("--flagged", action="store_true", help="only the queries the detector flagged")
    p.add_argument("--since", default=None, metavar="TIME",
                   help="only queries at or after TIME: ISO 8601 (UTC unless an offset is given), UNIX seconds, "
                        "or an age such as 90m, 2h, 7d")
    p.add_argument("--until", default=None, metavar="TIME", help="only queries before TIME (same forms as --since)")
    p.add_argument("--export", default=None, metavar="FILE",
                   help="also write the matching rows, one per query, to FILE (.csv or .jsonl; '-' for standard "
                        "output, which then holds only the rows)")
    p.add_argument("--format", default=None, choices=["csv", "jsonl"], dest="export_format",
                   help="format of --export (default: from its suffix; '-' is jsonl)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _verbose(p)


def _artifact_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--require-authenticated-artifacts`` and ``--artifact-digest`` as settings (``None``: the environment's)."""
    digests = ",".join(d.strip() for d in getattr(args, "artifact_digest", []) if d.strip())
    return {"require_authenticated_artifacts": getattr(args, "require_authenticated_artifacts", None),
            "artifact_digests": digests or None}


def serve_main(args: argparse.Namespace) -> int:
    """``sameguard serve``: load the models, open the database, listen (until interrupted)."""
    require_serve_extra()
    if getattr(args, "engine", None) == "ray":
        from .ray_engine import require_ray

        require_ray()  # before anything is loaded: one sentence saying what to install
    from sqlalchemy import func, select

    from .app import create_app
    from .db import api_keys, redact_url
    from .server import run_server
    from .settings import ServiceSettings

    settings = ServiceSettings.from_env(
        victim=args.victim, detector=args.detector, policy=args.policy, db_url=args.db, host=args.host, port=args.port,
        output=args.output, threshold=args.threshold, max_batch=args.max_batch,
        max_request_bytes=args.max_request_bytes, rate_per_second=args.rate_per_second, rate_burst=args.rate_burst,
        pow_benign_bits=args.pow_benign_bits, pow_max_bits=args.pow_max_bits, pow_ttl_s=args.pow_ttl_s,
        calibration=args.calibration, device=args.device, torch_threads=args.torch_threads,
        compile=args.compile, compile_backend=args.compile_backend, gc_freeze=args.gc_freeze, alarms=args.alarms,
        alarm_detectors=_alarm_detectors(args), admin_token_env=args.admin_token_env, **_artifact_settings(args),
        request_rate_per_second=args.request_rate_per_second, request_burst=args.request_burst,
        state_url=args.state_url, state_prefix=args.state_prefix, workers=args.workers,
        worker_sockets=getattr(args, "worker_sockets", None),
        batch_max_size=args.batch_max_size, batch_max_wait_ms=args.batch_max_wait_ms,
        engine=getattr(args, "engine", None), ray_replicas=getattr(args, "ray_replicas", None),
        ray_max_replicas=getattr(args, "ray_max_replicas", None),
        ray_replica_cpus=getattr(args, "ray_replica_cpus", None),
        ray_max_ongoing_requests=getattr(args, "ray_max_ongoing_requests", None),
        ray_address=getattr(args, "ray_address", None))
    from ..cli_checks import check_port_free

    if not (settings.engine == "ray" and settings.ray_address):  # a Ray cluster's proxies bind on its nodes
        check_port_free(settings.host, settings.port)  # before the models load: one sentence, not uvicorn's exit 3
    if settings.engine == "ray":
        return _serve_ray(settings, args.log_level)
    if settings.workers > 1:
        return _serve_workers(settings, args.log_level)
    app = create_app(settings)
    state = app.state.sameguard
    with state.keys.engine.connect() as conn:
        n_keys = conn.execute(select(func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))).scalar_one()
    if n_keys == 0:
        logger.warning("No active API key in the database: create one with 'sameguard keys create --name NAME "
                       "--db %s'", redact_url(settings.db_url))
    alarms = state.guard.alarms
    alarm_text = "" if alarms is None else f", per-client alarms at delta {alarms.delta:g} ({', '.join(alarms.scorers)})"
    _out(f"sameguard serving {settings.victim} with policy {settings.policy} (threshold {state.guard.threshold}"
         f"{alarm_text}) on http://{settings.host}:{settings.port}  (OpenAPI: /docs, /openapi.json; metrics: /metrics)")
    run_server(app, settings.host, settings.port, log_level=args.log_level)
    return 0


def _serve_workers(settings: Any, log_level: str) -> int:
    """``serve --workers N``: check the database and the shared store here, then let uvicorn start N
    worker processes, each building the app from the same settings (passed as ``SAMEGUARD_*``
    variables; a random proof-of-work HMAC key is drawn here when none is set, so every worker
    signs and checks challenges with the same one)."""
    import os
    import secrets

    from .db import redact_url
    from .server import COMPILE_HEALTHCHECK_SECONDS, WORKER_HEALTHCHECK_SECONDS, run_workers
    from .store import redact_store_url

    _check_store_and_database(settings)
    env = settings.to_env()
    if settings.pow_secret is None:
        env["SAMEGUARD_POW_SECRET"] = secrets.token_hex(32)
    os.environ.update(env)
    _out(f"sameguard serving {settings.victim} with policy {settings.policy} in {settings.workers} worker processes "
         f"(state {redact_store_url(settings.state_url)}, database {redact_url(settings.db_url)}) on "
         f"http://{settings.host}:{settings.port}")
    run_workers(settings.host, settings.port, settings.workers, log_level=log_level,
                sockets=settings.worker_sockets,
                healthcheck_s=COMPILE_HEALTHCHECK_SECONDS if settings.compile else WORKER_HEALTHCHECK_SECONDS)
    return 0


def _check_store_and_database(settings: Any) -> None:
    """Before starting workers or replicas: reach the state store (fails now when Redis is unreachable),
    create or upgrade the database schema once, and warn when it holds no active API key."""
    from sqlalchemy import func, select

    from .db import api_keys, init_db, make_engine, redact_url
    from .store import open_store

    open_store(settings.state_url, prefix=settings.state_prefix).close()
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        with engine.connect() as conn:
            n_keys = conn.execute(select(func.count()).select_from(api_keys)
                                  .where(api_keys.c.revoked_at.is_(None))).scalar_one()
    finally:
        engine.dispose()
    if n_keys == 0:
        logger.warning("No active API key in the database: create one with 'sameguard keys create --name NAME "
                       "--db %s'", redact_url(settings.db_url))


def _serve_ray(settings: Any, log_level: str) -> int:
    """``serve --engine ray``: check the state store and the database here, then deploy the service on
    Ray Serve (:mod:`.ray_engine`) and serve until interrupted."""
    from .db import redact_url
    from .ray_engine import serve_with_ray
    from .store import redact_store_url

    _check_store_and_database(settings)
    if settings.ray_max_replicas is not None and settings.ray_max_replicas > settings.ray_replicas:
        replicas = f"{settings.ray_replicas}-{settings.ray_max_replicas} Ray Serve replicas (autoscaling)"
    else:
        replicas = f"{settings.ray_replicas} Ray Serve replica{'s' if settings.ray_replicas > 1 else ''}"

    def ready() -> None:
        _out(f"sameguard serving {settings.victim} with policy {settings.policy} in {replicas} (state "
             f"{redact_store_url(settings.state_url)}, database {redact_url(settings.db_url)}) on "
             f"http://{settings.host}:{settings.port}  (OpenAPI: /docs, /openapi.json; metrics: /metrics)")

    serve_with_ray(settings, log_level=log_level, ready=ready)
    return 0


def _alarm_detectors(args: argparse.Namespace) -> dict[str, str] | None:
    """``--alarm-detector NAME=DIR`` items as a dict (``None`` when none is given)."""
    from .settings import parse_name_dirs

    items = getattr(args, "alarm_detector", None) or []
    try:
        return parse_name_dirs(items) or None
    except ValueError as exc:
        raise ValueError(f"--alarm-detector: {exc}.") from None


def keys_main(args: argparse.Namespace) -> int:
    """``sameguard keys create|list|revoke``."""
    _require("sqlalchemy")
    from .db import init_db, make_engine
    from .keys import KeyStore

    engine = make_engine(_db_url(args))
    init_db(engine)
    shared = _shared_store(args)
    store = KeyStore(engine, cache_s=0, store=shared)
    try:
        if args.keys_command == "create":
            record, token = store.create(args.name)
            if getattr(args, "quiet", False):
                _out(token)
                return 0
            _out(f"API key for client {record.name!r} (key id {record.key_id}); it is shown only this once, store it "
                 "safely:")
            _out(token)
        elif args.keys_command == "list":
            _out("| key id | client | created (UTC) | status |")
            _out("|---|---|---|---|")
            import time

            for k in store.list():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
                _out(f"| {k.key_id} | {k.name} | {created} | {'active' if k.active else 'revoked'} |")
        else:
            n = store.revoke(name=args.name, key_id=args.key_id)
            if n == 0:
                raise ValueError("No active key matched: check --name or --key-id with 'sameguard keys list'.")
            _out(f"revoked {n} key(s)" + (" (refused by every worker at once: the state store is shared)"
                                          if shared is not None else ""))
    finally:
        engine.dispose()
        if shared is not None:
            shared.close()
    return 0


def _shared_store(args: argparse.Namespace) -> Any:
    """The shared state store of ``--state`` (or ``$SAMEGUARD_STATE_URL``), or ``None`` for memory or unset."""
    import os

    url = getattr(args, "state_url", None) or os.environ.get("SAMEGUARD_STATE_URL")
    if not url or url.startswith("memory"):
        return None
    from .store import open_store

    prefix = getattr(args, "state_prefix", None) or os.environ.get("SAMEGUARD_STATE_PREFIX") or "sameguard:"
    return open_store(url, prefix=prefix)


def audit_main(args: argparse.Namespace) -> int:
    """``sameguard audit``: the per-client summary of the audit log."""
    _require("sqlalchemy")
    import time

    from .audit import alarm_history, format_alarms, format_summary, summarize
    from .audit_query import AuditFilter, export_format, parse_time, require_audit_log
    from .db import init_db, make_engine, redact_url

    since = None if args.since_hours is None else time.time() - 3600 * args.since_hours
    if getattr(args, "since", None) is not None:
        start = parse_time(args.since, flag="--since")
        since = start if since is None else max(since, start)
    until = None if getattr(args, "until", None) is None else parse_time(args.until, flag="--until")
    where = AuditFilter(client=getattr(args, "client", None), flagged=getattr(args, "flagged", False), since=since,
                        until=until)
    export = getattr(args, "export", None)
    fmt = None if export is None else export_format(export, getattr(args, "export_format", None))
    engine = make_engine(_db_url(args))
    try:
        require_audit_log(engine, redact_url(_db_url(args)))  # reading never creates a database
        init_db(engine)  # a sameguard database from an older version gets its newer tables and columns
        if export is not None:
            n = _export_audit(engine, where, export, fmt)
            if export == "-":
                return 0
        summaries = summarize(engine, where=where.audit_where())
        events = alarm_history(engine, where=where.alarm_where())
        stats = None if where.client is None else _client_stats(engine, where)
    finally:
        engine.dispose()
    if export is not None:
        _out(f"wrote {n} audit row(s) to {export} ({fmt})")
    if args.json:
        alarms: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            alarms.setdefault(e.client, []).append(e.__dict__)
        _out(json.dumps([s.__dict__ | {"flagged_rate": s.flagged_rate, "alarm_events": alarms.get(s.client, [])}
                         | ({} if stats is None else {"scores": stats}) for s in summaries], indent=2))
    else:
        _out(format_summary(summaries))
        if stats is not None:
            _out("")
            _out(_format_client_stats(where.client, stats))
        _out("")
        _out("Per-client alarms:")
        _out("")
        _out(format_alarms(events))
    return 0


def _export_audit(engine: Any, where: Any, path: str, fmt: str) -> int:
    """Write the audit rows matching ``where`` to ``path`` (``-``: standard output) as ``fmt``; returns how many."""
    import sys

    from .audit_query import export_rows, iter_rows

    if path == "-":
        n = export_rows(iter_rows(engine, where), sys.stdout, fmt)
        sys.stdout.flush()
        return n
    with open(path, "w", newline="", encoding="utf-8") as fh:
        return export_rows(iter_rows(engine, where), fh, fmt)


def _client_stats(engine: Any, where: Any) -> dict[str, Any]:
    from .audit_query import score_stats

    return score_stats(engine, where)


def _format_client_stats(client: str, stats: dict[str, Any]) -> str:
    """One line: a client's score distribution over the selected queries."""
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    return (f"Scores of {client}: {stats['n']} queries ({stats['scored']} scored, {stats['flagged']} flagged); "
            f"min {fmt(stats['min'])}, p50 {fmt(stats['p50'])}, p95 {fmt(stats['p95'])}, p99 {fmt(stats['p99'])}, "
            f"max {fmt(stats['max'])}")


SERVICE_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve_main,
    "keys": keys_main,
    "audit": audit_main,
}
