"""SAME for any reconstruction model: the score formula and the fit / score / save / load shared by
the MAE detector (:mod:`sameguard.detectors.same`) and its conv auto-encoder ablation
(:mod:`sameguard.detectors.same_conv_ae`).

SAME (Xie et al., AAAI 2024) trains a reconstruction model ``G`` on the defender's data, then an
auxiliary classifier ``f_A`` (the victim's architecture) on ``G``'s reconstructions with the true
labels, and scores a query ``x`` by::

    x_hat = G(x);  s1 = mean (x_hat - x)^2;  s2 = (1/K) KL(f_V(x) || softmax f_A(x_hat))
    score = alpha * s1 + (1 - alpha) * s2                        (alpha = 0.99)

Larger = more suspicious. That is the default, unchanged. Options make the score robust (issue 10;
pure formulas in :mod:`sameguard.detectors.robust_score`), each fitted on benign data only, in
:meth:`ReconstructionDetector.calibrate`: ``standardize`` (each term in benign standard units before
``alpha`` weighs it), ``log_terms`` (log of each term) and ``complexity`` (``s1`` corrected for the
query's compressed length, Serrà et al., ICLR 2020); :class:`~sameguard.detectors.same.SAMEDetector`
adds masked scoring (``score_mask_ratio``, ``score_masks``).

A subclass says only how to build, train and run its ``G``
(:meth:`ReconstructionDetector._new_reconstructor` and the other hooks); everything else,
validation, the auxiliary model, scoring, the fitted state, persistence, presets and ``get_params``,
is here, once.

Paper: https://doi.org/10.1609/aaai.v38i18.29974 (arXiv 2312.10578).
Reference implementation: https://github.com/xythink/SAME (``ms_defense/SAME_defender.py``).
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..api import ArtifactError, Detector, NotCalibratedError
from ..artifacts import load_artifact, save_artifact
from ..forward_memo import memoized, no_grad
from ..models import build_classifier
from ..training import predict_in_batches, resolve_device, train_classifier
from ..validation import check_choice, check_fraction, check_images, check_int, check_optional_int, check_positive
from ._common import ParamsMixin, ProbabilityFn, check_victim_sha, labelled_images
from .complexity import COMPLEXITY_METHODS, compressed_bits_per_pixel
from .robust_score import (
    combine_terms,
    fit_complexity_beta,
    kl_per_class,
    masked_same_score,
    robust_location_scale,
    score_terms,
    standardize_term,
)

if TYPE_CHECKING:
    from typing import Self

    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["SAMEScores", "same_score", "reconstruction_scores", "ReconstructionDetector"]

#: ``(images (N, C, H, W), generator) -> images``: what the auxiliary classifier is trained on.
BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
#: ``images (N, C, H, W) -> (x_hats (k, N, C, H, W), masks (k, N or 1, 1, H, W))``: ``k`` masked
#: reconstructions of each query and their masks (1 = hidden), for masked scoring.
MaskedViews = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SAMEScores:
    """Per-query scores, each ``(N,)`` float32: the total and its two raw terms.

    ``t1`` and ``t2`` are the terms ``alpha`` weighed when a robust option changed them (log,
    complexity correction, standardisation; see :func:`~sameguard.detectors.robust_score.score_terms`),
    ``None`` on the authors' path, where ``score = alpha * s1 + (1 - alpha) * s2``.
    """

    score: torch.Tensor
    s1: torch.Tensor  # reconstruction MSE, >= 0 (on hidden pixels only with masked scoring)
    s2: torch.Tensor  # KL(victim || auxiliary) / K, >= 0
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None


def same_score(x: torch.Tensor, x_hat: torch.Tensor, p_victim: torch.Tensor, p_aux: torch.Tensor,
               alpha: float) -> SAMEScores:
    """The SAME formula on given tensors (pure function, no model).

    Args:
        x: ``(N, C, H, W)`` queries.
        x_hat: ``(N, C, H, W)`` their reconstructions.
        p_victim: ``(N, K)`` victim probabilities on ``x`` (rows sum to 1).
        p_aux: ``(N, K)`` auxiliary probabilities on ``x_hat``.
        alpha: weight of ``s1`` in ``[0, 1]``.

    Returns:
        ``score = alpha * s1 + (1 - alpha) * s2`` with ``s1 = mean((x_hat - x)^2)`` per query and
        ``s2 = sum_k p_k log(p_k / q_k) / K`` (terms with ``p_k = 0`` count 0).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    s1 = ((x_hat - x) ** 2).flatten(1).mean(1)
    s2 = kl_per_class(p_victim, p_aux)
    s1, s2 = s1.to(torch.float32), s2.to(torch.float32)
    return SAMEScores(score=alpha * s1 + (1.0 - alpha) * s2, s1=s1, s2=s2)


