"""Where a single-image request's time goes: each stage of the service timed in process, and whole
requests over HTTP (the bare route, the service without and with the detector), in one run::

    python -m sameguard.bench.profile_request --victim VICTIM_DIR --detector SAME_DIR [--repeat 60] [--threads 1]

Prints a Markdown table of medians in milliseconds. The audit rows go to a throw-away SQLite file.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["profile_request", "main"]


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def profile_request(victim_dir: str, detector_dir: str, *, repeat: int = 60) -> list[tuple[str, float]]:
    """``[(stage, median ms)]`` for one single-image request; see the module docstring."""
    import httpx

    from ..guard import Guard
    from ..service import ServerThread, ServiceSettings, create_app
    from ..service.loading import load_detector
    from ..service.routers.predict import answer_body
    from ..validation import check_images
    from ..victim import Victim
    from .service_bench import bare_app

    victim = Victim.load(victim_dir)
    detector = load_detector(detector_dir, victim)
    x = torch.rand(1, *victim.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    body = json.dumps({"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(),
                       "shape": list(x.shape)}).encode()
    folder = tempfile.mkdtemp(prefix="profile-request-")
    unlimited = {"request_burst": 10 ** 9, "request_rate_per_second": 1e9, "rate_burst": 10 ** 9,
                 "rate_per_second": 1e9, "key_cache_s": 60}

    def app_for(name: str, guard: Any) -> tuple[Any, str]:
        app = create_app(ServiceSettings(db_url=f"sqlite:///{folder}/{name}.db", **unlimited), guard=guard)
        return app, app.state.sameguard.keys.create("alice")[1]

    monitor, token = app_for("monitor", Guard(victim, detector, "monitor", keep_decisions=0))
    st = monitor.state.sameguard
    rows = [("decode the JSON body and base64", _median_ms(lambda: torch.from_numpy(np.frombuffer(
                base64.b64decode(json.loads(body)["b64"]), "<f4").reshape(x.shape).copy()), repeat)),
            ("validate the images", _median_ms(lambda: check_images(x, victim.image_shape), repeat)),
            ("API key (cached)", _median_ms(lambda: st.keys.verify(token), repeat)),
            ("rate limits (in memory)", _median_ms(lambda: (st.limiter.take_request("alice"),
                                                             st.limiter.take("alice", 1)), repeat)),
            ("victim forward pass", _median_ms(lambda: victim(x), repeat)),
            ("detector score", _median_ms(lambda: detector.score(x), repeat)),
            ("guard.protect, all of it", _median_ms(lambda: st.guard.protect(x, "alice"), repeat))]
    verdict = st.guard.protect(x, "alice")
    rows.append(("audit row (SQLite, one transaction)", _median_ms(lambda: st.audit.append(
        [dataclasses.replace(d, request_id=uuid.uuid4().hex) for d in verdict.decisions]), repeat)))
    rows.append(("answer body and JSON", _median_ms(lambda: json.dumps(answer_body(verdict, "probabilities", "r")),
                                                    repeat)))
    off, off_token = app_for("off", Guard(victim, None, "monitor", keep_decisions=0))
    for name, app, key in (("bare route (victim only)", bare_app(victim), "-"), ("service, --policy off", off, off_token),
                           ("service, monitor", monitor, token)):
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60, headers={
                "X-API-Key": key, "content-type": "application/json"}) as client:
            rows.append((f"HTTP request end to end, {name}",
                         _median_ms(lambda c=client: c.post("/v1/predict", content=body).raise_for_status(), repeat)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.profile_request",
                                description="Time each stage of a single-image request, and whole requests over HTTP.")
    p.add_argument("--victim", required=True, help="folder of a saved victim")
    p.add_argument("--detector", required=True, help="folder of a saved detector for it")
    p.add_argument("--repeat", type=int, default=60, help="calls per stage (default 60)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = profile_request(args.victim, args.detector, repeat=args.repeat)
    print("| stage | median ms |\n|---|---:|")
    for stage, ms in rows:
        print(f"| {stage} | {ms:.2f} |")
    return 0


if __name__ == "__main__":  # errors in one sentence, as the sameguard commands report them
    from ..cli_errors import run_reporting_errors

    raise SystemExit(run_reporting_errors("bench.profile_request", main))
