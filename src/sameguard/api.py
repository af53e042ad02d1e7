"""The small contracts shared by the whole package: named errors and the detector base class.

Every detector follows one life cycle (in the spirit of scikit-learn and pytorch-ood)::

    detector.fit(...)                     # -> self, learns from the defender's own data
    detector.score(x)                     # -> Tensor[N], larger = more suspicious
    detector.calibrate(benign_x, fpr)     # -> self, sets ``threshold_``
    detector.predict(x)                   # -> Tensor[N] of bool, ``score > threshold_``

Optional abilities are declared, not guessed: a detector that keeps per-client state satisfies
:class:`StatefulDetector`, one that can be written to disk and read back satisfies
:class:`SaveableDetector`; callers test them with ``isinstance(detector, StatefulDetector)``.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

__all__ = [
    "SameguardError",
    "NotFittedError",
    "NotCalibratedError",
    "DatasetNotFoundError",
    "ArtifactError",
    "IntegrityError",
    "Detector",
    "StatefulDetector",
    "SaveableDetector",
    "threshold_at_fpr",
    "flag_scores",
]


class SameguardError(Exception):
    """Base class of every error raised on purpose by sameguard."""


class NotFittedError(SameguardError, RuntimeError):
    """A method that needs fitted state was called before ``fit``."""


class NotCalibratedError(SameguardError, RuntimeError):
    """``predict`` was called before ``calibrate`` set a threshold."""


class DatasetNotFoundError(SameguardError, FileNotFoundError):
    """A dataset's files could not be found in any of the places sameguard looks."""


class ArtifactError(SameguardError, ValueError):
    """A saved artifact (victim, detector) is missing, malformed or of the wrong kind."""


class IntegrityError(ArtifactError):
    """A saved file does not match the SHA-256 recorded in its manifest (tampered or corrupt)."""


