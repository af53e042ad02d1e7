"""The demo: a Fashion-MNIST victim, SAME with a small CPU configuration, and three query sets.

Benign queries are Fashion-MNIST test images (the paper's normal users); the anomalous ones are
scikit-learn's handwritten digits (real images from another distribution, as a Knockoff-style
proxy would send) and uniform noise. Victim and detector are cached under ``workdir`` by a key
of everything that determines them, so a second run only scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .api import ArtifactError
from .bench.metrics import detection_metrics
from .data import ImageDataset, load_dataset, uniform_noise
from .detectors import SAME_PRESETS, SAMEDetector
from .models import MAE_PRESETS
from .victim import Victim, train_victim

logger = logging.getLogger(__name__)

__all__ = ["cache_key", "cached_victim", "cached_detector", "preset_architecture", "run_demo"]

DEMO_DATASET = "fashion-mnist"
HOLDOUT_FRACTION = 0.1


def cache_key(**params: Any) -> str:
    """A short stable hash of everything that determines an artifact."""
    blob = json.dumps(params | {"sameguard": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def preset_architecture(params: dict[str, Any]) -> Any:
    """The architecture a preset name in ``params["mae"]`` stands for (so a changed preset is a new key)."""
    mae = params.get("mae")
    return MAE_PRESETS.get(mae) if isinstance(mae, str) else mae


def cached_victim(workdir: Path, train: ImageDataset, test: ImageDataset, *, arch: str, epochs: int, seed: int,
                  device: str, progress: bool | None, fresh: bool = False, lr: float = 0.1) -> Victim:
    """Load the victim cached for these settings, or train and cache it."""
    key = cache_key(kind="victim", dataset=train.name, n=len(train), arch=arch, epochs=epochs, seed=seed,
                    **({} if lr == 0.1 else {"lr": lr}))
    path = workdir / f"victim-{train.name}-{arch}-{key}"
    if path.is_dir() and not fresh:
        try:
            victim = Victim.load(path, device=device)
            logger.info("Reusing the cached victim in %s", path)
            return victim
        except ArtifactError as exc:
            logger.warning("Ignoring the cached victim in %s: %s", path, exc)
    victim = train_victim(train, test, arch=arch, epochs=epochs, lr=lr, seed=seed, device=device, progress=progress)
    victim.save(path)
    return victim


def cached_detector(workdir: Path, victim: Victim, fit_data: ImageDataset, calibration: ImageDataset, *,
                    preset: str, seed: int, device: str, progress: bool | None, target_fpr: float = 0.01,
                    fresh: bool = False, **overrides: Any) -> SAMEDetector:
    """Load the SAME detector cached for this victim and these settings, or fit, calibrate and cache it."""
    detector = SAMEDetector.from_preset(preset, seed=seed, device=device, progress=progress, **overrides)
    params = detector.get_params()
    key = cache_key(kind="same", victim=victim.weights_sha256, n=len(fit_data), params=params,
                    mae_arch=preset_architecture(params), target_fpr=target_fpr)
    path = workdir / f"same-{preset}-{key}"
    if path.is_dir() and not fresh:
        try:
            cached = SAMEDetector.load(path, victim, device=device)
            logger.info("Reusing the cached SAME detector in %s", path)
            return cached
        except ArtifactError as exc:
            logger.warning("Ignoring the cached detector in %s: %s", path, exc)
    detector.fit(victim, fit_data).calibrate(calibration.images, target_fpr)
    detector.save(path)
    return detector


def run_demo(*, workdir: Path, preset: str = "cpu", victim_epochs: int = 5, queries: int = 2000,
             train_samples: int | None = None, seed: int = 0,
             data_dir: str | None = None, download: bool = False, device: str = "cpu",
             progress: bool | None = None, fresh: bool = False,
             echo: Callable[[str], None] = logger.info) -> list[dict[str, Any]]:
    """Run the demo and return one row of metrics per anomalous query set (also printed with ``echo``)."""
    if preset not in SAME_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(SAME_PRESETS)}.")
    if queries < 10:
        raise ValueError(f"queries must be at least 10, got {queries}.")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = load_dataset(DEMO_DATASET, "train", data_dir=data_dir, download=download)
    test = load_dataset(DEMO_DATASET, "test", data_dir=data_dir, download=download)
    if train_samples is not None and train_samples < len(train):
        train = train.take(train_samples, seed=seed)
    victim = cached_victim(workdir, train, test, arch="conv3", epochs=victim_epochs, seed=seed, device=device,
                           progress=progress, fresh=fresh)
    echo(f"victim: conv3 on Fashion-MNIST, test accuracy {victim.test_accuracy:.4f}")
    fit_data, calibration = train.split_off(HOLDOUT_FRACTION, seed=seed)
    detector = cached_detector(workdir, victim, fit_data, calibration, preset=preset, seed=seed, device=device,
                               progress=progress, fresh=fresh)
    fit_time = f"{detector.fit_seconds_:.0f} s" if detector.fit_seconds_ is not None else "?"
    echo(f"SAME ({preset} preset, alpha {detector.alpha}): fitted in {fit_time}, threshold {detector.threshold_:.5g} "
         f"at {detector.calibration_fpr_:.0%} FPR on {len(calibration)} held-out training images")

    digits = load_dataset("digits", "train")
    digits_all = torch.cat([digits.images, load_dataset("digits", "test").images])
    sets = {
        "fashion-mnist test (benign)": test.take(min(queries, len(test)), seed=seed).images,
        "sklearn digits": digits_all[:queries],
        "uniform noise": uniform_noise(queries, shape=victim.image_shape, seed=seed),
    }
    scores = {}
    start = time.perf_counter()
    for name, x in sets.items():
        scores[name] = detector.score_components(x)
    per_query_ms = 1000 * (time.perf_counter() - start) / sum(len(x) for x in sets.values())
    benign_name = next(iter(sets))
    benign = scores[benign_name]
    threshold = detector.threshold_
    header = (f"{'queries':<28} {'n':>5} {'AUROC':>7} {'AUPR':>7} {'FPR95':>7} {'TPR@1%':>7} {'flagged':>8}"
              f" {'AUROC s1':>9} {'AUROC s2':>9}")
    echo("")
    echo(header)
    echo("-" * len(header))
    flagged_benign = float((benign.score > threshold).float().mean())
    echo(f"{benign_name:<28} {len(benign.score):>5} {'':>7} {'':>7} {'':>7} {'':>7} {flagged_benign:>8.2%}")
    rows = []
    for name, s in scores.items():
        if name == benign_name:
            continue
        m = detection_metrics(benign.score.numpy(), s.score.numpy())
        flagged = float((s.score > threshold).float().mean())
        auroc_s1 = detection_metrics(benign.s1.numpy(), s.s1.numpy()).auroc
        auroc_s2 = detection_metrics(benign.s2.numpy(), s.s2.numpy()).auroc
        rows.append({"queries": name, **m.to_dict(), "flagged": flagged, "auroc_s1": auroc_s1, "auroc_s2": auroc_s2})
        echo(f"{name:<28} {len(s.score):>5} {m.auroc:>7.4f} {m.aupr:>7.4f} {m.fpr95:>7.4f} {m.tpr_at_1fpr:>7.4f} "
             f"{flagged:>8.2%} {auroc_s1:>9.4f} {auroc_s2:>9.4f}")
    echo("")
    echo(f"scoring: {per_query_ms:.2f} ms per query on {device}; total demo time {time.perf_counter() - t0:.0f} s")
    echo("AUROC/AUPR/FPR95/TPR@1%: benign Fashion-MNIST test queries vs each anomalous set (anomalous = positive); "
         "flagged: share above the calibrated threshold; AUROC s1/s2: each term of the score alone.")
    return rows