def _masked_batch_scores(batch: torch.Tensor, p_victim: torch.Tensor, views: MaskedViews, aux: nn.Module,
                         alpha: float, device: torch.device) -> SAMEScores:
    """One batch of :func:`~sameguard.detectors.robust_score.masked_same_score` (``k`` masks per query)."""
    x_hats, masks = views(batch.to(device))
    p_aux = torch.stack([torch.softmax(aux(x_hat), dim=1) for x_hat in x_hats]).cpu()
    s1, s2 = masked_same_score(batch, x_hats.cpu(), masks.cpu(), p_victim, p_aux)
    return SAMEScores(score=alpha * s1 + (1.0 - alpha) * s2, s1=s1, s2=s2)


def reconstruction_scores(x: torch.Tensor, *, victim: ProbabilityFn, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                          aux: nn.Module, alpha: float, num_classes: int, batch_size: int,
                          device: torch.device, masked_views: MaskedViews | None = None) -> SAMEScores:
    """SAME's scoring loop for any reconstruction model.

    Args:
        x: validated queries ``(N, C, H, W)`` in ``[-1, 1]`` on the CPU.
        victim: black box, ``images -> probabilities (N, K)``.
        reconstruct: ``images -> reconstructions`` of the same shape, on ``device``.
        aux: the auxiliary classifier (logits), on ``device``.
        masked_views: when given, masked scoring replaces ``reconstruct``: ``images -> (x_hats,
            masks)``, ``k`` masked reconstructions per query, scored by
            :func:`~sameguard.detectors.robust_score.masked_same_score`.

    Returns:
        The raw terms and ``score = alpha * s1 + (1 - alpha) * s2``, ``(N,)`` float32 each.
    """
    parts: list[SAMEScores] = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            batch = x[i:i + batch_size]
            p_victim = torch.as_tensor(victim(batch)).detach().cpu().float()
            if p_victim.shape != (len(batch), num_classes):
                raise ValueError(f"The victim returned shape {tuple(p_victim.shape)}; expected probabilities "
                                 f"of shape ({len(batch)}, {num_classes}).")
            if masked_views is not None:
                parts.append(_masked_batch_scores(batch, p_victim, masked_views, aux, alpha, device))
                continue
            x_hat = reconstruct(batch.to(device))
            p_aux = torch.softmax(aux(x_hat), dim=1).cpu()
            parts.append(same_score(batch, x_hat.cpu(), p_victim, p_aux, alpha))
    return SAMEScores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("score", "s1", "s2")))


