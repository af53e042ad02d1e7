"""Command-line entry point of the service benchmark: ``sameguard bench-service``.

:func:`add_bench_commands` adds the sub-command to the ``sameguard`` parser and returns its
function by name (``{name: function(args) -> exit code}``), as
:func:`sameguard.service.commands.add_service_commands` does for the service's own commands. It lives
here, next to :mod:`sameguard.bench.service_bench`, so that the benchmark imports the service and
never the other way round. Heavy imports happen inside the function.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cli_checks import comma_ints
from .load_client import LOAD_CLIENTS

__all__ = ["add_bench_commands", "bench_service_main", "BENCH_COMMANDS", "worker_counts"]

#: Most worker processes a ``--workers`` row may start.
MAX_BENCH_WORKERS = 64


def worker_counts(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]`` for ``--workers`` (``""``: no worker rows); each between 1 and 64, no repeats."""
    if not text.strip():
        return []
    values = comma_ints(text)
    if any(v > MAX_BENCH_WORKERS for v in values):
        raise argparse.ArgumentTypeError(f"expected worker counts between 1 and {MAX_BENCH_WORKERS}, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"each worker count once, got {text!r}")
    return values


def add_bench_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``bench-service`` to the sub-parsers ``sub``.

    Returns:
        ``{command name: function(args) -> exit code}`` to merge into the CLI's command table.
    """
    _add_bench_service_parser(sub)
    return dict(BENCH_COMMANDS)


def _add_bench_service_parser(sub: Any) -> None:
    """``sameguard bench-service``."""
    p = sub.add_parser("bench-service", help="measure the service's throughput and the actions against attacks",
                       description="Part 1: requests/s and p50/p99 latency of the HTTP service on 127.0.0.1 "
                                   "(uvicorn, bounded requests) with and without the guard, at batch sizes 1 and 64. "
                                   "Part 2: Knockoff and JBDA substitute accuracy through the in-process guard with "
                                   "the reject and misinformation actions at a calibrated benign FPR, next to the "
                                   "accuracy benign users still get. Prints Markdown tables.")
    p.add_argument("--victim", default=None, help="folder of a saved victim (default: train a small one in --workdir)")
    p.add_argument("--detector", default=None, help="folder of a saved SAME detector for it (default: fit one)")
    p.add_argument("--workdir", default="runs/service-bench", help="cache for trained artifacts and the audit DB")
    p.add_argument("--requests", type=int, default=200, help="requests per setting at batch sizes up to 8 (default 200)")
    p.add_argument("--requests-large", type=int, default=30, help="requests per setting at larger batch sizes (default 30)")
    p.add_argument("--batch-sizes", default="1,64", type=comma_ints, help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--load-client", choices=LOAD_CLIENTS, default="raw",
                   help="the load generator: raw (default), a child process driving --concurrency keep-alive "
                        "connections from one event loop (its CPU per request is reported); httpx, --concurrency "
                        "threads of this process with an httpx client each, sharing the GIL with the in-process "
                        "rows' server (what figures before the raw client used)")
    p.add_argument("--keys", type=int, default=1,
                   help="API keys the client threads of the in-process rows send with, thread i with key i mod N: "
                        "each key is a client of its own for the rate limits and the per-client alarms (default 1; "
                        "the --workers rows use one)")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="the in-process rows' services do not freeze their start-up objects for the garbage collector "
                        "(as serve --no-gc-freeze; by default they do, as serve does)")
    p.add_argument("--settings", default="off,monitor", help="service policies to time (default off,monitor)")
    p.add_argument("--attacks", default="knockoff,jbda", help="attacks to run in-process ('' to skip)")
    p.add_argument("--budget", type=int, default=1000, help="queries per attack (default 1000)")
    p.add_argument("--knockoff-proxy", default="digits,fashion-mnist",
                   help="comma-separated datasets Knockoff draws its queries from, one run each (default "
                        "digits,fashion-mnist; digits: another distribution; fashion-mnist: in-distribution)")
    p.add_argument("--attack-epochs", type=int, default=10, help="substitute training epochs (default 10)")
    p.add_argument("--benign", type=int, default=1000, help="benign test queries for the benign accuracy (default 1000)")
    p.add_argument("--target-fpr", type=float, default=0.01, help="benign FPR of the threshold (default 0.01)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the victim, detector, attacks and image draws (default: 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="hide progress bars")
    p.add_argument("--workers", default=[], type=worker_counts, metavar="N,N",
                   help="also time the real server, 'sameguard serve --workers N --state REDIS' in a child process, "
                        "with guarded single-image requests (--requests, --concurrency clients), one row per N, e.g. "
                        "1,2 (default: none)")
    p.add_argument("--workers-state", default="redis://127.0.0.1:6379/0", metavar="URL",
                   help="Redis of the --workers rows; each row uses a key prefix of its own, deleted afterwards "
                        "(default redis://127.0.0.1:6379/0)")
    p.add_argument("--workers-db", default=None, metavar="URL",
                   help="keys and audit database of the --workers rows (default: a fresh SQLite file per row in "
                        "--workdir; e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    p.add_argument("--workers-threads", type=int, default=None,
                   help="torch threads per worker in the --workers rows (default: the CPU cores divided by N)")
    p.add_argument("--workers-sockets", default="balanced", type=_worker_sockets, metavar="KIND,KIND",
                   help="'serve --worker-sockets' of the --workers rows with N > 1, one row per value and N: "
                        "balanced (the default), reuse-port and/or shared; each row says how the load's "
                        "connections were spread over the workers")
    p.add_argument("--workers-policies", default="monitor", type=_worker_policies, metavar="POLICY,POLICY",
                   help="'serve --policy' of the --workers rows, one row per value: monitor (the default: every "
                        "query scored) and/or off (nothing scored: what the service costs without the detector), "
                        "reject, misinformation, pow")
    p.add_argument("--ray-replicas", default=[], type=worker_counts, metavar="N,N",
                   help="also time 'sameguard serve --engine ray --ray-replicas N' (a local Ray instance, one CPU "
                        "reserved per replica, state in --workers-state, keys and audit as --workers-db), one row "
                        "per N, like the --workers rows (default: none; needs pip install 'sameguard[ray]')")
    p.add_argument("--workers-compile", action="store_true",
                   help="time each --workers / --ray-replicas row a second time with 'serve --compile' (networks "
                        "compiled at start-up, minutes per row; needs a C compiler)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the library's log (-vv for debug)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _distinct(text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated distinct values of ``allowed`` (an ``argparse`` type)."""
    kinds = _names(text)
    if not kinds or any(k not in allowed for k in kinds) or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"expected distinct values of {', '.join(allowed)}, got {text!r}")
    return kinds


