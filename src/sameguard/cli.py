"""The ``sameguard`` command line: train a victim, fit / calibrate / apply SAME, run the demo.

Every command takes ``--seed``; long steps show progress bars on a terminal (``--no-progress``
turns them off) and ``-v`` shows the library's log.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .cli_checks import (OUTPUTS, check_data_dir, check_device, check_output_dir, check_output_file,
                         check_sqlite_url, comma_ints)
from .cli_errors import run_reporting_errors
from .cli_training import TRAINING_LOGGERS
from .steps import STEP_LOGGER

logger = logging.getLogger("sameguard.cli")


def _common(p: argparse.ArgumentParser, *, data: bool = False, seed: bool = True) -> None:
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0); the same seed gives the same numbers")
    if data:
        p.add_argument("--data-dir", default=None,
                       help="folder holding dataset files (else $SAMEGUARD_DATA_DIR, then Debian's location)")
        p.add_argument("--download", action="store_true",
                       help="allow downloading Fashion-MNIST's official files (verified by SHA-256) when not found")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, or auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="hide progress bars")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the library's log (-vv for debug)")


def add_attack_commands(sub) -> None:
    p = sub.add_parser("attack", help="run one extraction attack against a saved victim and measure its substitute",
                       description="Run a model-extraction attack (knockoff, knockoff-adaptive, jbda, jbda-tr, dfme) "
                                   "against a saved victim served as a bare prediction API, with exactly --budget "
                                   "queries, and print the substitute's test accuracy and fidelity.")
    p.add_argument("name", help="knockoff, knockoff-adaptive, jbda, jbda-tr, dfme, knockoff-blend, knockoff-mixup, "
                                "knockoff-interleave, knockoff-filtered or knockoff-wide")
    p.add_argument("--victim", required=True, help="folder of a saved victim")
    p.add_argument("--budget", type=int, default=4000, help="queries to spend (default: 4000)")
    p.add_argument("--output", choices=["probabilities", "labels"], default="probabilities",
                   help="what the API answers (default: probabilities)")
    p.add_argument("--proxy", default="digits", help="Knockoff's image pool, a dataset name (default: digits)")
    p.add_argument("--seed-fraction", type=float, default=0.1,
                   help="JBDA's seeds come from this held-out fraction of the victim's train split (default: 0.1)")
    p.add_argument("--epochs", type=int, default=None, help="substitute epochs (default: the paper's)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any constructor argument of the attack, VALUE read as JSON when it parses (else a "
                        "string); repeatable, e.g. --param lam=0.5 --param keys=8 --param scorer=same")
    p.add_argument("--save", default=None, help="save the substitute as a victim-format folder")
    p.add_argument("--detector", default=None,
                   help="folder of a saved detector (any kind) fitted for this victim: serve the victim behind it "
                        "and score every attack query")
    p.add_argument("--scores-out", default=None, help="with --detector: write each query's score to this CSV")
    _common(p, data=True)

    p = sub.add_parser("bench-attacks", help="substitute quality of each attack at each budget (Markdown table)",
                       description="Run each attack at each budget against a saved victim and print a table of "
                                   "queries used, substitute accuracy, fidelity and victim accuracy.")
    p.add_argument("--victim", required=True, help="folder of a saved victim")
    p.add_argument("--attacks", default="knockoff,jbda,jbda-tr,dfme", help="comma-separated attack names")
    p.add_argument("--budgets", default="1000,4000", type=comma_ints,
                   help="comma-separated query budgets (default: 1000,4000)")
    p.add_argument("--output", choices=["probabilities", "labels"], default="probabilities",
                   help="what the API answers (default: probabilities)")
    p.add_argument("--proxy", default="digits", help="Knockoff's image pool (default: digits)")
    p.add_argument("--seed-fraction", type=float, default=0.1, help="held-out fraction for JBDA's seeds")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    _common(p, data=True)


def _attack_data(args: argparse.Namespace):
    from .data import load_dataset
    from .victim import Victim

    victim = Victim.load(args.victim, device=args.device)
    test = load_dataset(victim.dataset, "test", data_dir=args.data_dir, download=args.download)
    train = load_dataset(victim.dataset, "train", data_dir=args.data_dir, download=args.download)
    _, seeds = train.split_off(args.seed_fraction, seed=args.seed)
    proxy = load_dataset(args.proxy, "train", data_dir=args.data_dir, download=args.download)
    return victim, test, proxy, seeds


def _attack_params(pairs: list[str]) -> dict[str, object]:
    """``["lam=0.5", "scorer=same"]`` -> ``{"lam": 0.5, "scorer": "same"}`` (values parsed as JSON when they parse)."""
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param takes KEY=VALUE, got {pair!r}.")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def cmd_attack(args: argparse.Namespace) -> int:
    from .attacks import attack_data, build_attack
    from .guard import Guard

    if args.scores_out and not args.detector:
        raise ValueError("--scores-out needs --detector: scores come from the detector the victim is served behind.")
    victim, test, proxy, seeds = _attack_data(args)
    data = attack_data(args.name, proxy, seeds)
    extra = {**({} if args.epochs is None else {"epochs": args.epochs}), **_attack_params(args.param)}
    attack = build_attack(args.name, *data, seed=args.seed, device=args.device, progress=args.progress, **extra)
    if args.detector:
        from .detectors.registry import load_detector

        detector = load_detector(args.detector, victim, device=args.device)
        api = Guard(victim, detector, "monitor", output=args.output)
    else:
        api = Guard(victim, output=args.output)
    result = attack.run(api, args.budget, victim=victim, test_data=test)
    if args.save:
        from .victim import Victim

        Victim(result.substitute, arch=victim.arch if attack.substitute_arch is None else attack.substitute_arch,
           dataset=victim.dataset, image_shape=victim.image_shape, classes=victim.classes,
           test_accuracy=result.test_accuracy, device=args.device).save(args.save)
    _out(result.summary())
    if args.detector:
        from .api import flag_scores  # NaN and infinite scores count as flagged

        scores = api.scores(result.client)
        flagged = "" if detector.threshold_ is None else \
            f", {float(flag_scores(scores, detector.threshold_).float().mean()):.2%} above the threshold"
        _out(f"detector scores of the {len(scores)} attack queries: mean {float(scores.mean()):.5g}{flagged}")
        if args.scores_out:
            with open(args.scores_out, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["query", "score"])
                writer.writerows((i, f"{float(v):.8g}") for i, v in enumerate(scores))
            _out(f"wrote {args.scores_out}")
    return 0


def cmd_bench_attacks(args: argparse.Namespace) -> int:
    import json

    from .bench.substitutes import format_table, run_substitute_benchmark
    victim, test, proxy, seeds = _attack_data(args)
    start = time.perf_counter()
    rows = run_substitute_benchmark(victim, test, [a for a in args.attacks.split(",") if a],
                                    args.budgets, seed=args.seed, proxy=proxy,
                                    seeds_data=seeds, output=args.output, device=args.device, progress=args.progress)
    _out(format_table(rows))
    _out(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def add_detector_commands(sub) -> None:
    """``fit``, ``calibrate`` and ``score``: for every saveable detector in the registry."""
    from .detectors.registry import detector_names

    kinds = ", ".join(detector_names(saveable=True))
    p = sub.add_parser("fit", help="fit a detector (SAME by default) for a saved victim, calibrate and save it",
                       description="Fit a detector on the victim's training data (minus a held-out part), calibrate "
                                   "the threshold on the held-out part at --target-fpr, and save the detector. "
                                   f"Detector kinds: {kinds}.")
    p.add_argument("--victim", required=True, help="folder of a saved victim")
    p.add_argument("--detector-kind", default="same", help=f"which detector: {kinds} (default: same)")
    p.add_argument("--dataset", default=None, help="training data (default: the victim's dataset)")
    p.add_argument("--preset", default=None,
                   help="training budget: tiny, cpu or paper (default: cpu for the detectors that have presets)")
    p.add_argument("--alpha", type=float, default=None, help="weight of SAME's reconstruction term (default 0.99)")
    p.add_argument("--mae-epochs", type=int, default=None, help="override the preset's MAE epochs")
    p.add_argument("--aux-epochs", type=int, default=None, help="override the preset's auxiliary epochs")
    p.add_argument("--max-train-samples", type=int, default=None, help="override the preset's training subset size")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="any constructor argument of the detector (VALUE as JSON, else a string); repeatable")
    p.add_argument("--outlier-data", default=None,
                   help="dataset whose train split is the outlier data (needed by outlier-exposure)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of the train split kept out of training for calibration (default 0.1)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="benign false-positive rate to calibrate for (default 0.01)")
    p.add_argument("--out", required=True, help="output folder for the detector")
    _common(p, data=True)

    p = sub.add_parser("calibrate", help="set a saved detector's threshold from benign images",
                       description="Score benign images the detector was not trained on and set the threshold "
                                   "that flags --target-fpr of them; the detector's manifest is rewritten.")
    p.add_argument("--detector", required=True, help="folder of a saved detector (any kind)")
    p.add_argument("--victim", required=True, help="folder of the victim it was fitted for")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="benign images: a .npy file or a folder of PNGs")
    src.add_argument("--dataset", help="benign images from a dataset's split (see --split)")
    p.add_argument("--split", default="test", help="split of --dataset (default: test)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images (random, seeded)")
    p.add_argument("--target-fpr", type=float, default=0.01, help="benign false-positive rate (default 0.01)")
    _common(p, data=True)

    p = sub.add_parser("score", help="score images with a saved detector and write a CSV",
                       description="Score query images with a saved detector; writes one CSV row per image with the "
                                   "score (for SAME also its two terms s1, the reconstruction MSE, and s2, KL/K) "
                                   "and whether it is flagged.")
    p.add_argument("--detector", required=True, help="folder of a saved detector (any kind)")
    p.add_argument("--victim", required=True, help="folder of the victim it was fitted for")
    p.add_argument("--images", required=True,
                   help="a .npy file ((N,C,H,W) floats in [-1,1] or uint8 pixels) or a folder of PNGs")
    p.add_argument("--out", default="-", help="CSV file to write (default: standard output)")
    _common(p)


#: ``same-study``'s default report.
STUDY_REPORT = "docs/same-at-scale.md"


def _add_study_parser(sub) -> None:
    """``same-study``: SAME's scaling study and the rule that picks its default."""
    p = sub.add_parser("same-study", help="SAME's scaling study and score variants; picks the default by a fixed rule",
                       description="Fit SAME with MAEs of several sizes and training budgets for a benchmark "
                                   "profile's victim, score each fit with every score variant, and write "
                                   "docs-style Markdown with AUROC on validation anomalies (the defender's own "
                                   "held-out images, noised, blurred, perturbed, shuffled, inverted), AUROC on the "
                                   "profile's attacks next to MSP, fit time and scoring cost, a plot, and the "
                                   "(fit, scoring) pair chosen by the rule written in the report.")
    p.add_argument("--config", default="quick", help="benchmark profile whose victim and attacks are used (default quick)")
    p.add_argument("--bench-dir", default=None, help="that profile's benchmark folder, whose cache is reused "
                                                     "(default: runs/bench/<profile>)")
    p.add_argument("--out", default=STUDY_REPORT, help=f"the Markdown report (default {STUDY_REPORT})")
    p.add_argument("--workdir", default=None, help="where study.json is written (default: <bench-dir>/same-study)")
    p.add_argument("--candidates", default=None, help="comma-separated subset of the fits, by position (e.g. 0,1)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from an existing study.json")
    p.add_argument("--notes", default=None, help="a Markdown file appended to the report (the reading of the run)")
    p.add_argument("--seeds", default=None, metavar="N,N",
                   help="run these seeds instead of the profile's, e.g. 0,1,2 (fits, victims and attack queries of a "
                        "seed already run are reused from the cache; the report gives mean ± std over the seeds)")
    _common(p, data=True, seed=False)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (and exit status 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help').\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``sameguard`` parser with every sub-command (sub-parsers share :class:`OneLineParser`)."""
    parser = OneLineParser(
        prog="sameguard",
        description="Detect model-extraction queries against an image classifier with SAME (AAAI 2024).",
    )
    parser.add_argument("--version", action="version", version=f"sameguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-victim", help="train a victim classifier and save it (safetensors + manifest)",
                       description="Train a victim classifier on a dataset's train split with the SAME authors' "
                                   "recipe (SGD 0.1, momentum 0.9, weight decay 5e-4, cosine, augmentation) and "
                                   "print its test accuracy.")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: fashion-mnist)")
    p.add_argument("--arch", default="conv3", help="conv3 (default), lenet5 or resnet18")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20, the authors' driver)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="SGD learning rate, cosine-annealed to 0 (default: 0.1, the authors' recipe)")
    p.add_argument("--max-train-samples", type=int, default=None,
                   help="train on a random subset of at most this many images (default: the whole split)")
    p.add_argument("--out", required=True, help="output folder for the victim")
    _common(p, data=True)

    add_detector_commands(sub)
    from .alarm_commands import add_alarm_commands

    COMMANDS.update(add_alarm_commands(sub))  # alarms calibrate
    from .artifact_commands import add_artifact_commands, add_trust_flag

    COMMANDS.update(add_artifact_commands(sub))  # artifacts sign|verify|digest
    add_trust_flag(parser)  # --require-authenticated-artifacts

    p = sub.add_parser("demo", help="train (or reuse) a victim and SAME on Fashion-MNIST and print detection metrics",
                       description="Train or reuse a cached Fashion-MNIST victim and SAME detector (small CPU "
                                   "configuration), then score Fashion-MNIST test images (benign) against "
                                   "scikit-learn's digits and uniform noise, printing AUROC, AUPR, FPR at 95% TPR "
                                   "and TPR at 1% FPR.")
    p.add_argument("--workdir", default="runs/demo", help="cache folder for trained artifacts (default: runs/demo)")
    p.add_argument("--preset", default="cpu", help="SAME training budget: tiny, cpu (default) or paper")
    p.add_argument("--victim-epochs", type=int, default=5, help="victim training epochs (default 5)")
    p.add_argument("--queries", type=int, default=2000, help="benign and noise queries scored (default 2000)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="train the victim and SAME on at most this many training images (default: all 60000)")
    p.add_argument("--fresh", action="store_true", help="retrain even if cached artifacts exist")
    _common(p, data=True)
    add_attack_commands(sub)

    from .bench.config import PROFILES

    p = sub.add_parser("bench", help="run the detection benchmark (attacks x detectors x seeds) and write a report",
                       description="Run a benchmark profile (quick, standard, paper) or a TOML config: trains or "
                                   "reuses victims, detectors and attack query sets, scores B attack queries against "
                                   "B normal-user queries per cell, and writes results.json, results.csv, report.md "
                                   "and ROC / histogram PNGs.")
    p.add_argument("--config", default="quick",
                   help=f"profile name ({', '.join(PROFILES)}) or a TOML file (default quick); the format, "
                        "every key with its type and default: src/sameguard/bench/profiles/FORMAT.md")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench/<config name>)")
    p.add_argument("--rescore", action="store_true",
                   help="score every seed again instead of reusing the results an earlier run of the same config "
                        "saved per seed (cached victims, detectors and attack queries are reused either way)")
    p.add_argument("--seeds", default=None, metavar="N,N",
                   help="run (or report) these seeds instead of the profile's, e.g. 0,1; the seeds are not part of "
                        "the key of a seed's saved results")
    p.add_argument("--detection-only", action="store_true",
                   help="stop each seed after its detection tables: skip the per-client alarm study and the "
                        "key sweep (the slow part); what it trains is cached for a later full run")
    _common(p, data=True, seed=False)

    _add_study_parser(sub)

    p = sub.add_parser("info", help="describe a saved victim, detector or per-client alarms (from the manifest)",
                       description="Print what a saved artifact folder holds, from its manifest and without loading "
                                   "weights: kind, architecture, dataset, test accuracy, training hyper-parameters, "
                                   "the detector's preset, threshold and calibration FPR, the victim's weights "
                                   "SHA-256, library versions, whether every file matches its SHA-256, whether the "
                                   "folder is authenticated (its HMAC verifies under $SAMEGUARD_ARTIFACT_KEY, or its "
                                   "digest is pinned) and its digest, the value to pin.")
    p.add_argument("folders", nargs="+", metavar="DIR", help="artifact folder(s)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per folder, in a list)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the library's log (-vv for debug)")

    from .service.commands import add_service_commands

    COMMANDS.update(add_service_commands(sub))  # serve, keys, audit
    from .bench.commands import add_bench_commands

    COMMANDS.update(add_bench_commands(sub))  # bench-service
    return parser