class ReconstructionDetector(ParamsMixin, Detector):
    """SAME with any reconstruction model ``G``; larger score = more suspicious.

    Subclasses set ``KIND``, ``PRESETS``, ``PART`` (the artifact part and manifest key of ``G``) and
    ``LABEL`` (for logs), take their own hyper-parameters as keyword-only constructor arguments
    (passing the shared ones below to ``super().__init__``) and implement the ``G`` hooks.

    Args (shared):
        alpha: weight of the reconstruction term, in ``[0, 1]`` (authors' driver: 0.99).
        aux_arch: architecture of the auxiliary classifier; ``None`` takes the victim's ``arch``.
        aux_epochs, aux_lr, aux_batch_size: SAME's auxiliary recipe (80 epochs, SGD 0.1, batch 128;
            momentum 0.9, weight decay 5e-4, cosine schedule, augmentation on).
        max_train_samples: train on a random subset of at most this many images (``None``: all).
        batch_size: scoring batch size.
        seed: fixes initialisation, data order, masks and augmentation.
        device: ``"cpu"``, ``"cuda"``, or ``None``/``"auto"`` for CUDA when available.
        progress: progress bars (``None``: when stderr is a terminal).

    Robust score options (issue 10; scoring-only: no refit; the defaults give the authors' score
    exactly). With ``t1, t2`` the terms below, ``score = alpha * t1 + (1 - alpha) * t2``:

        standardize: ``t1`` and ``t2`` each in benign standard units, ``(t - median) / (1.4826 *
            MAD)`` with the median and MAD of the benign queries passed to :meth:`calibrate`, so
            that ``alpha`` weighs comparable quantities (0 = a typical benign query for both).
        log_terms: ``t = log(s + 1e-8)`` for both terms instead of ``s`` (reconstruction errors and
            KL terms are heavy-tailed; on a log scale a few huge values do not drown the rest).
        complexity: ``None``, ``"png"`` or ``"zlib"``: Serrà et al.'s (ICLR 2020) input-complexity
            correction ``t1 = log(s1 + 1e-8) - beta * L(x)``, ``L(x)`` the query's compressed
            length in bits per pixel value
            (:func:`~sameguard.detectors.complexity.compressed_bits_per_pixel`) and ``beta`` the
            least-squares slope of ``log s1`` on ``L`` over the benign queries passed to
            :meth:`calibrate`.

    ``standardize`` and ``complexity`` need :meth:`calibrate` before :meth:`score`
    (``NotCalibratedError`` otherwise); their statistics (``term_stats_``) are fitted on the
    calibration queries only, saved with the detector, and hold for the scoring configuration they
    were fitted under (changing ``log_terms``, ``complexity`` or the masking needs a new calibrate).

    Fitted state: ``reconstructor_`` (``G``), ``aux_``, ``victim_``, ``victim_sha256_``,
    ``image_shape_``, ``num_classes_``, ``aux_arch_``, ``fit_seconds_``; after :meth:`calibrate`,
    ``threshold_``, ``calibration_fpr_`` and ``term_stats_`` (``None`` unless ``standardize`` or
    ``complexity`` is set: a dict with the term configuration, ``n``, ``complexity_beta``,
    ``complexity_intercept``, ``t1_center``, ``t1_scale``, ``t2_center``, ``t2_scale``).
    """

    #: What SAME needs beyond black-box probabilities: the provider's own training data.
    NEEDS: ClassVar[frozenset[str]] = frozenset({"defender-data"})
    SCORING_ONLY_PARAMS: ClassVar[tuple[str, ...]] = ("alpha", "batch_size", "standardize", "log_terms", "complexity")
    KIND: ClassVar[str]
    #: Name of ``G``'s artifact part (``<PART>.safetensors``, manifest key ``<PART>_config``).
    PART: ClassVar[str]
    #: How logs and progress bars name this detector.
    LABEL: ClassVar[str]

    def __init__(self, *, alpha: float, aux_arch: str | None, aux_epochs: int, aux_lr: float, aux_batch_size: int,
                 max_train_samples: int | None, batch_size: int, seed: int, device: str | torch.device | None,
                 progress: bool | None, standardize: bool = False, log_terms: bool = False,
                 complexity: str | None = None) -> None:
        self.alpha = alpha
        self.standardize = standardize
        self.log_terms = log_terms
        self.complexity = complexity
        self.aux_arch = aux_arch
        self.aux_epochs = aux_epochs
        self.aux_lr = aux_lr
        self.aux_batch_size = aux_batch_size
        self.max_train_samples = max_train_samples
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.progress = progress
        self._check_shared_params()
        self._check_params()
        self.reconstructor_: nn.Module | None = None
        self.aux_: nn.Module | None = None
        self.victim_: ProbabilityFn | None = None
        self.victim_sha256_: str | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.num_classes_: int | None = None
        self.aux_arch_: str | None = None
        self.fit_seconds_: float | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.term_stats_: dict[str, Any] | None = None

    def _check_shared_params(self) -> None:
        check_fraction(self.alpha, "alpha")
        for name in ("standardize", "log_terms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_choice(self.complexity, "complexity", (None, *COMPLEXITY_METHODS))
        for name in ("aux_epochs", "aux_batch_size", "batch_size"):
            check_int(getattr(self, name), name)
        check_int(self.seed, "seed", minimum=0)
        check_positive(self.aux_lr, "aux_lr")
        check_optional_int(self.max_train_samples, "max_train_samples", minimum=1)
        if self.aux_arch is not None and not isinstance(self.aux_arch, str):
            raise ValueError(f"aux_arch must be an architecture name or None, got {self.aux_arch!r}.")

    # ------------------------------------------------------------------ what a subclass says about G
    def _check_params(self) -> None:
        """Validate the subclass's own hyper-parameters (full-sentence ``ValueError``)."""

    @abc.abstractmethod
    def _reconstructor_config(self, channels: int, size: int) -> Any:
        """``G``'s architecture (a config dataclass with ``to_dict``) for ``(channels, size, size)`` images."""

    @classmethod
    @abc.abstractmethod
    def _new_reconstructor(cls, config: dict[str, Any] | Any) -> nn.Module:
        """A freshly initialised ``G`` from its config (or the config's ``to_dict()``, when loading)."""

    @abc.abstractmethod
    def _train_reconstructor(self, model: nn.Module, images: torch.Tensor, device: torch.device) -> None:
        """Train ``G`` (already on ``device``) on ``images`` ``(N, C, H, W)`` in ``[-1, 1]``; leave it in eval mode."""

    @abc.abstractmethod
    def _aux_input(self, model: nn.Module) -> BatchTransform:
        """What the auxiliary classifier sees of a training batch: ``G``'s reconstructions of it."""

    @classmethod
    def _params_from_manifest(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from a manifest's ``params`` (override to decode non-JSON values)."""
        return params

    def _masked_views(self) -> MaskedViews | None:
        """Masked scoring's ``k`` reconstructions per query, or ``None`` to score with ``G(x)`` (default)."""
        return None

    def _term_config(self) -> dict[str, Any]:
        """The parameters that change the terms ``t1, t2`` (not ``alpha``): the key of ``term_stats_``."""
        return {"log_terms": self.log_terms, "complexity": self.complexity}

    def is_fitted(self) -> bool:
        return self.reconstructor_ is not None and self.aux_ is not None and self.victim_ is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether scoring needs :meth:`calibrate` first (``standardize`` or ``complexity`` is set)."""
        return bool(self.standardize) or self.complexity is not None

    # ------------------------------------------------------------------ fitting
    def fit(self, victim: ProbabilityFn, train_data: ImageDataset) -> Self:
        """Train ``G`` on ``train_data``, then the auxiliary model on its reconstructions.

        Args:
            victim: the black-box victim: ``images (N, C, H, W) -> probabilities (N, K)`` (e.g. a
                :class:`~sameguard.victim.Victim`). Only its outputs are used, at scoring time.
            train_data: the defender's training data (an :class:`~sameguard.data.ImageDataset`,
                images ``(N, C, H, W)`` in ``[-1, 1]`` and labels ``(N,)``), normally the victim's.
        """
        start = time.perf_counter()
        if not callable(victim):
            raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
        device = resolve_device(self.device)
        images, labels, num_classes = self._training_data(train_data)
        c, h, w = images.shape[1:]
        if h != w:
            raise ValueError(f"{self.LABEL}'s reconstruction model needs square images, got {h}x{w}.")
        aux_arch = self.aux_arch or getattr(victim, "arch", None)
        if aux_arch is None:
            raise ValueError("aux_arch is None and the victim has no 'arch' attribute: name the auxiliary "
                             "classifier's architecture (SAME uses the victim's).")
        config = self._reconstructor_config(c, h)
        torch.manual_seed(self.seed)
        model = self._new_reconstructor(config).to(device)
        self._train_reconstructor(model, images, device)
        torch.manual_seed(self.seed + 1)
        aux = build_classifier(aux_arch, c, h, num_classes)
        logger.info("%s: training the auxiliary %s on reconstructions for %d epochs", self.LABEL, aux_arch,
                    self.aux_epochs)
        train_classifier(aux, images, labels, epochs=self.aux_epochs, batch_size=self.aux_batch_size, lr=self.aux_lr,
                         augment=True, hflip=bool(getattr(train_data, "hflip", False)),
                         input_transform=self._aux_input(model), seed=self.seed + 2, device=device,
                         progress=self.progress, desc=f"{self.LABEL} auxiliary")
        self._set_fitted(model.eval(), aux.eval(), victim, aux_arch, (c, h, w), num_classes)
        self.fit_seconds_ = time.perf_counter() - start
        logger.info("%s fitted in %.1f s", self.LABEL, self.fit_seconds_)
        return self

    def _training_data(self, train_data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(images, labels, num_classes)``, a seeded random subset of ``max_train_samples`` when set."""
        images, labels, num_classes = labelled_images(train_data, "train_data")
        if self.max_train_samples is not None and len(images) > self.max_train_samples:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(images), generator=generator)[: self.max_train_samples]
            images, labels = images[keep], labels[keep]
        return images, labels, num_classes

    def _set_fitted(self, model: nn.Module, aux: nn.Module, victim: ProbabilityFn, aux_arch: str,
                    image_shape: tuple[int, int, int], num_classes: int) -> None:
        self.reconstructor_, self.aux_, self.victim_ = model, aux, victim
        self.victim_sha256_ = getattr(victim, "weights_sha256", None)
        self.image_shape_ = tuple(image_shape)
        self.num_classes_ = num_classes
        self.aux_arch_ = aux_arch
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.term_stats_ = None

    # ------------------------------------------------------------------ scoring
    @no_grad
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` reconstructions ``G(x)`` of the queries ``x`` (``(N, C, H, W)`` in ``[-1, 1]``)."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return predict_in_batches(self.reconstructor_.reconstruct, x, self.batch_size, self._model_device())

    @no_grad
    def score_components(self, x: torch.Tensor) -> SAMEScores:
        """``score``, ``s1`` and ``s2`` (and ``t1``, ``t2`` with a robust option) of each query in ``x``
        (``(N, C, H, W)`` in ``[-1, 1]``); ``(N,)`` float32 each, larger = more suspicious."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        stats = self._checked_term_stats()
        if not (self.standardize or self.log_terms or self.complexity is not None):
            return self._raw_components(x)  # the authors' score, untouched
        raw = self._raw_terms(x)
        # Detectors that share networks, options and fitted statistics (SAME and its s2 term, alpha
        # apart) share the terms too within a guarded request.
        t1, t2 = memoized((*self._raw_key(), self.standardize, *self._term_config().values(), stats), x,
                          lambda: self._terms(raw, x, stats))
        return SAMEScores(score=combine_terms(t1, t2, self.alpha), s1=raw.s1, s2=raw.s2,
                          t1=t1.to(torch.float32), t2=t2.to(torch.float32))

    def _raw_components(self, x: torch.Tensor) -> SAMEScores:
        """SAME's raw terms of validated queries (masked when the subclass's masked scoring is on).

        Within a guarded request (:func:`~sameguard.forward_memo.shared_forward`), detectors that share
        the same networks and raw-scoring options (e.g. SAME and its ``s2`` term, ``alpha`` apart)
        run them once; each combines the terms with its own ``alpha``.
        """
        raw = self._raw_terms(x)
        return SAMEScores(score=self.alpha * raw.s1 + (1.0 - self.alpha) * raw.s2, s1=raw.s1, s2=raw.s2)

    def _raw_terms(self, x: torch.Tensor) -> SAMEScores:
        """The raw terms ``s1, s2`` of validated queries (``score`` is with the alpha of whichever
        detector computed them first: read ``s1`` and ``s2`` only)."""
        return memoized(self._raw_key(), x,
                        lambda: reconstruction_scores(x, victim=self.victim_, reconstruct=self.reconstructor_.reconstruct,
                                                      aux=self.aux_, alpha=self.alpha, num_classes=self.num_classes_,
                                                      batch_size=self.batch_size, device=self._model_device(),
                                                      masked_views=self._masked_views()))

    def _raw_key(self) -> tuple[Any, ...]:
        """What the raw terms are a function of, besides the queries (:func:`~sameguard.forward_memo.memoized`)."""
        return (type(self), self.reconstructor_, self.aux_, self.victim_, self.num_classes_, self.batch_size,
                self._raw_config())

    def _raw_config(self) -> tuple[Any, ...]:
        """The scoring options that change the raw terms ``s1, s2`` (the subclass's masked scoring)."""
        return ()

    def _terms(self, raw: SAMEScores, x: torch.Tensor,
               stats: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t1, t2)`` float64: log / complexity-corrected terms, standardised when asked."""
        bits = None if self.complexity is None else compressed_bits_per_pixel(x, self.complexity)
        beta = 0.0 if bits is None else stats["complexity_beta"]
        t1, t2 = score_terms(raw.s1, raw.s2, log_terms=self.log_terms, complexity_bits=bits, beta=beta)
        if self.standardize:
            t1 = standardize_term(t1, stats["t1_center"], stats["t1_scale"])
            t2 = standardize_term(t2, stats["t2_center"], stats["t2_scale"])
        return t1, t2

    def _checked_term_stats(self) -> dict[str, Any] | None:
        """``term_stats_`` when the options need it (fitted for this configuration), else ``None``."""
        if not self.needs_calibration:
            return None
        options = f"standardize={self.standardize!r}, complexity={self.complexity!r}"
        if self.term_stats_ is None:
            raise NotCalibratedError(
                f"This {type(self).__name__} scores with {options}, whose statistics are fitted on benign "
                "data: call calibrate(benign_x, target_fpr) first (or load a calibrated detector).")
        if self.term_stats_.get("config") != self._term_config():
            raise NotCalibratedError(
                f"This {type(self).__name__}'s term statistics were fitted for the scoring configuration "
                f"{self.term_stats_.get('config')}, not the current {self._term_config()}: call "
                "calibrate(benign_x, target_fpr) again.")
        return self.term_stats_

    def calibrate(self, benign_x: torch.Tensor, target_fpr: float = 0.01) -> Self:
        """Fit the robust options' statistics (``term_stats_``) on ``benign_x`` when ``standardize``
        or ``complexity`` is set, then the threshold (:meth:`Detector.calibrate`).

        Only ``benign_x`` enters the statistics: ``beta`` (least squares of ``log s1`` on ``L(x)``,
        :func:`~sameguard.detectors.robust_score.fit_complexity_beta`), then the median and
        ``1.4826 * MAD`` of ``t1`` and of ``t2``
        (:func:`~sameguard.detectors.robust_score.robust_location_scale`). Without those options
        ``term_stats_`` is ``None`` and calibration is the shared one; with them, ``benign_x`` is
        scored twice (once for the statistics, once for the threshold).

        Args:
            benign_x: ``(N, C, H, W)`` benign queries in ``[-1, 1]`` the detector was not trained on.
            target_fpr: wanted false-positive rate on benign traffic, in ``[0, 1)``.
        """
        self._check_fitted()
        self.term_stats_ = None
        if self.needs_calibration:
            x = check_images(benign_x, self.image_shape_, name="benign_x")
            self.term_stats_ = self._fit_term_stats(x, self._raw_components(x))
        return super().calibrate(benign_x, target_fpr)

    def _fit_term_stats(self, x: torch.Tensor, raw: SAMEScores) -> dict[str, Any]:
        """The robust options' statistics from benign queries ``x`` and their raw terms ``raw``."""
        stats: dict[str, Any] = {"config": self._term_config(), "n": len(x),
                                 "complexity_beta": None, "complexity_intercept": None}
        bits = None
        if self.complexity is not None:
            bits = compressed_bits_per_pixel(x, self.complexity)
            stats["complexity_beta"], stats["complexity_intercept"] = fit_complexity_beta(raw.s1, bits)
        t1, t2 = score_terms(raw.s1, raw.s2, log_terms=self.log_terms, complexity_bits=bits,
                             beta=stats["complexity_beta"] or 0.0)
        stats["t1_center"], stats["t1_scale"] = robust_location_scale(t1)
        stats["t2_center"], stats["t2_scale"] = robust_location_scale(t2)
        logger.info("%s term statistics from %d benign queries: %s", self.LABEL, len(x), stats)
        return stats

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 SAME scores, larger = more suspicious."""
        return self.score_components(x).score

    def _model_device(self) -> torch.device:
        return next(self.reconstructor_.parameters()).device

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<PART>.safetensors``, ``aux.safetensors`` and ``manifest.json`` (threshold,
        hyper-parameters, normalisation, the victim's weights SHA-256) to ``directory``."""
        self._check_fitted()
        config = {
            "params": self.get_params(),
            f"{self.PART}_config": self.reconstructor_.config.to_dict(),
            "aux_arch": self.aux_arch_,
            "image_shape": list(self.image_shape_),
            "num_classes": self.num_classes_,
            "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]",
            "threshold": self.threshold_,
            "calibration_fpr": self.calibration_fpr_,
            "term_stats": self.term_stats_,
            "victim_weights_sha256": self.victim_sha256_,
            "fit_seconds": self.fit_seconds_,
        }
        parts = {self.PART: self.reconstructor_.state_dict(), "aux": self.aux_.state_dict()}
        return save_artifact(directory, self.KIND, parts, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: ProbabilityFn, *, check_victim: bool = True,
             device: str | torch.device | None = "cpu") -> Self:
        """Load a detector saved by :meth:`save` and attach it to ``victim``.

        Every file's SHA-256 is verified against the manifest. When ``check_victim`` is true and
        both the manifest and ``victim`` carry a weights SHA-256, they must match (a detector is
        fitted for one victim).
        """
        parts, manifest = load_artifact(directory, cls.KIND)
        cfg = manifest["config"]
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        detector = cls(**cls._params_from_manifest(dict(cfg["params"])), device=device)
        model = cls._new_reconstructor(cfg[f"{cls.PART}_config"])
        c, h, _ = cfg["image_shape"]
        aux = build_classifier(cfg["aux_arch"], c, h, cfg["num_classes"])
        try:
            model.load_state_dict(parts[cls.PART])
            aux.load_state_dict(parts["aux"])
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"{directory} has weights that do not fit its manifest: {exc}") from None
        device = resolve_device(device)
        detector._set_fitted(model.to(device).eval(), aux.to(device).eval(), victim, cfg["aux_arch"],
                             cfg["image_shape"], cfg["num_classes"])
        detector.victim_sha256_ = cfg.get("victim_weights_sha256")
        detector.threshold_ = cfg.get("threshold")
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        detector.term_stats_ = cfg.get("term_stats")  # absent from artifacts saved before the robust options
        detector.fit_seconds_ = cfg.get("fit_seconds")
        return detector
