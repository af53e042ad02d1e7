"""The demo: a Fashion-MNIST victim, SAME with a small CPU configuration, and three query sets.

Benign queries are Fashion-MNIST test images (the paper's normal users); the anomalous ones are
scikit-learn's handwritten digits (real images from another distribution, as a Knockoff-style
proxy would send) and uniform noise. Victim and detector are cached under ``workdir`` by a key
of everything that determines them (:mod:`sameguard.cache`), so a second run only scores. Each
step is logged with its elapsed time (:class:`~sameguard.steps.StepLog`); the table goes to ``echo``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .api import flag_scores
from .bench.metrics import detection_metrics
from .cache import cached_detector, cached_victim
from .data import ImageDataset, load_dataset, uniform_noise
from .detectors import SAME_PRESETS
from .steps import StepLog
from .validation import check_choice, check_int

logger = logging.getLogger(__name__)

__all__ = ["run_demo"]

DEMO_DATASET = "fashion-mnist"
HOLDOUT_FRACTION = 0.1
#: Name of the benign query set (Fashion-MNIST test images, the paper's normal users).
BENIGN = "fashion-mnist test (benign)"


def _query_sets(test: ImageDataset, queries: int, image_shape: tuple[int, int, int],
                seed: int) -> dict[str, torch.Tensor]:
    """The benign set first, then the anomalous ones: ``name -> (N, C, H, W)`` images in ``[-1, 1]``."""
    digits = load_dataset("digits", "train")
    digits_all = torch.cat([digits.images, load_dataset("digits", "test").images])
    return {
        BENIGN: test.take(min(queries, len(test)), seed=seed).images,
        "sklearn digits": digits_all[:queries],
        "uniform noise": uniform_noise(queries, shape=image_shape, seed=seed),
    }


def _metrics_table(scores: dict[str, Any], threshold: float, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Echo the table of each anomalous set against the benign one; return its rows."""
    benign = scores[BENIGN]
    header = (f"{'queries':<28} {'n':>5} {'AUROC':>7} {'AUPR':>7} {'FPR95':>7} {'TPR@1%':>7} {'flagged':>8}"
              f" {'AUROC s1':>9} {'AUROC s2':>9}")
    echo("")
    echo(header)
    echo("-" * len(header))
    flagged_benign = float(flag_scores(benign.score, threshold).float().mean())
    echo(f"{BENIGN:<28} {len(benign.score):>5} {'':>7} {'':>7} {'':>7} {'':>7} {flagged_benign:>8.2%}")
    rows = []
    for name, s in scores.items():
        if name == BENIGN:
            continue
        m = detection_metrics(benign.score.numpy(), s.score.numpy())
        flagged = float(flag_scores(s.score, threshold).float().mean())
        auroc_s1 = detection_metrics(benign.s1.numpy(), s.s1.numpy()).auroc
        auroc_s2 = detection_metrics(benign.s2.numpy(), s.s2.numpy()).auroc
        rows.append({"queries": name, **m.to_dict(), "flagged": flagged, "auroc_s1": auroc_s1, "auroc_s2": auroc_s2})
        echo(f"{name:<28} {len(s.score):>5} {m.auroc:>7.4f} {m.aupr:>7.4f} {m.fpr95:>7.4f} {m.tpr_at_1fpr:>7.4f} "
             f"{flagged:>8.2%} {auroc_s1:>9.4f} {auroc_s2:>9.4f}")
    return rows


def run_demo(*, workdir: Path, preset: str = "cpu", victim_epochs: int = 5, queries: int = 2000,
             train_samples: int | None = None, seed: int = 0,
             data_dir: str | None = None, download: bool = False, device: str = "cpu",
             progress: bool | None = None, fresh: bool = False,
             echo: Callable[[str], None] = logger.info) -> list[dict[str, Any]]:
    """Run the demo and return one row of metrics per anomalous query set (also printed with ``echo``).

    Each step (data, victim, detector, scoring) is logged with its elapsed time to the
    ``sameguard.steps`` logger; the results table goes to ``echo``.
    """
    check_choice(preset, "preset", sorted(SAME_PRESETS))
    check_int(queries, "queries", minimum=10)
    steps = StepLog()
    workdir.mkdir(parents=True, exist_ok=True)
    train = load_dataset(DEMO_DATASET, "train", data_dir=data_dir, download=download)
    test = load_dataset(DEMO_DATASET, "test", data_dir=data_dir, download=download)
    if train_samples is not None and train_samples < len(train):
        train = train.take(train_samples, seed=seed)
    steps(f"data {DEMO_DATASET}: {len(train)} training and {len(test)} test images")
    victim = cached_victim(workdir, train, test, arch="conv3", epochs=victim_epochs, seed=seed, device=device,
                           progress=progress, fresh=fresh, steps=steps)
    echo(f"victim: conv3 on Fashion-MNIST, test accuracy {victim.test_accuracy:.4f}")
    fit_data, calibration = train.split_off(HOLDOUT_FRACTION, seed=seed)
    detector = cached_detector(workdir, victim, fit_data, calibration, preset=preset, seed=seed, device=device,
                               progress=progress, fresh=fresh, steps=steps)
    fit_time = f"{detector.fit_seconds_:.0f} s" if detector.fit_seconds_ is not None else "?"
    score = "standardised terms, " if detector.standardize else ""
    echo(f"SAME ({preset} preset, {score}alpha {detector.alpha}): fitted in {fit_time}, threshold "
         f"{detector.threshold_:.5g} "
         f"at {detector.calibration_fpr_:.0%} FPR on {len(calibration)} held-out training images")

    sets = _query_sets(test, queries, victim.image_shape, seed)
    start = time.perf_counter()
    scores = {name: detector.score_components(x) for name, x in sets.items()}
    n_scored = sum(len(x) for x in sets.values())
    per_query_ms = 1000 * (time.perf_counter() - start) / n_scored
    steps(f"scoring: {n_scored} queries in {len(sets)} sets, {per_query_ms:.2f} ms per query")
    rows = _metrics_table(scores, detector.threshold_, echo)
    echo("")
    echo(f"scoring: {per_query_ms:.2f} ms per query on {device}; total demo time {steps.elapsed:.0f} s")
    echo("AUROC/AUPR/FPR95/TPR@1%: benign Fashion-MNIST test queries vs each anomalous set (anomalous = positive); "
         "flagged: share above the calibrated threshold; AUROC s1/s2: each term of the score alone.")
    steps("demo: done")
    return rows