def flag_scores(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(N,)`` bool: a query is flagged when ``score > threshold`` **or its score is not finite**.

    NaN, ``+inf`` and ``-inf`` scores come from broken detectors (corrupted weights, overflow), never
    from a working one, so they count as flagged everywhere (library, CLI, service): fail closed.
    """
    s = torch.as_tensor(scores)
    return ~torch.isfinite(s) | (s > threshold)


def threshold_at_fpr(benign_scores: torch.Tensor, target_fpr: float) -> float:
    """Smallest threshold ``t`` such that the fraction of benign scores ``> t`` is ``<= target_fpr``.

    Args:
        benign_scores: ``(N,)`` scores of benign queries, ``N >= 1``, finite.
        target_fpr: wanted false-positive rate in ``[0, 1)``.

    Returns:
        The threshold; a query is flagged when ``score > threshold``. With ``N`` benign scores
        the achievable FPRs are multiples of ``1/N``; the returned threshold achieves the largest
        one that does not exceed ``target_fpr`` on these scores.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr!r}.")
    scores = torch.as_tensor(benign_scores, dtype=torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("Calibration needs at least one benign score, got an empty tensor.")
    if not torch.isfinite(scores).all():
        raise ValueError("Calibration scores must be finite; found NaN or infinity.")
    sorted_scores, _ = torch.sort(scores)
    n = sorted_scores.numel()
    allowed = int(torch.floor(torch.tensor(target_fpr * n + 1e-9)).item())  # flagged at most
    # Flag the ``allowed`` largest scores: threshold = the (n - allowed)-th smallest score.
    return float(sorted_scores[n - allowed - 1].item()) if allowed < n else float("-inf")


class Detector(abc.ABC):
    """Base class of all detectors: one score per query, larger = more suspicious.

    Subclasses implement :meth:`fit`, :meth:`score` and :meth:`is_fitted`; calibration and
    prediction are shared.
    """

    #: What the detector needs beyond black-box access to the victim's outputs: ``"defender-data"``
    #: (the provider's training data, passed to ``fit`` as ``train_data``), ``"outlier-data"``
    #: (``outlier_data``), ``"query-history"`` (per-client state), ``"white-box"``, ``"training-change"``.
    NEEDS: ClassVar[frozenset[str]] = frozenset()
    #: Hyper-parameters used only at scoring time (e.g. SAME's ``alpha``): changing them needs no
    #: refit, so the benchmark lets detectors that differ only in these share one fitted state.
    SCORING_ONLY_PARAMS: ClassVar[tuple[str, ...]] = ()
    #: Named sets of constructor arguments for :meth:`from_preset` (e.g. training budgets such as
    #: ``"paper"``, ``"cpu"``, ``"tiny"``); empty when the detector has none.
    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    threshold_: float | None = None
    calibration_fpr_: float | None = None

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> Self:
        """A detector built from the constructor arguments ``PRESETS[preset]``, ``overrides`` on top."""
        if preset not in cls.PRESETS:
            choices = f"choose one of {sorted(cls.PRESETS)}" if cls.PRESETS else "it has none"
            raise ValueError(f"Unknown preset {preset!r} for {cls.__name__}; {choices}.")
        return cls(**(dict(cls.PRESETS[preset]) | overrides))

    @abc.abstractmethod
    def fit(self, *args, **kwargs) -> Self:
        """Learn the detector's state; returns ``self``."""

    @abc.abstractmethod
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of a batch ``x`` of shape ``(N, C, H, W)`` in ``[-1, 1]``: ``(N,)``, float32."""

    @abc.abstractmethod
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has completed (or fitted state was loaded)."""

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet: call fit(...) or load a saved "
                "detector before scoring, calibrating or predicting."
            )

    def calibrate(self, benign_x: torch.Tensor, target_fpr: float = 0.01) -> Self:
        """Set ``threshold_`` so that about ``target_fpr`` of ``benign_x`` would be flagged.

        Args:
            benign_x: ``(N, C, H, W)`` benign queries in ``[-1, 1]`` that the detector was **not**
                trained on (e.g. a held-out part of the provider's data).
            target_fpr: wanted false-positive rate on benign traffic, in ``[0, 1)``.
        """
        self._check_fitted()
        scores = self.score(benign_x)
        self.threshold_ = threshold_at_fpr(scores, target_fpr)
        self.calibration_fpr_ = float(target_fpr)
        logger.info(
            "%s calibrated on %d benign queries: threshold %.6g for target FPR %.4f",
            type(self).__name__, scores.numel(), self.threshold_, target_fpr,
        )
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: True where the query is flagged as extraction (``score > threshold_``, or a
        score that is NaN or infinite: :func:`flag_scores`)."""
        self._check_fitted()
        if self.threshold_ is None:
            raise NotCalibratedError(
                f"This {type(self).__name__} has no threshold: call calibrate(benign_x, "
                "target_fpr) first (or load a calibrated detector)."
            )
        return flag_scores(self.score(x), self.threshold_)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)


@runtime_checkable
class StatefulDetector(Protocol):
    """A detector that keeps per-client state (PRADA, VarDetect): each client's queries form a stream.

    ``isinstance(detector, StatefulDetector)`` is how the guard and the benchmark tell it apart.
    """

    def observe(self, x: torch.Tensor, client: str) -> torch.Tensor:
        """Score the batch ``x`` (``(N, C, H, W)`` in ``[-1, 1]``) as the next queries of ``client``'s
        stream and record it; returns ``(N,)`` float32 scores, larger = more suspicious."""
        ...

    def reset(self, client: str) -> None:
        """Forget everything recorded for ``client``."""
        ...


@runtime_checkable
class SaveableDetector(Protocol):
    """A detector that writes its fitted state to a directory (safetensors + manifest) and reads it back.

    ``KIND`` is the manifest's ``kind``; :func:`sameguard.detectors.registry.load_detector` uses it
    to find the class of a saved detector.
    """

    KIND: ClassVar[str]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fitted detector (threshold included) to ``directory``; returns its path."""
        ...

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: Any, *, check_victim: bool = True,
             device: str | torch.device | None = "cpu") -> Self:
        """Read a detector written by :meth:`save` (hashes verified, no pickles) and attach it to ``victim``."""
        ...
