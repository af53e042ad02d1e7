"""The one registry of detectors, used by the command line, the benchmark and the service.

* :data:`DETECTORS`: name (as in configs and ``sameguard fit --detector-kind``) -> class.
* :data:`DETECTOR_KINDS`: manifest ``kind`` of a saved detector -> class, for every detector that
  satisfies :class:`~sameguard.api.SaveableDetector`.
* :func:`build_detector`, :func:`fit_detector`, :func:`load_detector`: construct one by name
  (optionally from a preset), fit it with the data its ``NEEDS`` name, and load a saved one of
  any kind (the manifest says which; hashes verified, no pickles).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ..api import ArtifactError, Detector
from ..artifacts import MANIFEST
from .energy import EnergyDetector
from .mahalanobis import MahalanobisDetector
from .msp import MSPDetector
from .outlier_exposure import OutlierExposureDetector
from .prada import PRADADetector
from .same import SAMEDetector
from .same_conv_ae import ConvAESAMEDetector
from .vardetect import VarDetectDetector

logger = logging.getLogger(__name__)

__all__ = ["DETECTORS", "DETECTOR_KINDS", "detector_class", "detector_names", "is_saveable", "build_detector",
           "fit_detector", "saved_kind", "load_detector"]

#: Detector classes by name, for configs, the benchmark and the CLI.
DETECTORS: Mapping[str, type[Detector]] = MappingProxyType({
    "same": SAMEDetector, "same-conv-ae": ConvAESAMEDetector, "msp": MSPDetector, "energy": EnergyDetector,
    "mahalanobis": MahalanobisDetector, "outlier-exposure": OutlierExposureDetector, "prada": PRADADetector,
    "vardetect": VarDetectDetector,
})


def is_saveable(cls: type) -> bool:
    """Whether instances of ``cls`` satisfy :class:`~sameguard.api.SaveableDetector` (``KIND``, ``save``, ``load``)."""
    return isinstance(getattr(cls, "KIND", None), str) and callable(getattr(cls, "save", None)) \
        and callable(getattr(cls, "load", None))


#: Saved-detector classes by their manifest ``kind`` (``"same-detector"``, ...).
DETECTOR_KINDS: Mapping[str, type[Detector]] = MappingProxyType(
    {cls.KIND: cls for cls in DETECTORS.values() if is_saveable(cls)})  # type: ignore[attr-defined]


def detector_names(*, saveable: bool = False) -> list[str]:
    """Sorted registry names; with ``saveable=True`` only those that can be saved and loaded."""
    return sorted(name for name, cls in DETECTORS.items() if not saveable or is_saveable(cls))


def detector_class(name: str) -> type[Detector]:
    """The class registered as ``name`` (``ValueError`` naming the choices otherwise)."""
    if name not in DETECTORS:
        raise ValueError(f"Unknown detector {name!r}; choose one of {', '.join(detector_names())}.")
    return DETECTORS[name]


def build_detector(name: str, params: Mapping[str, Any] | None = None, *, preset: str | None = None,
                   seed: int | None = None, device: str | torch.device | None = None,
                   progress: bool | None = None) -> Detector:
    """A detector by registry name, from ``preset`` (see ``PRESETS``) and ``params`` on top.

    ``seed``, ``device`` and ``progress`` are passed when the class takes them and ``params`` does not
    set them (the stateless baselines take none of them).
    """
    cls = detector_class(name)
    kwargs = dict(params or {})
    accepted = inspect.signature(cls).parameters
    for key, value in (("seed", seed), ("device", device), ("progress", progress)):
        if value is not None and key in accepted and key not in kwargs:
            kwargs[key] = value
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"The {name} detector has no parameter {', '.join(unknown)}; it takes "
                         f"{', '.join(accepted)}.")
    return cls.from_preset(preset, **kwargs) if preset is not None else cls(**kwargs)


def fit_detector(detector: Detector, victim: Any, train_data: Any = None, outlier_data: Any = None) -> Detector:
    """``detector.fit`` with what its ``NEEDS`` declare: ``train_data`` for ``"defender-data"``,
    ``outlier_data`` for ``"outlier-data"`` (an :class:`~sameguard.data.ImageDataset` each)."""
    kwargs: dict[str, Any] = {}
    label = type(detector).__name__
    if "defender-data" in detector.NEEDS:
        if train_data is None:
            raise ValueError(f"{label} needs the defender's training data to fit.")
        kwargs["train_data"] = train_data
    if "outlier-data" in detector.NEEDS:
        if outlier_data is None:
            raise ValueError(f"{label} needs outlier data to fit: name an outlier dataset.")
        kwargs["outlier_data"] = outlier_data
    return detector.fit(victim, **kwargs)


def saved_kind(directory: str | os.PathLike) -> str:
    """The ``kind`` in the manifest of the artifact in ``directory`` (``ArtifactError`` if unreadable)."""
    manifest_path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ArtifactError(f"No artifact directory at {directory}.")
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory} is not a saved detector: {MANIFEST} is missing.")
    try:
        kind = json.loads(manifest_path.read_text()).get("kind")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ArtifactError(f"{manifest_path} is not a valid manifest: {exc}") from None
    return kind


def load_detector(directory: str | os.PathLike, victim: Any, *, device: str | torch.device | None = "cpu",
                  check_victim: bool = True) -> Detector:
    """Load a saved detector of any kind in :data:`DETECTOR_KINDS` and attach it to ``victim``.

    Every file's SHA-256 is verified and only safetensors are read; with ``check_victim`` the victim
    must be the one the detector was fitted for (when both weights SHA-256 are known).
    """
    kind = saved_kind(directory)
    if kind not in DETECTOR_KINDS:
        raise ArtifactError(f"{directory} holds a {kind!r} artifact, not a detector of a known kind "
                            f"({', '.join(sorted(DETECTOR_KINDS))}).")
    detector = DETECTOR_KINDS[kind].load(directory, victim, check_victim=check_victim, device=device)
    logger.info("Loaded a %s from %s", type(detector).__name__, directory)
    return detector
