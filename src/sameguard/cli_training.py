"""What the training commands (``train-victim``, ``fit``, ``demo``) tell the user beyond their result.

* :func:`log_training_progress`: when no progress bar is drawn (standard error is not a terminal,
  or ``--no-progress``), the per-epoch lines of the training loops are shown on standard error, so a
  long run piped into a log is never silent.
* :func:`warn_if_gpu_preset_on_cpu`: ``--preset paper`` is sized for a GPU; on a CPU it warns.
* :func:`warn_if_overwriting_victim`: ``train-victim --out DIR`` where ``DIR`` already holds a
  victim that saved detectors were fitted for (they would refuse the new weights).
* :func:`training_subset_note`: a detector that trains on a random subset says so, with its size.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST
from .training import show_progress

logger = logging.getLogger("sameguard.cli")

__all__ = [
    "TRAINING_LOGGERS",
    "detectors_fitted_for",
    "log_training_progress",
    "training_subset_note",
    "warn_if_gpu_preset_on_cpu",
    "warn_if_overwriting_victim",
]

#: Loggers whose INFO lines report training progress per epoch.
TRAINING_LOGGERS = ("sameguard.training", "sameguard.detectors")

#: Presets sized for a GPU.
GPU_PRESETS = ("paper",)


def log_training_progress(progress: bool | None) -> bool:
    """Show the training loops' per-epoch log lines when no progress bar will be drawn; returns whether it did.

    Called after :func:`sameguard.cli._setup_logging`, whose handler on the ``sameguard`` logger
    writes whatever reaches it; without ``-v`` the package logs warnings only, so the training
    loggers are raised to INFO here (with ``-v`` they already are).
    """
    if show_progress(progress):
        return False
    for name in TRAINING_LOGGERS:
        log = logging.getLogger(name)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
    return True


def warn_if_gpu_preset_on_cpu(preset: str | None, device: str | None) -> bool:
    """Warn when a GPU-sized preset is about to train on the CPU; returns whether it warned."""
    if preset not in GPU_PRESETS:
        return False
    from .training import resolve_device

    if resolve_device(device).type != "cpu":
        return False
    logger.warning("--preset %s is sized for a GPU (the SAME authors' MAE, 500 epochs): on a CPU it takes days. "
                   "Use --preset cpu (minutes) or tiny, or run with --device cuda on a GPU.", preset)
    return True


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def detectors_fitted_for(weights_sha256: str, near: str | os.PathLike) -> list[Path]:
    """Saved detectors in the folders next to ``near`` (its siblings) fitted for the victim ``weights_sha256``."""
    parent = Path(near).resolve().parent
    found = []
    for folder in sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []:
        manifest = _manifest(folder)
        config = manifest.get("config") if manifest else None
        if isinstance(config, dict) and config.get("victim_weights_sha256") == weights_sha256:
            found.append(folder)
    return found


def warn_if_overwriting_victim(out: str | os.PathLike) -> bool:
    """Warn when ``out`` already holds a saved victim (and name the detectors fitted for it); returns whether it warned."""
    manifest = _manifest(Path(out))
    if manifest is None or manifest.get("kind") != "victim":
        return False
    sha = (manifest.get("config") or {}).get("weights_sha256")
    fitted = detectors_fitted_for(sha, out) if sha else []
    detail = (f"the detectors fitted for it ({', '.join(str(p) for p in fitted)}) will refuse the new victim: "
              "refit them" if fitted else "any detector fitted for it will refuse the new victim")
    logger.warning("--out %s already holds a victim (weights SHA-256 %s...); it will be overwritten, and %s.",
                   out, (sha or "?")[:12], detail)
    return True


def training_subset_note(detector: Any, n_images: int) -> str:
    """``""``, or ``" (its networks trained on a random M of them)"`` when the detector subsamples its training data."""
    limit = getattr(detector, "max_train_samples", None)
    if limit is None or limit >= n_images:
        return ""
    return f" (its networks trained on a random {limit} of them: max_train_samples)"
