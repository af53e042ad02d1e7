"""The artifact cache shared by the demo and the benchmarks: victims and detectors keyed by their settings.

A cached artifact lives in a folder of ``workdir`` whose name ends with :func:`cache_key`, a short
hash of everything that determines it (dataset, size, architecture, epochs, seed, the detector's
hyper-parameters, the victim's weights, sameguard's version). A second run with the same settings
loads it instead of training again; an unreadable or tampered artifact is ignored (with a warning)
and trained again. Loading goes through :mod:`sameguard.artifacts` (safetensors, verified hashes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .api import ArtifactError
from .data import ImageDataset
from .detectors import SAMEDetector
from .models import MAE_PRESETS
from .steps import StepLog
from .victim import Victim, train_victim

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["cache_key", "cached_detector", "cached_victim", "preset_architecture"]


def cache_key(**params: Any) -> str:
    """A short stable hash (12 hex digits) of everything that determines an artifact, and the package version."""
    blob = json.dumps(params | {"sameguard": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def preset_architecture(params: dict[str, Any]) -> Any:
    """The architecture a preset name in ``params["mae"]`` stands for (so a changed preset is a new key)."""
    mae = params.get("mae")
    return MAE_PRESETS.get(mae) if isinstance(mae, str) else mae


def _load_cached(path: Path, what: str, load: Callable[[Path], T]) -> T | None:
    """``load(path)`` when ``path`` holds a readable cached artifact, else ``None`` (a bad one is logged and ignored)."""
    if not path.is_dir():
        return None
    try:
        artifact = load(path)
    except ArtifactError as exc:
        logger.warning("Ignoring the cached %s in %s: %s", what, path, exc)
        return None
    logger.info("Reusing the cached %s in %s", what, path)
    return artifact


def cached_victim(workdir: Path, train: ImageDataset, test: ImageDataset, *, arch: str, epochs: int, seed: int,
                  device: str, progress: bool | None, fresh: bool = False, lr: float = 0.1,
                  steps: StepLog | None = None) -> Victim:
    """Load the victim cached for these settings, or train and cache it.

    Args:
        workdir: cache folder.
        train, test: training data and the test split its accuracy is measured on.
        arch, epochs, seed, lr: training settings (see :func:`sameguard.victim.train_victim`).
        device, progress: where to train; progress bars (``None``: on a terminal only).
        fresh: train again even when a cached victim exists.
        steps: if given, one step line says whether the victim was trained or reused.
    """
    key = cache_key(kind="victim", dataset=train.name, n=len(train), arch=arch, epochs=epochs, seed=seed,
                    **({} if lr == 0.1 else {"lr": lr}))
    path = workdir / f"victim-{train.name}-{arch}-{key}"
    victim = None if fresh else _load_cached(path, "victim", lambda p: Victim.load(p, device=device))
    if victim is not None:
        if steps is not None:
            steps(f"victim {arch}: reused from the cache, test accuracy {victim.test_accuracy:.4f}")
        return victim
    start = time.perf_counter()
    victim = train_victim(train, test, arch=arch, epochs=epochs, lr=lr, seed=seed, device=device, progress=progress)
    victim.save(path)
    if steps is not None:
        steps(f"victim {arch}: trained on {len(train)} {train.name} images ({epochs} epoch{'s' if epochs != 1 else ''}) in "
              f"{time.perf_counter() - start:.1f} s, test accuracy {victim.test_accuracy:.4f}")
    return victim


def cached_detector(workdir: Path, victim: Victim, fit_data: ImageDataset, calibration: ImageDataset, *,
                    preset: str, seed: int, device: str, progress: bool | None, target_fpr: float = 0.01,
                    fresh: bool = False, steps: StepLog | None = None, **overrides: Any) -> SAMEDetector:
    """Load the SAME detector cached for this victim and these settings, or fit, calibrate and cache it.

    Args:
        workdir: cache folder.
        victim: the protected classifier (its weights are part of the key).
        fit_data: training data of the detector; calibration: held-out benign images for the threshold.
        preset, overrides: :meth:`SAMEDetector.from_preset` settings.
        seed, device, progress: as everywhere.
        target_fpr: benign false-positive rate the threshold is calibrated for.
        fresh: fit again even when a cached detector exists.
        steps: if given, one step line says whether the detector was fitted or reused.
    """
    detector = SAMEDetector.from_preset(preset, seed=seed, device=device, progress=progress, **overrides)
    params = detector.get_params()
    key = cache_key(kind="same", victim=victim.weights_sha256, n=len(fit_data), params=params,
                    mae_arch=preset_architecture(params), target_fpr=target_fpr)
    path = workdir / f"same-{preset}-{key}"
    cached = None if fresh else _load_cached(path, "SAME detector", lambda p: SAMEDetector.load(p, victim, device=device))
    if cached is not None:
        if steps is not None:
            steps(f"detector SAME ({preset} preset): reused from the cache")
        return cached
    detector.fit(victim, fit_data).calibrate(calibration.images, target_fpr)
    detector.save(path)
    if steps is not None:
        steps(f"detector SAME ({preset} preset): fitted on {len(fit_data)} images in {detector.fit_seconds_:.1f} s")
    return detector
