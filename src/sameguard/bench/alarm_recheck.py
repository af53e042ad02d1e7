"""The per-client alarm study of a benchmark profile again, on its cached models, with alarm options changed::

    python -m sameguard.bench.alarm_recheck --config standard --bench-dir runs/bench/standard \
        --calibration-conditional none,1e-3 [--seeds 0,1,2] [--out runs/alarm-recheck.md]

``sameguard bench`` trains (or loads from its cache) the victim, the detectors and the attacks' query
sets of each seed, then runs the alarm study (queries until alarm per attack stream, false alarms among
1 000 random and 55 class-skewed benign clients) and the attacks through the guard. This command
repeats only the alarm study, once per value of each changed option, on what an earlier ``bench`` run
left in ``--bench-dir``'s cache, and prints the report's alarm table for each value (so a change of
the p-values is measured on the same networks and the same attack streams, in minutes instead of the
hours a cold seed takes). Nothing it needs is trained if the cache holds it; what is missing is
trained as ``bench`` would (slow). Only the detectors the ``[alarms]`` table names are loaded.

Options it varies: ``calibration_conditional`` (``none`` for the marginal p-values, or ``eta`` for
calibration-conditional ones, see :class:`~sameguard.evidence.ConformalCalibrator`) and
``stream_pool_size`` (``none`` for every pixel, or the size the stream test pools images to, see
:class:`~sameguard.evidence.StreamExchangeabilityTest`); every combination of the values given runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cli_checks import comma_ints, pool_size_arg
from ..data import load_dataset
from ..steps import StepLog
from ..validation import check_eta
from .config import BenchConfig, load_config
from .report import alarm_report
from .runner import _alarm_records, _attack_queries, _fit_detectors, _start_run

logger = logging.getLogger(__name__)

__all__ = ["main", "recheck_alarms"]


def _alarm_only(config: BenchConfig) -> BenchConfig:
    """``config`` with only the detectors its ``[alarms]`` table names (their cache keys do not change)."""
    assert config.alarms is not None
    wanted = set(config.alarms.detectors) | set(config.alarms.combination)
    return dataclasses.replace(config, detectors=tuple(d for d in config.detectors if d.label in wanted))


def recheck_alarms(config: BenchConfig, bench_dir: str | Path, *, conditional: Sequence[float | None],
                   stream_pool_size: Sequence[int | None] = (None,),
                   seeds: Sequence[int] | None = None, data_dir: str | None = None,
                   echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The alarm study's records (kinds ``attack`` and ``benign``) per seed and per option value.

    Args:
        config: a benchmark profile with an ``[alarms]`` table.
        bench_dir: that profile's ``bench`` output folder; its ``cache`` is read (and completed).
        conditional: values of ``calibration_conditional`` to run (``None``: marginal p-values).
        stream_pool_size: values of ``stream_pool_size`` to run (``None``: every pixel).
        seeds: the seeds (default: the profile's).
        data_dir: folder of the dataset files.

    Returns:
        The records of :func:`~sameguard.bench.runner._alarm_records` (each names its
        ``calibration_conditional`` and ``stream_pool_size``).
    """
    if config.alarms is None:
        raise ValueError(f"The profile {config.name} has no [alarms] table: there is no alarm study to repeat.")
    if not conditional or not stream_pool_size:
        raise ValueError("Give at least one value of calibration_conditional and of stream_pool_size to run.")
    echo = echo if echo is not None else StepLog()
    subset = _alarm_only(config)
    common = {"cache": Path(bench_dir) / "cache", "plots": Path(bench_dir) / "plots", "data_dir": data_dir,
              "device": "cpu", "progress": False, "echo": echo}
    records: list[dict[str, Any]] = []
    for dataset in config.datasets:
        full_train = load_dataset(dataset, "train", data_dir=data_dir)
        test = load_dataset(dataset, "test", data_dir=data_dir)
        for seed in seeds if seeds is not None else config.seeds:
            run = _start_run(subset, dataset, seed, full_train, test, **common)
            detectors = _fit_detectors(run, run.alarm_benign.images[:64])  # the benign scores are not used here
            streams = {aspec.label: _attack_queries(aspec, run) for aspec in config.attacks}
            for eta in conditional:
                for pool in stream_pool_size:
                    alarms = dataclasses.replace(config.alarms, calibration_conditional=eta, stream_pool_size=pool)
                    variant = dataclasses.replace(run, config=dataclasses.replace(subset, alarms=alarms))
                    records += _alarm_records(variant, streams, detectors)
    return records


def _comma_values(text: str, none: tuple[str, ...], parse: Callable[[str], Any], what: str) -> list[Any]:
    """Comma-separated option values: a word of ``none`` is ``None``, anything else goes through ``parse``
    (a ``ValueError`` becomes argparse's error, naming ``what`` was expected)."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            values.append(None if part in none else parse(part))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{part!r} is neither 'none' nor {what}: {exc}") from None
    return values


def _parse_conditional(text: str) -> list[float | None]:
    return _comma_values(text, ("none", "marginal"), lambda v: check_eta(float(v), "eta"), "a valid eta")


def parse_pool_sizes(text: str) -> list[int | None]:
    """``none,14,7`` -> ``[None, 14, 7]``: stream-test poolings, each read by :func:`~sameguard.cli_checks.pool_size_arg`."""
    return [pool_size_arg(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.alarm_recheck",
                                description="Repeat a benchmark profile's per-client alarm study on its cached models "
                                            "with other alarm options; print the alarm table per option value.")
    p.add_argument("--config", default="standard", help="profile name or TOML file (default standard)")
    p.add_argument("--bench-dir", default=None, help="the profile's bench folder (default runs/bench/<profile>)")
    p.add_argument("--calibration-conditional", type=_parse_conditional, default=[None, 1e-3],
                   help="comma-separated values: 'none' (marginal p-values) or eta in (0, 0.5] (default none,1e-3)")
    p.add_argument("--stream-pool-size", type=parse_pool_sizes, default=[None],
                   help="comma-separated values: 'none' (every pixel) or the size the stream test pools images "
                        "to (default none)")
    p.add_argument("--seeds", type=functools.partial(comma_ints, minimum=0), default=None, help="comma-separated seeds (default: the profile's)")
    p.add_argument("--data-dir", default=None, help="folder holding dataset files")
    p.add_argument("--out", default=None, help="also write the Markdown to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sameguard.evidence.monitor").setLevel(logging.ERROR)  # one line per alarmed client
    config = load_config(args.config)
    bench_dir = Path(args.bench_dir or Path("runs") / "bench" / config.name)
    records = recheck_alarms(config, bench_dir, conditional=args.calibration_conditional,
                             stream_pool_size=args.stream_pool_size, seeds=args.seeds, data_dir=args.data_dir)
    lines = [f"# Per-client alarms of `{config.name}` on its cached models, seeds "
             f"{sorted({r['seed'] for r in records})}", ""]
    for eta in args.calibration_conditional:
        for pool in args.stream_pool_size:
            name = "marginal p-values" if eta is None else f"calibration-conditional p-values, eta = {eta:g}"
            name += "" if pool is None else f"; stream test on images pooled to {pool}x{pool}"
            chosen = [r for r in records if r["calibration_conditional"] == eta and r["stream_pool_size"] == pool]
            lines += [f"## {name}"] + alarm_report(chosen) + [""]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":  # errors in one sentence, as the sameguard commands report them
    from ..cli_errors import run_reporting_errors

    raise SystemExit(run_reporting_errors("bench.alarm_recheck", main))