def _worker_policies(text: str) -> tuple[str, ...]:
    from ..service.settings import SERVICE_POLICIES

    return _distinct(text, SERVICE_POLICIES)


def _worker_sockets(text: str) -> tuple[str, ...]:
    from ..service.connection_balance import WORKER_SOCKETS

    return _distinct(text, WORKER_SOCKETS)


def bench_service_main(args: argparse.Namespace) -> int:
    """``sameguard bench-service``: see :func:`sameguard.bench.service_bench.run_service_bench`."""
    from ..service.commands import require_serve_extra

    require_serve_extra()
    from .service_bench import run_service_bench

    if args.keys < 1:
        raise ValueError(f"--keys must be a positive integer, got {args.keys}.")
    if args.workers_threads is not None and args.workers_threads < 1:
        raise ValueError(f"--workers-threads must be a positive integer, got {args.workers_threads}.")
    if args.ray_replicas:
        from ..service.ray_engine import require_ray

        require_ray()  # before anything is trained: one sentence saying what to install
    if (args.workers or args.ray_replicas) and not args.workers_state.startswith(("redis://", "rediss://")):
        from ..service.store import redact_store_url

        raise ValueError(f"--workers-state must be a redis:// URL (the workers share their state there), got "
                         f"{redact_store_url(args.workers_state)!r}.")

    result = run_service_bench(
        victim_dir=args.victim, detector_dir=args.detector, workdir=Path(args.workdir), requests=args.requests,
        requests_large=args.requests_large, batch_sizes=tuple(args.batch_sizes), concurrency=args.concurrency,
        keys=args.keys, gc_freeze=args.gc_freeze, settings=_names(args.settings), attacks=_names(args.attacks), budget=args.budget,
        attack_epochs=args.attack_epochs, benign=args.benign, knockoff_proxies=_names(args.knockoff_proxy),
        target_fpr=args.target_fpr, seed=args.seed, progress=args.progress, workers=tuple(args.workers),
        workers_state=args.workers_state, workers_db=args.workers_db, workers_threads=args.workers_threads,
        ray_replicas=tuple(args.ray_replicas), workers_compile=args.workers_compile, load_client=args.load_client,
        workers_sockets=args.workers_sockets, workers_policies=args.workers_policies)
    print(result.markdown(), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"\nwrote {args.out}", flush=True)
    return 0


BENCH_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"bench-service": bench_service_main}
