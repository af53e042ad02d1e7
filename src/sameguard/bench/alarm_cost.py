"""What the per-client alarms add to a single-image query through the guard, measured on its own::

    python -m sameguard.bench.alarm_cost [--queries 300] [--client-history N] [--no-stream]
        [--stream-pool-size 14|none] [--stream-window 1000] [--profile] [--free-scorers]

Builds the ``standard`` profile's architectures with untrained (or barely trained) weights, since
timing does not depend on them: the victim ``conv3`` for 28x28x1 images, SAME with the ``cpu``
preset's masked auto-encoder and its auxiliary ``conv3`` (fitted for one epoch on random images),
and the alarms' other scorers (SAME's s2 term, MSP, Energy), calibrated on a few hundred random
images. Then it times :meth:`~sameguard.guard.Guard.protect` on single images with SAME alone and
with the per-client alarms (the guard the benchmark builds, :func:`alarm_guard`), alternating the
two query by query so that machine noise hits both alike, and prints the medians in milliseconds
and their ratio as a Markdown table (with the 10th percentiles, less sensitive to a busy machine,
and the medians of the process's CPU time, which other processes do not inflate: with
``--threads 1`` the figure to compare on a shared machine), and the median CPU time spent inside
:meth:`ClientAlarms.update <sameguard.alarms.ClientAlarms.update>` (the alarms' own work in a request);
``--profile`` adds a cProfile top list of the guard with the alarms.

The timed client first sends ``--client-history`` earlier queries (in batches), because the stream
test compares each query with the client's earlier ones in its current block (up to ``window``,
default 1 000): its cost grows with that history. By default the history centres the timed queries'
bags on half the window, the mean bag of a client that keeps querying (:func:`centred_history`). The benchmark's own figure (``bench`` records of kind
``cost``) is measured by :func:`alternate_median_ms` too, on trained networks.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import logging
import pstats
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..actions import Policy
from ..alarms import ClientAlarms
from ..cli_checks import pool_size_arg
from ..detectors import build_detector, fit_detector
from ..evidence import stream_test
from ..evidence.stream import DEFAULT_POOL_SIZE, DEFAULT_WINDOW
from ..guard import Guard
from ..victim import Victim
from .untrained import build_models

logger = logging.getLogger(__name__)

__all__ = ["alarm_guard", "alternate_median_ms", "alternate_times_ms", "build_networks", "centred_history", "main",
           "mean_bag", "measure"]

#: The ``standard`` profile's geometry and architectures (Fashion-MNIST, ``conv3``, SAME ``cpu``).
IMAGE_SHAPE = (1, 28, 28)
ARCH = "conv3"


def alarm_guard(victim: Any, scorers: Mapping[str, Any], calibration_x: torch.Tensor, *, delta: float,
                stream: bool, seed: int, policy: str = "monitor", output: str = "probabilities",
                per_query_fpr: float | None = None, conditional: float | None = None,
                stream_pool_size: int | None = None, stream_window: int = DEFAULT_WINDOW) -> Guard:
    """The benchmark's protected model: per-client alarms over ``scorers`` (and the stream test),
    calibrated on ``calibration_x``; the first scorer is also the guard's per-query detector.

    Args:
        victim: ``images -> probabilities (N, K)``.
        scorers: label -> fitted per-query detector, in order (the first one is the guard's).
        calibration_x: ``(M, C, H, W)`` benign images in ``[-1, 1]`` unseen by victim and scorers.
        delta: the false-alarm bound in (0, 1).
        stream: add the stream test of each client's own queries.
        seed: the alarms' smoothing seed.
        policy: the action on every query of an alarmed client (``"monitor"``: none).
        output: ``"probabilities"`` or ``"labels"``.
        per_query_fpr: ``None``: no per-query action before the alarm (threshold ``+inf``); else the
            first scorer's threshold is set for this benign false-positive rate.
        conditional: ``eta`` for calibration-conditional p-values (``None``: marginal ones).
        stream_pool_size: the stream test's ``pool_size`` (``None``: every pixel).
        stream_window: the stream test's ``window``.
    """
    alarms = ClientAlarms.calibrate(victim, scorers, calibration_x, delta=delta,
                                    stream=stream_test(stream, stream_pool_size, stream_window), seed=seed,
                                    conditional=conditional)
    threshold = None if per_query_fpr is not None else float("inf")
    guard = Guard(victim, scorers[next(iter(scorers))], Policy(policy, threshold=threshold), alarms=alarms,
                  output=output, keep_decisions=0, history=False)
    return guard.calibrate(calibration_x, per_query_fpr)  # and proof-of-work's benign bits


def alternate_timings(guards: Mapping[str, Guard], x: torch.Tensor, *, client: str = "timing",
                      batch: int = 1) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and CPU milliseconds of each :meth:`Guard.protect` call of each guard on ``x``, ``batch``
    images a call (single images by default).

    Each guard first answers one warm-up query (client ``"warm-up"``); then the guards take turns
    query by query (``client``), so that machine noise hits all of them alike.

    Args:
        guards: name -> guard, in the order they take turns.
        x: ``(n, C, H, W)`` images in ``[-1, 1]``, one query each.
        batch: images per call (the last call may hold fewer).

    Returns:
        name -> ``{"wall": [...], "cpu": [...]}``, one time per call in milliseconds, in order.
        ``cpu`` is this process's CPU time (:func:`time.process_time`, all its threads): unlike the
        wall clock it does not grow while other processes hold the cores, so on a busy machine it
        measures the work itself (with one torch thread, exactly; with more, their spinning counts too).
    """
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in guards}
    for guard in guards.values():
        guard.protect(x[:1], "warm-up")
    for i in range(0, len(x), batch):
        for name, guard in guards.items():
            wall, cpu = time.perf_counter(), time.process_time()
            guard.protect(x[i:i + batch], client)
            times[name]["cpu"].append(1000 * (time.process_time() - cpu))
            times[name]["wall"].append(1000 * (time.perf_counter() - wall))
    return times


