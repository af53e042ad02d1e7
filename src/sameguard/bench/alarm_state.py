"""What a client's alarm state weighs, and what one query's update costs, in memory and in Redis::

    python -m sameguard.bench.alarm_state [--history 1000] [--queries 200] [--redis redis://127.0.0.1:6379/0]
        [--pool-sizes none,14,7]

The per-client state of :class:`~sameguard.evidence.EvidenceMonitor` holds the stream test's bag (the
client's queries of the current block, as the test compares them), so its size grows with the client's
history and with the features per image. For each pooling of the stream test this builds a monitor
(one calibrated detector and the stream test, random 28x28 images), sends ``--history`` queries in one
batch, then times ``--queries`` single-image updates (median wall-clock milliseconds), in memory and, with
``--redis``, in Redis twice: in the layout the service uses,
:class:`~sameguard.evidence.redis_state.RedisClientStates` (``Redis, rows appended``: each update sends
the query's new row and the bag's distances, and fetches only rows it has not seen), and as one value,
:class:`~sameguard.evidence.redis_store.RedisStore` (``Redis, whole state``: the whole state read and
written in each query's transaction, as version 0.3.0 did). Keys go under a prefix of their own, deleted
afterwards. It prints a Markdown table with the serialised state's size.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from typing import Any

import numpy as np
import torch

from ..evidence import ClientState, ConformalCalibrator, EvidenceMonitor, StreamExchangeabilityTest
from .alarm_recheck import parse_pool_sizes

__all__ = ["main", "measure"]

logger = logging.getLogger(__name__)


#: How :func:`measure` keeps the state in Redis: ``"rows"`` (appended rows) or ``"whole"`` (one value).
LAYOUTS = ("rows", "whole")


def measure(pool_size: int | None, *, history: int = 1000, queries: int = 200, redis_client: Any = None,
            seed: int = 0, layout: str = "rows") -> dict[str, float]:
    """``{"ms": median ms per single-image update, "state_mb": serialised state in MB}`` for one pooling,
    in memory (``redis_client`` ``None``) or in Redis in ``layout`` (:data:`LAYOUTS`)."""
    from ..evidence.redis_state import RedisClientStates
    from ..evidence.redis_store import RedisStore

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (2000,), generator=g)  # about 200 calibration scores a class
    calibrator = ConformalCalibrator().fit(torch.randn(2000, generator=g), labels, 10)
    prefix = f"sameguard-bench:{uuid.uuid4().hex}:"
    store: Any = None
    if redis_client is not None:
        store = RedisClientStates(redis_client, prefix) if layout == "rows" else \
            RedisStore(redis_client, prefix, ClientState.to_bytes, ClientState.from_bytes)
    monitor = EvidenceMonitor({"score": calibrator}, stream=StreamExchangeabilityTest(pool_size=pool_size),
                              store=store, seed=seed)
    x = torch.rand(history + queries, 1, 28, 28, generator=g) * 2 - 1
    try:
        if history:
            monitor.update("client", {"score": torch.randn(history, generator=g)},
                           torch.randint(0, 10, (history,), generator=g), x[:history])
        times = []
        for i in range(history, history + queries):
            start = time.perf_counter()
            monitor.update("client", {"score": torch.randn(1, generator=g)}, torch.tensor([i % 10]), x[i:i + 1])
            times.append(time.perf_counter() - start)
        size = len(monitor.store.get("client").to_bytes())
    finally:
        if store is not None:
            store.delete("client")
    return {"ms": 1000 * float(np.median(times)), "state_mb": size / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.alarm_state",
                                description="Per-client alarm state: its size and one query's update, in memory "
                                            "and in Redis, for each pooling of the stream test.")
    p.add_argument("--history", type=int, default=1000, help="earlier queries of the client (default 1000)")
    p.add_argument("--queries", type=int, default=200, help="timed single-image updates (default 200)")
    p.add_argument("--redis", default=None, metavar="URL", help="also time a Redis store at this URL")
    p.add_argument("--pool-sizes", default="none,14,7",
                   help="comma-separated poolings of the stream test: a size, or 'none' for every pixel")
    args = p.parse_args(argv)
    if args.history < 0 or args.queries < 1:
        p.error("--history must be >= 0 and --queries >= 1")
    try:
        pools = parse_pool_sizes(args.pool_sizes)
    except argparse.ArgumentTypeError as exc:
        p.error(f"--pool-sizes: {exc}")
    logging.basicConfig(level=logging.WARNING)
    client = None
    if args.redis:
        import redis

        client = redis.Redis.from_url(args.redis)
    print(f"client history {args.history}, {args.queries} single-image updates each, median ms\n")
    print("| stream test compares | store | ms per query | state (MB) |\n|---|---|---:|---:|")
    stores = [("memory", None, "rows")]
    if client is not None:
        stores += [("Redis, rows appended", client, "rows"), ("Redis, whole state", client, "whole")]
    for pool in pools:
        for where, kv, layout in stores:
            r = measure(pool, history=args.history, queries=args.queries, redis_client=kv, layout=layout)
            label = "every pixel" if pool is None else f"{pool}x{pool} pooled"
            print(f"| {label} | {where} | {r['ms']:.2f} | {r['state_mb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":  # errors in one sentence, as the sameguard commands report them
    from ..cli_errors import run_reporting_errors

    raise SystemExit(run_reporting_errors("bench.alarm_state", main))
