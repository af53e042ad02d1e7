"""Conformal p-values of per-query scores against benign calibration, split by predicted class.

A detector's score (larger = more suspicious) becomes a p-value: the fraction of benign calibration
scores at least as large. If a benign query is exchangeable with the calibration queries of its
category, ``P(p <= u) <= u`` for every ``u`` in [0, 1] (conservative p-value), with equality for the
smoothed p-value (Vovk, Gammerman and Shafer, *Algorithmic Learning in a Random World*, 2005;
Bates, Candès, Lei, Romano and Sesia, *Testing for outliers with conformal p-values*, Annals of
Statistics 2023). The category is the victim's predicted label ("Mondrian" or class-conditional
calibration, ALRW chapter 4): scores such as a reconstruction error differ between classes, so a
benign client asking about one class only would look anomalous against pooled calibration.

Caveat: one fixed calibration set makes a client's successive p-values only marginally valid and
slightly positively dependent (Bates et al. 2023): given the calibration set, a benign client's
p-values are independent but not exactly uniform, so a test martingale over a long stream can drift
upwards on an unlucky calibration draw. ``conditional=eta`` removes this (calibration-conditional
p-values, Bates et al. 2023, section 3, with the DKW inequality of Massart 1990): each conservative
p-value is raised by ``eps(m) = sqrt(log(R / eta) / (2 m))`` for a reference of ``m`` scores (``R``
references in all, a union bound), capped at 1. With probability at least ``1 - eta`` over the
calibration draw, every reference's empirical survival function is within ``eps`` of the true one
(Massart's one-sided bound ``exp(-2 m eps^2)``, valid where it is at most 1/2: ``eta <= 1/2``),
and then the adjusted p-value of a benign query is super-uniform *given the calibration set*: a
benign client's martingale is a test supermartingale for this very calibration, and
``P(ever alarmed | calibration) <= delta`` holds for every client at once. The price is power: no
p-value falls below ``eps`` (about 0.1 with 500 scores per class), so a blatant attacker needs more
queries before its alarm.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..api import ArtifactError, NotFittedError
from ..artifacts import load_artifact, save_artifact
from ..validation import check_eta, check_int

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

__all__ = ["ARTIFACT_KIND", "ConformalCalibrator", "conformal_p_values", "conformal_p_values_array"]

#: The ``kind`` of a saved calibration in its manifest.
ARTIFACT_KIND = "conformal-calibration"


def conformal_p_values(reference: torch.Tensor, scores: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """Conformal p-values of ``scores`` against one sorted reference set (the formula, no checks).

    Args:
        reference: ``(m,)`` float64 benign calibration scores sorted ascending, ``m >= 1``, finite.
        scores: ``(N,)`` float64 query scores, larger = more suspicious; NaN is ranked above every
            calibration score (as ``+inf``), i.e. it gets the smallest p-value (fail closed).
        theta: ``(N,)`` float64 tie-breaking uniforms in (0, 1] for the smoothed p-value
            ``(#{s_j > s} + θ·(1 + #{s_j = s})) / (m + 1)``; ``None`` for the conservative p-value
            ``(1 + #{s_j >= s}) / (m + 1)``.

    Returns:
        ``(N,)`` float64 p-values in (0, 1]; the smallest possible are ``1/(m+1)`` (conservative)
        and ``θ/(m+1)`` (smoothed), reached by scores above (or equal to the largest) calibration
        score, and by NaN.
    """
    m = reference.numel()
    s = torch.nan_to_num(scores, nan=float("inf"))
    below_or_equal_left = torch.searchsorted(reference, s, side="left")   # #{s_j < s}
    below_or_equal_right = torch.searchsorted(reference, s, side="right")  # #{s_j <= s}
    if theta is None:
        at_least = m - below_or_equal_left
        return (1.0 + at_least.to(torch.float64)) / (m + 1.0)
    greater = (m - below_or_equal_right).to(torch.float64)
    equal = (below_or_equal_right - below_or_equal_left).to(torch.float64)
    return (greater + theta * (1.0 + equal)) / (m + 1.0)


def conformal_p_values_array(reference: np.ndarray, scores: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """:func:`conformal_p_values` on NumPy arrays: the same formula and the same float64 operations
    in the same order, so the same bits (the per-request hot path, without tensor overheads).

    Args:
        reference: ``(m,)`` float64 sorted ascending, ``m >= 1``, finite.
        scores: ``(N,)`` float64; NaN counts as ``+inf``.
        theta: ``(N,)`` float64 in (0, 1], or ``None`` (conservative p-values).

    Returns:
        ``(N,)`` float64 p-values in (0, 1].
    """
    m = reference.shape[0]
    s = np.where(np.isnan(scores), np.inf, scores)
    left = np.searchsorted(reference, s, side="left")     # #{s_j < s}
    right = np.searchsorted(reference, s, side="right")   # #{s_j <= s}
    if theta is None:
        return (1.0 + (m - left).astype(np.float64)) / (m + 1.0)
    greater = (m - right).astype(np.float64)
    equal = (right - left).astype(np.float64)
    return (greater + theta * (1.0 + equal)) / (m + 1.0)


class ConformalCalibrator:
    """Class-conditional (Mondrian) conformal p-values of a detector's scores.

    Fit it on the scores of benign queries that the detector was **not** fitted on, with the
    victim's predicted labels; each query's p-value is then computed against the calibration scores
    of its own predicted class. A class with fewer than ``min_class_size`` calibration scores (none
    included) uses the pooled scores of all classes instead, with a logged warning: its p-values are
    then valid only insofar as its benign scores resemble the pooled ones.

    Args:
        smoothed: smoothed p-values (exactly uniform for benign queries, ties broken by a uniform
            ``θ`` from the caller's generator) rather than conservative ones (super-uniform,
            deterministic).
        min_class_size: smallest number of calibration scores for a class to get its own reference;
            at least 1.
        conditional: ``None`` (default): marginal conformal p-values. ``eta`` in (0, 0.5]:
            calibration-conditional p-values (see the module docstring): the conservative p-value
            plus :meth:`margin` of its reference, capped at 1, super-uniform given the calibration set
            with probability at least ``1 - eta`` over its draw (``smoothed`` is then ignored).

    Attributes (after :meth:`fit`):
        num_classes_: number of classes ``K``.
        class_conditional_: ``False`` when fitted without labels (one pooled reference).
        pooled_: ``(m,)`` float64 all calibration scores sorted ascending.
        class_scores_: ``(m,)`` float64 calibration scores sorted by (class, score).
        class_offsets_: ``(K + 1,)`` int64; class ``c`` is ``class_scores_[offsets[c]:offsets[c+1]]``.
    """

    def __init__(self, smoothed: bool = True, min_class_size: int = 50, conditional: float | None = None) -> None:
        if not isinstance(smoothed, bool):
            raise ValueError(f"smoothed must be True or False, got {smoothed!r}.")
        self.smoothed = smoothed
        self.min_class_size = check_int(min_class_size, "min_class_size", minimum=1)
        self.conditional = None if conditional is None else check_eta(conditional)
        self.num_classes_: int | None = None
        self.class_conditional_ = False
        self.pooled_: torch.Tensor | None = None
        self.class_scores_: torch.Tensor | None = None
        self.class_offsets_: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- fitting
    def fit(self, scores: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> Self:
        """Store benign calibration scores, sorted, per predicted class.

        Args:
            scores: ``(m,)`` finite benign scores, ``m >= 1``, larger = more suspicious.
            labels: ``(m,)`` integer predicted labels in ``[0, num_classes)``, or ``None`` for one
                pooled reference (then ``labels`` passed to :meth:`p_values` are ignored).
            num_classes: number of classes ``K >= 1`` of the victim.

        Returns:
            ``self``.
        """
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        scores = _as_scores(scores, "scores")
        if scores.numel() == 0:
            raise ValueError("scores is empty: calibration needs at least one benign score.")
        if not torch.isfinite(scores).all():
            raise ValueError("Calibration scores must be finite; found NaN or infinity in scores.")
        if labels is None:
            labels = torch.zeros(scores.numel(), dtype=torch.int64)
            class_conditional = False
        else:
            labels = _as_labels(labels, scores.numel(), num_classes, "labels")
            class_conditional = True
        order = torch.argsort(scores, stable=True)                # by score,
        order = order[torch.argsort(labels[order], stable=True)]  # then by class (stable: sorted within)
        counts = torch.bincount(labels, minlength=num_classes if class_conditional else 1)
        self.num_classes_ = num_classes
        self.class_conditional_ = class_conditional
        self.pooled_ = torch.sort(scores).values
        self.class_scores_ = scores[order].contiguous()
        self.class_offsets_ = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        self._warn_small_classes()
        return self

    def _warn_small_classes(self) -> None:
        small = self.fallback_classes()
        if small:
            logger.warning(
                "Conformal calibration: %d class(es) have fewer than %d calibration scores and use the "
                "pooled scores (%d) instead: %s", len(small), self.min_class_size, self.pooled_.numel(),
                ", ".join(map(str, small[:20])) + (" ..." if len(small) > 20 else ""))

    def fallback_classes(self) -> list[int]:
        """Classes whose p-values use the pooled scores (fewer than ``min_class_size`` of their own)."""
        self._check_fitted()
        if not self.class_conditional_:
            return []
        counts = self.class_offsets_[1:] - self.class_offsets_[:-1]
        return [int(c) for c in torch.nonzero(counts < self.min_class_size).flatten()]

    def reference(self, label: int | None = None) -> torch.Tensor:
        """The sorted ``(m_c,)`` float64 calibration scores that label ``label``'s p-values use."""
        self._check_fitted()
        if not self.class_conditional_ or label is None:
            return self.pooled_
        start, stop = int(self.class_offsets_[label]), int(self.class_offsets_[label + 1])
        if stop - start < self.min_class_size:
            return self.pooled_
        return self.class_scores_[start:stop]

    def margin(self, size: int) -> float:
        """The calibration-conditional margin ``sqrt(log(R / eta) / (2 size))`` added to the p-values of a
        reference of ``size`` scores (``0.0`` without ``conditional``).

        ``R`` counts the references a p-value can use: one per class with its own reference plus the
        pooled one (one in all when not class-conditional); the union bound over them makes the
        DKW bound hold for all of them at once with probability at least ``1 - eta``.
        """
        if self.conditional is None:
            return 0.0
        return math.sqrt(math.log(self._references()[1] / self.conditional) / (2.0 * size))

    # ---------------------------------------------------------------------------------- p-values
    def p_values(self, scores: torch.Tensor, labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Conformal p-values of query scores, each against its predicted class's calibration.

        Args:
            scores: ``(N,)`` scores, larger = more suspicious. A NaN score (a broken detector output)
                is ranked above every calibration score and gets the smallest p-value of its
                reference (``1/(m+1)``, or ``θ/(m+1)`` when smoothed): fail closed.
            labels: ``(N,)`` integer predicted labels in ``[0, K)``; required when the calibrator was
                fitted with labels, ignored otherwise.
            generator: source of the smoothing uniforms ``θ`` (one per query, drawn in order; the
                global generator when ``None``); unused for conservative p-values.
            theta: ``(N,)`` the smoothing uniforms in (0, 1] themselves, instead of drawing them.

        Returns:
            ``(N,)`` float64 CPU p-values in (0, 1].
        """
        self._check_fitted()
        scores = _as_scores(scores, "scores")
        n = scores.numel()
        if not self.smoothed:
            theta = None
        elif theta is None:
            theta = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)  # in (0, 1]
        else:
            theta = _as_theta(theta, n)
        if not self.class_conditional_:
            return self.checked_p_values(scores, None, theta)
        if labels is None:
            raise ValueError("This calibrator is class-conditional: pass labels, the victim's predicted "
                             "label of each query.")
        return self.checked_p_values(scores, _as_labels(labels, n, self.num_classes_, "labels"), theta)

    def checked_p_values(self, scores: torch.Tensor, labels: torch.Tensor | None,
                         theta: torch.Tensor | None) -> torch.Tensor:
        """:meth:`p_values` of inputs the caller has already checked: ``(N,)`` float64 CPU scores,
        ``(N,)`` int64 CPU labels in ``[0, K)`` (or ``None`` when not class-conditional), ``(N,)``
        float64 ``theta`` in (0, 1] (ignored unless ``smoothed``). The per-query hot path."""
        if not self.smoothed or self.conditional is not None:
            theta = None
        if not self.class_conditional_ or labels is None:
            return self._adjusted(conformal_p_values(self.pooled_, scores, theta), self.pooled_.numel())
        n = scores.numel()
        first = int(labels[0])
        if n == 1 or bool((labels == first).all()):  # one class: no grouping needed
            reference = self.reference(first)
            return self._adjusted(conformal_p_values(reference, scores, theta), reference.numel())
        out = torch.empty(n, dtype=torch.float64)
        for label in torch.unique(labels).tolist():  # a loop over classes, not over queries
            mask = labels == label
            reference = self.reference(label)
            out[mask] = self._adjusted(conformal_p_values(reference, scores[mask], None if theta is None else theta[mask]),
                                       reference.numel())
        return out

    def _adjusted(self, p: torch.Tensor | np.ndarray, size: int) -> torch.Tensor | np.ndarray:
        """``min(1, p + margin(size))`` with ``conditional`` (the same float64 operations for tensors and
        arrays, so both paths give the same bits), else ``p`` itself."""
        if self.conditional is None:
            return p
        margin = self.margin(size)
        return torch.clamp(p + margin, max=1.0) if isinstance(p, torch.Tensor) else np.minimum(p + margin, 1.0)

    def p_values_array(self, scores: np.ndarray, labels: np.ndarray | None, theta: np.ndarray | None) -> np.ndarray:
        """:meth:`checked_p_values` on NumPy arrays (equal bits; the reference the monitor's compiled
        p-values are tested against, :func:`~sameguard.evidence.monitor_kernel.p_values`).

        Args:
            scores: ``(N,)`` float64 scores (NaN: most suspicious).
            labels: ``(N,)`` int64 labels in ``[0, K)``, already checked, or ``None``.
            theta: ``(N,)`` float64 smoothing uniforms in (0, 1] (ignored unless ``smoothed``).

        Returns:
            ``(N,)`` float64 p-values in (0, 1].
        """
        if not self.smoothed or self.conditional is not None:
            theta = None
        refs = self._reference_arrays()
        if not self.class_conditional_ or labels is None:
            return self._adjusted(conformal_p_values_array(refs[-1], scores, theta), refs[-1].shape[0])
        first = int(labels[0])
        if labels.shape[0] == 1 or bool((labels == first).all()):  # one class: no grouping needed
            return self._adjusted(conformal_p_values_array(refs[first], scores, theta), refs[first].shape[0])
        out = np.empty(scores.shape[0], dtype=np.float64)
        for label in np.unique(labels).tolist():  # a loop over classes, not over queries
            mask = labels == label
            out[mask] = self._adjusted(conformal_p_values_array(refs[label], scores[mask],
                                                                None if theta is None else theta[mask]),
                                       refs[label].shape[0])
        return out

    def _reference_arrays(self) -> list[np.ndarray]:
        """Per class ``c`` the sorted float64 NumPy reference of :meth:`reference` (``c``), the pooled one
        last (read-only views of the fitted tensors, no copies)."""
        return self._references()[0]

    def _references(self) -> tuple[list[np.ndarray], int]:
        """:meth:`_reference_arrays` and the number of distinct references they hold (the classes with
        their own, plus the pooled one), built once per fitted state."""
        key = (id(self.pooled_), id(self.class_scores_), id(self.class_offsets_), self.min_class_size)
        cached = getattr(self, "_arrays", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        self._check_fitted()
        k = self.num_classes_ if self.class_conditional_ else 0
        arrays = [self.reference(c).numpy() for c in range(k)] + [self.pooled_.numpy()]
        count = 1 + k - len(self.fallback_classes())
        # The owners of the ids in the key are held, so that the ids cannot be reused meanwhile.
        self._arrays = (key, arrays, count, (self.pooled_, self.class_scores_, self.class_offsets_))
        return arrays, count

    # ------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted tensors: ``pooled``, ``class_scores`` (float64) and ``class_offsets`` (int64)."""
        self._check_fitted()
        return {"pooled": self.pooled_.clone(), "class_scores": self.class_scores_.clone(),
                "class_offsets": self.class_offsets_.clone()}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable hyper-parameters and fitted sizes."""
        self._check_fitted()
        return {"smoothed": self.smoothed, "min_class_size": self.min_class_size,
                "num_classes": self.num_classes_, "class_conditional": self.class_conditional_,
                "conditional": self.conditional}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], config: dict[str, Any]) -> ConformalCalibrator:
        """Rebuild a fitted calibrator from :meth:`state_dict` and :meth:`config` (checked)."""
        try:
            calibrator = cls(smoothed=config["smoothed"], min_class_size=config["min_class_size"],
                             conditional=config.get("conditional"))  # absent in calibrations saved before it
            num_classes = check_int(config["num_classes"], "num_classes", minimum=1)
            pooled, class_scores, offsets = state["pooled"], state["class_scores"], state["class_offsets"]
            class_conditional = bool(config["class_conditional"])
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"A conformal calibration state lacks the entry {exc}.") from None
        k = num_classes if class_conditional else 1
        m = pooled.numel()
        if (pooled.dim() != 1 or m == 0 or class_scores.shape != pooled.shape or offsets.shape != (k + 1,)
                or int(offsets[0]) != 0 or int(offsets[-1]) != m or bool((offsets.diff() < 0).any())
                or not bool(torch.isfinite(pooled).all()) or bool((pooled.diff() < 0).any())):
            raise ArtifactError("A conformal calibration state is inconsistent (shapes, offsets or order).")
        calibrator.num_classes_, calibrator.class_conditional_ = num_classes, class_conditional
        calibrator.pooled_ = pooled.to(torch.float64).contiguous()
        calibrator.class_scores_ = class_scores.to(torch.float64).contiguous()
        calibrator.class_offsets_ = offsets.to(torch.int64).contiguous()
        return calibrator

    def save(self, directory: str | os.PathLike, *, detector_sha256: str | None,
             victim_sha256: str | None) -> Path:
        """Write the calibration as a ``conformal-calibration`` artifact (safetensors + manifest).

        ``detector_sha256`` and ``victim_sha256`` identify the detector and victim whose scores and
        labels were calibrated (e.g. :func:`sameguard.artifacts.state_dict_sha256`); :meth:`load`
        refuses the calibration for another pair. ``None`` records that it is unknown.
        """
        config = {**self.config(), "detector_sha256": detector_sha256, "victim_sha256": victim_sha256}
        return save_artifact(directory, ARTIFACT_KIND, {"calibration": self.state_dict()}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, detector_sha256: str | None = None,
             victim_sha256: str | None = None) -> ConformalCalibrator:
        """Read a calibration saved by :meth:`save`, verifying file hashes and the expected models.

        Raises:
            ArtifactError: the artifact is missing or malformed, or ``detector_sha256`` /
                ``victim_sha256`` is given and differs from the one recorded at save time.
            IntegrityError: a file does not match its manifest's SHA-256.
        """
        parts, manifest = load_artifact(directory, ARTIFACT_KIND)
        config = manifest.get("config", {})
        for what, expected in (("detector", detector_sha256), ("victim", victim_sha256)):
            saved = config.get(f"{what}_sha256")
            if expected is not None and saved != expected:
                raise ArtifactError(
                    f"The calibration in {directory} was made for the {what} with SHA-256 {saved}, not for "
                    f"the expected {what} {expected}: its p-values would be meaningless; recalibrate.")
        if "calibration" not in parts:
            raise ArtifactError(f"{directory} has no calibration part.")
        return cls.from_state(parts["calibration"], config)

    def _check_fitted(self) -> None:
        if self.pooled_ is None:
            raise NotFittedError("ConformalCalibrator is not fitted: call fit(scores, labels, num_classes) first.")


def _as_scores(scores: object, name: str) -> torch.Tensor:
    """``scores`` as a 1-D float64 CPU tensor (NaN allowed here; callers decide)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D torch.Tensor of scores, got {type(scores).__name__}.")
    if scores.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one score per query), got shape {tuple(scores.shape)}.")
    if not (torch.is_floating_point(scores) or scores.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {scores.dtype}.")
    return scores.detach().to("cpu", torch.float64)


def _as_labels(labels: object, n: int, num_classes: int, name: str) -> torch.Tensor:
    """``labels`` as a 1-D int64 CPU tensor of length ``n`` with values in ``[0, num_classes)``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer torch.Tensor, got {_describe(labels)}.")
    if torch.is_floating_point(labels) or labels.dtype == torch.bool or torch.is_complex(labels):
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}.")
    if labels.numel() != n:
        raise ValueError(f"{name} must have one label per score ({n}), got {labels.numel()}.")
    labels = labels.detach().to("cpu", torch.int64)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}].")
    return labels


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _as_theta(theta: object, n: int) -> torch.Tensor:
    theta = torch.as_tensor(theta, dtype=torch.float64).flatten()
    if theta.numel() != n or not bool(((theta > 0) & (theta <= 1)).all()):
        raise ValueError(f"theta must hold {n} smoothing uniforms in (0, 1], one per score.")
    return theta