class _CliFormatter(logging.Formatter):
    """Step lines (``[  12.3 s] victim conv3: ...``) as they are; every other record with time, level and logger."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.name == STEP_LOGGER else super().format(record)


def _setup_logging(verbose: int) -> None:
    """Log to standard error: step lines and the CLI's own messages always, the library's log with ``-v``.

    The handler sits on the ``sameguard`` logger and is replaced on every call (``main`` may run
    several times in one process, e.g. in tests), so it always writes to the current ``sys.stderr``.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    package = logging.getLogger("sameguard")
    for old in [h for h in package.handlers if getattr(h, "sameguard_cli", False)]:
        package.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.sameguard_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_CliFormatter())
    package.addHandler(handler)
    package.setLevel(level)
    # Step lines and the CLI's messages at INFO even without -v; with -v they follow the package level.
    for name in ("sameguard.cli", STEP_LOGGER):
        logging.getLogger(name).setLevel(logging.INFO if verbose == 0 else logging.NOTSET)
    for name in TRAINING_LOGGERS:  # raised per command by log_training_progress; reset for the next main()
        logging.getLogger(name).setLevel(logging.NOTSET)


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def cmd_train_victim(args: argparse.Namespace) -> int:
    from .cli_training import log_training_progress, warn_if_overwriting_victim
    from .data import load_dataset
    from .victim import train_victim

    warn_if_overwriting_victim(args.out)
    log_training_progress(args.progress)
    train = load_dataset(args.dataset, "train", data_dir=args.data_dir, download=args.download)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir, download=args.download)
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        train = train.take(args.max_train_samples, seed=args.seed)
    start = time.perf_counter()
    victim = train_victim(train, test, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, device=args.device, progress=args.progress)
    victim.save(args.out)
    _out(f"victim {args.arch} on {args.dataset}: test accuracy {victim.test_accuracy:.4f} "
         f"({time.perf_counter() - start:.0f} s); saved to {args.out}")
    return 0


