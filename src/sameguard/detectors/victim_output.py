"""Save and load for detectors defined by the victim alone (MSP, Energy): parameters and threshold.

Such a detector has no fitted network: ``fit(victim)`` only attaches the victim. Saving it writes
its calibrated threshold into ``calibration.safetensors`` (hashed in the manifest, and read back
from there) and its hyper-parameters and the victim's weights SHA-256 into the manifest, so that
it can be served, combined in per-client alarms and reloaded like any other detector, and is
refused for another victim.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..api import ArtifactError
from ..artifacts import load_artifact, save_artifact
from ._common import check_victim_sha

__all__ = ["VictimOutputArtifact"]


class VictimOutputArtifact:
    """Mixin: :class:`~sameguard.api.SaveableDetector` for a detector whose state is the victim only.

    The class must define ``KIND``, ``get_params()``, ``fit(victim)`` (which sets ``victim_sha256_``)
    and ``_check_fitted()``.
    """

    KIND: ClassVar[str]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``calibration.safetensors`` (the threshold, NaN when uncalibrated) and ``manifest.json``."""
        self._check_fitted()  # type: ignore[attr-defined]
        config = {"params": self.get_params(), "threshold": self.threshold_,  # type: ignore[attr-defined]
                  "calibration_fpr": self.calibration_fpr_,  # type: ignore[attr-defined]
                  "victim_weights_sha256": self.victim_sha256_,  # type: ignore[attr-defined]
                  "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]"}
        threshold = float("nan") if self.threshold_ is None else float(self.threshold_)  # type: ignore[attr-defined]
        return save_artifact(directory, self.KIND, {"calibration": {"threshold": torch.tensor([threshold],
                                                                                       dtype=torch.float64)}}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: Any, *, check_victim: bool = True,
             device: Any = None) -> Any:
        """Read a detector written by :meth:`save` and attach it to ``victim`` (``device`` is ignored)."""
        parts, manifest = load_artifact(directory, cls.KIND)
        cfg = manifest["config"]
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        try:
            threshold = float(parts["calibration"]["threshold"][0])
        except (KeyError, IndexError) as exc:
            raise ArtifactError(f"{directory} lacks the calibration its manifest promises: {exc}") from None
        detector = cls(**cfg["params"]).fit(victim)  # type: ignore[call-arg]
        detector.threshold_ = None if math.isnan(threshold) else threshold
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        return detector
