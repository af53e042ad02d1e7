"""Does one abusive API key slow the others down? A measurement against a running service.

One *victim* key sends single-image requests at a steady pace (``--pace`` per second, one thread)
for ``--seconds``; its latency is measured alone, then while an *abuser* key floods the service
from ``--threads`` threads as fast as it can with (a) valid single-image requests, (b) invalid
requests (malformed JSON), (c) batches of ``--batch`` images. The service answers the abuser with
429 once its per-key limits are spent; what matters is the victim's latency. Run it against
``sameguard serve`` started with the default limits::

    sameguard keys create --name victim --quiet --db sqlite:///abuse.db     # -> $VICTIM_KEY
    sameguard keys create --name abuser --quiet --db sqlite:///abuse.db     # -> $ABUSER_KEY
    sameguard serve --victim V --detector D --db sqlite:///abuse.db &
    SG_VICTIM_KEY=$VICTIM_KEY SG_ABUSER_KEY=$ABUSER_KEY python -m sameguard.bench.abuse --url http://127.0.0.1:8000

The keys are read from the environment (``SG_VICTIM_KEY``, ``SG_ABUSER_KEY``), never from the
command line. Prints a Markdown table; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import threading
import time
from collections import Counter
from typing import Any

import torch

__all__ = ["measure_abuse", "main"]


def _body(n: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    return json.dumps({"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(),
                       "shape": list(x.shape)}).encode()


def _victim(url: str, key: str, seconds: float, pace: float, image_shape: tuple[int, ...]) -> tuple[list[float], Counter]:
    import httpx

    latencies: list[float] = []
    codes: Counter = Counter()
    bodies = [_body(1, s) for s in range(8)]
    headers = {"X-API-Key": key, "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        start = time.perf_counter()
        i = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + i / pace
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            r = client.post("/v1/predict", content=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] += 1
            i += 1
    return latencies, codes


def _flood(url: str, key: str, stop: threading.Event, body: bytes, codes: Counter, lock: threading.Lock) -> None:
    import httpx

    headers = {"X-API-Key": key, "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        while not stop.is_set():
            try:
                code = client.post("/v1/predict", content=body).status_code
            except httpx.HTTPError:
                code = -1
            with lock:
                codes[code] += 1


def measure_abuse(url: str, victim_key: str, abuser_key: str, *, seconds: float = 10.0, pace: float = 10.0,
                  threads: int = 8, batch: int = 64, image_shape: tuple[int, ...] = (1, 28, 28),
                  scenarios: tuple[str, ...] = ("alone", "valid", "invalid", "batches")) -> list[dict[str, Any]]:
    """One row per scenario: the victim's latency percentiles and the abuser's answers by status."""
    bodies = {"valid": _body(1, 100), "invalid": b'{"instances": [[[[0.1, 0.2], oops', "batches": _body(batch, 200)}
    rows: list[dict[str, Any]] = []
    alone_p50 = None
    for scenario in scenarios:
        stop, lock, abuser = threading.Event(), threading.Lock(), Counter()
        flooders = [] if scenario == "alone" else [
            threading.Thread(target=_flood, args=(url, abuser_key, stop, bodies[scenario], abuser, lock), daemon=True)
            for _ in range(threads)]
        for t in flooders:
            t.start()
        if flooders:
            time.sleep(1.0)  # let the abuser's burst go by: we measure the steady state
        latencies, codes = _victim(url, victim_key, seconds, pace, image_shape)
        stop.set()
        for t in flooders:
            t.join(timeout=60)
        p50 = 1000 * statistics.median(latencies)
        alone_p50 = p50 if scenario == "alone" else alone_p50
        ordered = sorted(latencies)
        rows.append({"scenario": scenario, "victim_requests": len(latencies), "victim_ok": codes.get(200, 0),
                     "victim_p50_ms": p50, "victim_p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
                     "ratio_to_alone": None if alone_p50 is None else p50 / alone_p50,
                     "abuser_requests": sum(abuser.values()), "abuser_ok": abuser.get(200, 0),
                     "abuser_429": abuser.get(429, 0),
                     "abuser_other": sum(v for k, v in abuser.items() if k not in (200, 429))})
        time.sleep(2.0)  # let the server drain
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| abuser sends | victim requests | victim p50 ms | victim p90 ms | p50 / alone | abuser requests | "
             "abuser 200 | abuser 429 | abuser other |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "-" if r["ratio_to_alone"] is None else f"{r['ratio_to_alone']:.2f}"
        lines.append(f"| {r['scenario']} | {r['victim_requests']} | {r['victim_p50_ms']:.1f} | {r['victim_p90_ms']:.1f} | "
                     f"{ratio} | {r['abuser_requests']} | {r['abuser_ok']} | {r['abuser_429']} | {r['abuser_other']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.abuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--seconds", type=float, default=10.0, help="victim measurement per scenario (default 10)")
    p.add_argument("--pace", type=float, default=10.0, help="victim requests per second (default 10)")
    p.add_argument("--threads", type=int, default=8, help="abuser threads (default 8)")
    p.add_argument("--batch", type=int, default=64, help="images per abuser batch in the 'batches' scenario (default 64)")
    p.add_argument("--scenarios", default="alone,valid,invalid,batches")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    victim, abuser = os.environ.get("SG_VICTIM_KEY"), os.environ.get("SG_ABUSER_KEY")
    if not victim or not abuser:
        p.error("set SG_VICTIM_KEY and SG_ABUSER_KEY to two API keys of the service")
    rows = measure_abuse(args.url, victim, abuser, seconds=args.seconds, pace=args.pace, threads=args.threads,
                         batch=args.batch, scenarios=tuple(s for s in args.scenarios.split(",") if s))
    print(markdown(rows), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