def _param_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _detector_from_args(args: argparse.Namespace):
    """The unfitted detector that ``fit`` asks for: ``--detector-kind``, its preset, then the overrides."""
    from .detectors.registry import build_detector, detector_class, detector_names, is_saveable

    cls = detector_class(args.detector_kind)
    if not is_saveable(cls):
        raise ValueError(f"The {args.detector_kind} detector cannot be saved, so 'fit' cannot make one; choose one of "
                         f"{', '.join(detector_names(saveable=True))}.")
    params = {k: v for k, v in dict(alpha=args.alpha, mae_epochs=args.mae_epochs, aux_epochs=args.aux_epochs,
                                    max_train_samples=args.max_train_samples).items() if v is not None}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--param takes NAME=VALUE, got {item!r}.")
        params[name.strip().replace("-", "_")] = _param_value(value)
    preset = args.preset if args.preset is not None or "cpu" not in cls.PRESETS else "cpu"
    return build_detector(args.detector_kind, params, preset=preset, seed=args.seed, device=args.device,
                          progress=args.progress)


def cmd_fit(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .detectors.registry import fit_detector
    from .victim import Victim

    from .cli_training import log_training_progress, training_subset_note, warn_if_gpu_preset_on_cpu

    if not 0.0 < args.holdout < 1.0:
        raise ValueError(f"--holdout must be a fraction in (0, 1), got {args.holdout}.")
    detector = _detector_from_args(args)
    warn_if_gpu_preset_on_cpu(args.preset, args.device)
    log_training_progress(args.progress)
    victim = Victim.load(args.victim, device=args.device)
    train = load_dataset(args.dataset or victim.dataset, "train", data_dir=args.data_dir, download=args.download)
    outlier = None
    if args.outlier_data is not None:
        outlier = load_dataset(args.outlier_data, "train", data_dir=args.data_dir, download=args.download)
    fit_part, calibration = train.split_off(args.holdout, seed=args.seed)
    start = time.perf_counter()
    fit_detector(detector, victim, fit_part, outlier)
    seconds = time.perf_counter() - start
    detector.calibrate(calibration.images, args.target_fpr)
    detector.save(args.out)
    _out(f"{type(detector).__name__} fitted on {len(fit_part)} images{training_subset_note(detector, len(fit_part))} "
         f"in {seconds:.0f} s; threshold "
         f"{detector.threshold_:.6g} at {args.target_fpr:.2%} FPR on {len(calibration)} held-out images; "
         f"saved to {args.out}")
    return 0


def _load_pair(args: argparse.Namespace):
    """The victim in ``--victim`` and the saved detector of any kind in ``--detector``."""
    from .detectors.registry import load_detector
    from .victim import Victim

    victim = Victim.load(args.victim, device=args.device)
    return victim, load_detector(args.detector, victim, device=args.device)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .imagefiles import read_images

    victim, detector = _load_pair(args)
    if args.images:
        x, _ = read_images(args.images, victim.image_shape)
    else:
        x = load_dataset(args.dataset, args.split, data_dir=args.data_dir, download=args.download).images
    if args.limit is not None and args.limit < len(x):
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.limit]]
    detector.calibrate(x, args.target_fpr)
    detector.save(args.detector)
    from .api import flag_scores  # NaN and infinite scores count as flagged

    _out(f"threshold {detector.threshold_:.6g} flags {float(flag_scores(detector.score(x), detector.threshold_).float().mean()):.2%} "
         f"of {len(x)} benign images (target {args.target_fpr:.2%}); saved to {args.detector}")
    return 0