def alternate_times_ms(guards: Mapping[str, Guard], x: torch.Tensor, *, client: str = "timing") -> dict[str, list[float]]:
    """name -> the wall-clock milliseconds of :func:`alternate_timings`, in query order."""
    return {name: t["wall"] for name, t in alternate_timings(guards, x, client=client).items()}


def alternate_median_ms(guards: Mapping[str, Guard], x: torch.Tensor, *, client: str = "timing") -> dict[str, float]:
    """Median milliseconds per single-image query of each guard, from :func:`alternate_times_ms`."""
    return {name: float(np.median(v)) for name, v in alternate_times_ms(guards, x, client=client).items()}


def _random_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, 28, 28)`` float32 uniform images in ``[-1, 1]``."""
    return torch.rand(n, *IMAGE_SHAPE, generator=generator) * 2 - 1


def build_networks(seed: int = 0, fit_images: int = 256) -> tuple[Victim, dict[str, Any]]:
    """The standard profile's victim and the alarms' combination of scorers, on random weights.

    SAME (``cpu`` preset's MAE, auxiliary ``conv3``) is :func:`~sameguard.bench.untrained.build_models`'
    (one epoch on ``fit_images`` random images, which fixes its architectures); SAME's s2 term shares its
    networks (as in the benchmark), MSP and Energy read the victim's outputs.

    Returns:
        ``(victim, scorers)``: scorers in the benchmark's combination order (SAME, SAME s2, MSP, Energy).
    """
    victim, same = build_models(preset="cpu", victim_arch=ARCH, seed=seed, fit_images=fit_images)
    s2 = copy.copy(same)  # shares the networks, as the benchmark's SAME variants do
    s2.alpha = 0.0
    scorers = {"SAME": same, "SAME s2 only (alpha=0)": s2}
    for name, label in (("msp", "MSP"), ("energy", "Energy")):
        scorers[label] = fit_detector(build_detector(name), victim)
    return victim, scorers


def centred_history(window: int, timed: int) -> int:
    """Earlier queries a timed client sends first so that the stream test's bags over its ``timed`` queries
    are centred on ``window / 2``, the mean bag of a client that keeps querying (bags grow from 0 to
    ``window - 1``, then the block restarts): ``(window - timed) // 2``, or 0 when the timed queries fill a
    block or more."""
    return max(0, (window - timed) // 2)


def mean_bag(window: int, history: int, timed: int) -> float:
    """The mean number of earlier queries in the stream test's bag over ``timed`` queries sent after
    ``history`` ones, with blocks of ``window``."""
    return float(np.mean(np.arange(history, history + timed) % window)) if timed else 0.0


def measure(*, queries: int = 300, stream: bool = True, client_history: int | None = None, calibration: int = 500,
            delta: float = 1e-3, seed: int = 0, profile: bool = False, batch: int = 1,
            stream_pool_size: int | None = DEFAULT_POOL_SIZE, free_scorers: bool = False,
            stream_window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """Time queries through the guard with SAME alone and with the alarms.

    Args:
        queries: timed calls per guard (alternated).
        batch: images per call (default 1: single-image queries); times are per call.
        stream: include the stream test in the alarms.
        client_history: queries the timed client sends first (in batches of 100), to both guards
            (``None``: :func:`centred_history` of the window and the timed images).
        calibration: random images the alarms are calibrated on.
        delta, seed: the alarms' settings.
        profile: also profile ``queries`` more single-image queries of the guard with the alarms.
        stream_pool_size: the stream test's ``pool_size`` (``None``: every pixel).
        stream_window: the stream test's ``window``.
        free_scorers: a diagnostic: the alarms' scorers other than the guard's detector (s2, MSP, Energy)
            are not run during the timed queries, their scores replaced by zeros, so that the figures show
            what the rest of the alarms (p-values, stream test, martingales, state) costs on its own.

    Returns:
        ``{"ms_guard", "ms_guard_with_alarms", "ratio"}`` (medians), the same for the 10th
        percentiles (``"p10_guard"``, ...: less sensitive to a busy machine, whose preemptions only
        add time), the medians of the process's CPU time (``"cpu_guard"``, ``"cpu_guard_with_alarms"``,
        ``"cpu_ratio"``: robust to other processes; exact with one torch thread), ``"cpu_update"`` (the median
        CPU milliseconds spent inside :meth:`ClientAlarms.update <sameguard.alarms.ClientAlarms.update>`, the
        alarms' whole work in a request: their scorers after the shared forward passes, p-values, stream
        test and martingales), and ``"profile"``
        (cProfile's top list as text, or ``None``).
    """
    victim, scorers = build_networks(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    calibration_x = _random_images(calibration, generator)
    plain = Guard(victim, scorers["SAME"], "monitor", keep_decisions=0, history=False)
    guarded = alarm_guard(victim, scorers, calibration_x, delta=delta, stream=stream, seed=seed,
                          stream_pool_size=stream_pool_size, stream_window=stream_window)
    if client_history is None:
        client_history = centred_history(stream_window, queries * batch)
    history = _random_images(client_history, generator)
    for guard in (plain, guarded):
        for start in range(0, client_history, 100):
            guard.protect(history[start:start + 100], "timing")
    x = _random_images(queries * batch, generator)
    if free_scorers:  # an instance attribute: this guard's alarms only
        guarded.alarms._scores = lambda scorer, images, probs: torch.zeros(len(images), dtype=torch.float64)
    inside = _time_calls(guarded.alarms, "update")
    try:
        timings = alternate_timings({"guard": plain, "guard_with_alarms": guarded}, x, batch=batch)
    finally:
        del guarded.alarms.update  # the class's method again

    ms = {name: float(np.median(t["wall"])) for name, t in timings.items()}
    p10 = {name: float(np.percentile(t["wall"], 10)) for name, t in timings.items()}
    cpu = {name: float(np.median(t["cpu"])) for name, t in timings.items()}
    text = None
    if profile:
        more = _random_images(queries, generator)
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(queries):
            guarded.protect(more[i:i + 1], "timing")
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        text = out.getvalue()
    return {"ms_guard": ms["guard"], "ms_guard_with_alarms": ms["guard_with_alarms"],
            "ratio": ms["guard_with_alarms"] / ms["guard"], "p10_guard": p10["guard"],
            "p10_guard_with_alarms": p10["guard_with_alarms"],
            "p10_ratio": p10["guard_with_alarms"] / p10["guard"], "cpu_guard": cpu["guard"],
            "cpu_guard_with_alarms": cpu["guard_with_alarms"], "cpu_ratio": cpu["guard_with_alarms"] / cpu["guard"],
            "cpu_update": float(np.median(inside)), "profile": text, "client_history": client_history,
            "mean_bag": mean_bag(stream_window, client_history, queries * batch)}


def _time_calls(owner: Any, name: str) -> list[float]:
    """Wrap ``owner``'s method ``name`` (an instance attribute) so that each call appends its process CPU
    milliseconds to the returned list."""
    method, times = getattr(owner, name), []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            times.append(1000 * (time.process_time() - start))

    setattr(owner, name, timed)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.alarm_cost",
                                description="Median ms per single-image query through the guard, SAME alone and "
                                            "with the per-client alarms (untrained networks of the standard profile).")
    p.add_argument("--queries", type=int, default=300, help="timed calls per guard, alternated (default 300)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1: single-image queries)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="include the stream test (default: yes)")
    p.add_argument("--client-history", type=int, default=None,
                   help="earlier queries of the timed client (default: (window - timed images) / 2, so that the "
                        "timed queries' bags are centred on half the window, the mean bag of a client that keeps "
                        "querying)")
    p.add_argument("--calibration", type=int, default=500, help="random calibration images (default 500)")
    p.add_argument("--stream-pool-size", type=pool_size_arg, default=DEFAULT_POOL_SIZE,
                   help="the stream test compares images average-pooled to this size, or 'none' for every pixel "
                        f"(default {DEFAULT_POOL_SIZE}, the stream test's default)")
    p.add_argument("--stream-window", type=int, default=DEFAULT_WINDOW,
                   help=f"the stream test's blocks, in queries (default {DEFAULT_WINDOW}, the stream test's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="add a cProfile top list of the guard with the alarms")
    p.add_argument("--free-scorers", action="store_true",
                   help="diagnostic: do not run the alarms' other scorers (s2, MSP, Energy) in the timed queries, "
                        "zeros instead, to see what the rest of the alarms costs on its own")
    args = p.parse_args(argv)
    if (args.queries < 1 or args.batch < 1 or (args.client_history is not None and args.client_history < 0)
            or args.calibration < 2 or args.stream_window < 2 or (args.threads is not None and args.threads < 1)):
        p.error("--queries and --batch must be >= 1, --client-history >= 0, --calibration and --stream-window >= 2 "
                "and --threads >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sameguard.evidence.conformal").setLevel(logging.ERROR)  # random labels: small classes
    r = measure(queries=args.queries, stream=args.stream, client_history=args.client_history,
                calibration=args.calibration, seed=args.seed, profile=args.profile, batch=args.batch,
                stream_pool_size=args.stream_pool_size, free_scorers=args.free_scorers,
                stream_window=args.stream_window)
    stream_text = "off" if not args.stream else "on, every pixel" if args.stream_pool_size is None else \
        f"on, images pooled to {args.stream_pool_size}x{args.stream_pool_size}"
    if args.stream:
        stream_text += f", blocks of {args.stream_window} queries, mean bag {r['mean_bag']:.0f}"
    what = "single-image queries" if args.batch == 1 else f"calls of {args.batch} images (times per call)"
    print(f"{what}, {args.queries} each, alternated; client history {r['client_history']}; "
          f"stream test {stream_text}; torch threads {torch.get_num_threads()}\n")
    print("| guard | median ms | 10th percentile ms | median CPU ms |\n|---|---:|---:|---:|")
    print(f"| SAME alone | {r['ms_guard']:.2f} | {r['p10_guard']:.2f} | {r['cpu_guard']:.2f} |")
    scorers = "SAME; s2, MSP, Energy not run (--free-scorers)" if args.free_scorers else "SAME, s2, MSP, Energy"
    print(f"| SAME + alarms ({scorers}{', stream' if args.stream else ''}) | "
          f"{r['ms_guard_with_alarms']:.2f} | {r['p10_guard_with_alarms']:.2f} | {r['cpu_guard_with_alarms']:.2f} |")
    print(f"| ratio | {r['ratio']:.3f} (+{100 * (r['ratio'] - 1):.1f} %) | {r['p10_ratio']:.3f} "
          f"(+{100 * (r['p10_ratio'] - 1):.1f} %) | {r['cpu_ratio']:.3f} (+{100 * (r['cpu_ratio'] - 1):.1f} %) |")
    print(f"| of which inside the alarms' update (ClientAlarms.update) | | | {r['cpu_update']:.2f} |", flush=True)
    if r["profile"] is not None:
        print("\n" + r["profile"], flush=True)
    return 0


if __name__ == "__main__":  # errors in one sentence, as the sameguard commands report them
    from ..cli_errors import run_reporting_errors

    raise SystemExit(run_reporting_errors("bench.alarm_cost", main))
