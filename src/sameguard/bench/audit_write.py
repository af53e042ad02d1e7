"""What writing a request's audit row costs, with and without group commit::

    python -m sameguard.bench.audit_write [--db sqlite:///runs/audit-write.db] [--threads 1,16] [--appends 2000]

Appends one-row batches to the audit log (:meth:`AuditLog.append <sameguard.service.audit.AuditLog.append>`,
as a request of one image does) from ``T`` threads at once, ``--appends`` in all, once through the group
commit (:mod:`sameguard.service.group_commit`, what the service does) and once with a transaction per
append (the log's insert called directly, as before group commit), the two in turn for each thread count.
Prints a Markdown table: the process's CPU milliseconds and the wall milliseconds per append, and the
transactions written. The rows stay (the audit log is append-only): by default they go to a fresh SQLite
file in a temporary folder; a ``--db`` given keeps them under clients named ``audit-write-*``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["main", "measure"]


def measure(db_url: str, threads: int, appends: int, *, group: bool) -> dict[str, float]:
    """``{"cpu_ms", "wall_ms", "transactions"}``: CPU and wall milliseconds per append, and the transactions
    written, for ``appends`` one-row appends from ``threads`` threads (``group``: through the group commit,
    else a transaction each)."""
    from ..decisions import Decision
    from ..service.audit import AuditLog
    from ..service.db import init_db, make_engine

    if threads < 1 or appends < 1:
        raise ValueError("threads and appends must be positive integers.")
    engine = make_engine(db_url)
    init_db(engine)
    log = AuditLog(engine, {"sameguard": "bench", "policy": "monitor"}, group_commit=group)
    client = f"audit-write-{uuid.uuid4().hex[:8]}"
    transactions = [0]
    insert = log._insert

    def counted(groups: Any) -> None:  # the one place both kinds write through
        transactions[0] += 1  # under the group's writer lock, or on the calling thread: counted after the run
        insert(groups)

    log._insert = counted
    if log._group is not None:
        log._group._write = counted

    def one(_: int) -> None:
        log.append([Decision(time=time.time(), client=client, input_sha256="0" * 64, score=0.5, threshold=1.0,
                             flagged=False, action="allow", request_id=uuid.uuid4().hex)])

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(min(threads, appends))))  # threads started, connections opened
            start_transactions = transactions[0]
            cpu, wall = time.process_time(), time.perf_counter()
            list(pool.map(one, range(appends)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        engine.dispose()
    return {"cpu_ms": 1000 * cpu / appends, "wall_ms": 1000 * wall / appends,
            "transactions": float(transactions[0] - start_transactions)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.audit_write",
                                description="CPU and wall milliseconds per one-row audit append from T threads, "
                                            "with and without group commit.")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: a fresh SQLite file in a temporary folder)")
    p.add_argument("--threads", default="1,16", help="comma-separated thread counts (default 1,16)")
    p.add_argument("--appends", type=int, default=2000, help="timed appends per measurement (default 2000)")
    p.add_argument("--repeat", type=int, default=2, help="measurements of each kind per thread count, in turn (default 2)")
    args = p.parse_args(argv)
    try:
        counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        p.error("--threads must be comma-separated positive integers")
    if not counts or min(counts) < 1 or args.appends < 1 or args.repeat < 1:
        p.error("--threads, --appends and --repeat must be positive")
    logging.basicConfig(level=logging.WARNING)
    url = args.db or f"sqlite:///{Path(tempfile.mkdtemp(prefix='audit-write-')) / 'audit.db'}"
    print("| threads | audit write | CPU ms / append | wall ms / append | transactions |\n|---:|---|---:|---:|---:|")
    for t in counts:
        for _ in range(args.repeat):
            for group in (False, True):
                r = measure(url, t, args.appends, group=group)
                print(f"| {t} | {'group commit' if group else 'a transaction each'} | {r['cpu_ms']:.3f} | "
                      f"{r['wall_ms']:.3f} | {r['transactions']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":  # errors in one sentence, as the sameguard commands report them
    from ..cli_errors import run_reporting_errors

    raise SystemExit(run_reporting_errors("bench.audit_write", main))