def _score_columns(detector, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(N,)`` columns of the score CSV: ``score``, and SAME's two terms ``s1`` and ``s2`` for SAME detectors."""
    from .detectors import ReconstructionDetector

    if isinstance(detector, ReconstructionDetector):
        parts = detector.score_components(x)
        return {"score": parts.score, "s1": parts.s1, "s2": parts.s2}
    return {"score": detector.score(x)}


def cmd_score(args: argparse.Namespace) -> int:
    from .api import flag_scores  # NaN and infinite scores count as flagged (fail closed)
    from .imagefiles import read_images

    victim, detector = _load_pair(args)
    x, names = read_images(args.images, victim.image_shape)
    columns = _score_columns(detector, x)
    flagged = flag_scores(columns["score"], detector.threshold_) if detector.threshold_ is not None else None
    fh = sys.stdout if args.out == "-" else open(args.out, "w", newline="")
    try:
        writer = csv.writer(fh)
        writer.writerow(["image", *columns, "flagged"])
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{v[i]:.8g}" for v in columns.values()),
                             "" if flagged is None else int(flagged[i])])
    finally:
        if fh is not sys.stdout:
            fh.close()
    if args.out != "-":
        n_flag = "no threshold" if flagged is None else f"{int(flagged.sum())} flagged"
        _out(f"scored {len(x)} images ({n_flag}); wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .cli_training import log_training_progress, warn_if_gpu_preset_on_cpu
    from .demo import run_demo

    warn_if_gpu_preset_on_cpu(args.preset, args.device)
    log_training_progress(args.progress)

    run_demo(workdir=Path(args.workdir), preset=args.preset, victim_epochs=args.victim_epochs, queries=args.queries,
             train_samples=args.train_samples, seed=args.seed, data_dir=args.data_dir, download=args.download,
             device=args.device, progress=args.progress, fresh=args.fresh, echo=_out)
    return 0


def _with_seeds(config: Any, seeds: str | None) -> Any:
    """``config`` with the seeds of a ``--seeds N,N`` option (unchanged when ``None``)."""
    if seeds is None:
        return config
    try:
        return dataclasses.replace(config, seeds=tuple(comma_ints(seeds, minimum=0)))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--seeds: {exc}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.config import load_config
    from .bench.runner import run_benchmark

    from .bench.preflight import check_data

    config = _with_seeds(load_config(args.config), args.seeds)
    if args.download:  # the loaders' documented switch, for every dataset the config names
        os.environ["SAMEGUARD_DOWNLOAD"] = "1"
    out = Path(args.out or f"runs/bench/{config.name}")
    check_output_dir(out, "--out")
    check_data(config, data_dir=args.data_dir, download=args.download)  # every split, before any training
    run_benchmark(config, out, data_dir=args.data_dir, device=args.device, progress=args.progress,  # steps: stderr
                  reuse_results=not args.rescore, detection_only=args.detection_only)
    _out("")
    _out((out / "report.md").read_text())
    _out(f"wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'report.md'} and {out / 'plots'}/")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .artifact_info import describe_folder, format_info

    infos = [describe_folder(folder) for folder in args.folders]
    if args.json:
        _out(json.dumps(infos, indent=2))
    else:
        _out("\n\n".join(format_info(info) for info in infos))
    return 0


def cmd_same_study(args: argparse.Namespace) -> int:
    from .bench.config import load_config
    from .bench.same_study import CANDIDATES, run_study
    from .bench.same_study_report import write_study_report

    config = _with_seeds(load_config(args.config), args.seeds)
    bench_dir = Path(args.bench_dir or f"runs/bench/{config.name}")
    workdir = Path(args.workdir or bench_dir / "same-study")
    out = Path(args.out)  # checked before any work by _preflight (OUTPUTS["same-study"])
    if not args.report_only:
        chosen = CANDIDATES
        if args.candidates:
            try:
                chosen = tuple(CANDIDATES[int(i)] for i in args.candidates.split(","))
            except (ValueError, IndexError):
                raise ValueError(f"--candidates must be positions in 0..{len(CANDIDATES) - 1}, got "
                                 f"{args.candidates!r}.") from None
        run_study(config, bench_dir, workdir, candidates=chosen, data_dir=args.data_dir, device=args.device,
                  progress=args.progress)
    elif not (workdir / "study.json").is_file():
        raise ValueError(f"--report-only needs {workdir / 'study.json'} from an earlier run.")
    command = " ".join(["sameguard same-study", f"--config {args.config}"]
                       + ([f"--candidates {args.candidates}"] if args.candidates else [])
                       + ([f"--seeds {args.seeds}"] if args.seeds else [])
                       + ([f"--out {args.out}"] if args.out != STUDY_REPORT else []))
    if args.notes is not None and not Path(args.notes).is_file():
        raise ValueError(f"--notes {args.notes} is not a file.")
    write_study_report(workdir / "study.json", out, command=command, notes=args.notes)
    _out(out.read_text())
    return 0


COMMANDS = {"train-victim": cmd_train_victim, "fit": cmd_fit, "calibrate": cmd_calibrate, "score": cmd_score,
            "demo": cmd_demo, "bench": cmd_bench, "same-study": cmd_same_study, "attack": cmd_attack, "bench-attacks": cmd_bench_attacks,
            "info": cmd_info}


def _db_url(args: argparse.Namespace) -> str:
    return getattr(args, "db", None) or os.environ.get("SAMEGUARD_DB_URL") or "sqlite:///sameguard.db"


def _preflight(args: argparse.Namespace) -> None:
    """Checks that need no work: the device, ``--data-dir``, every output path, a SQLite database's folder.

    Raises:
        ValueError: one sentence saying what was expected; nothing has run yet.
    """
    check_device(getattr(args, "device", None))
    check_data_dir(getattr(args, "data_dir", None))
    for attr, kind, flag in OUTPUTS.get(args.command, ()):
        value = getattr(args, attr, None)
        (check_output_dir if kind == "dir" else check_output_file)(value, flag)
    if args.command in ("serve", "keys", "audit"):
        reads_only = args.command == "audit" or getattr(args, "keys_command", None) in ("list", "revoke")
        check_sqlite_url(_db_url(args), must_exist=reads_only)


def main(argv: list[str] | None = None) -> int:
    """Run one ``sameguard`` command; returns its exit status (2 for an error the user can fix).

    Errors are reported in one sentence on standard error (see :mod:`sameguard.cli_errors`);
    ``-v`` adds the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)

    def run() -> int:
        from .artifact_commands import trust_from_args

        _preflight(args)
        with trust_from_args(args):  # artifacts loaded by the command: signed or pinned when required
            return COMMANDS[args.command](args)

    return run_reporting_errors(args.command, run, args=args, verbose=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
