"""SAME: Sample Reconstruction against Model Extraction Attacks (Xie et al., AAAI 2024).

A masked auto-encoder ``G`` is trained on the defender's own training data; an auxiliary
classifier ``f_A`` (same architecture as the victim) is trained on ``G``'s reconstructions of
75 %-masked training images with the true labels. A query ``x`` is then scored by

* ``s1 = mean over pixels of (x_hat - x)^2`` with ``x_hat = G(x, mask_ratio=0)``;
* ``s2 = (1/K) * KL(p || q) = (1/K) * sum_k p_k * log(p_k / q_k)`` with ``p = f_V(x)`` the victim's
  output probabilities on the query and ``q = softmax f_A(x_hat)`` the auxiliary model's on the
  reconstruction (the authors' direction, victim first, and their averaging over the ``K``
  classes: ``nn.KLDivLoss(reduction='none')`` followed by a mean);
* ``score = alpha * s1 + (1 - alpha) * s2`` with ``alpha = 0.99`` as in the authors' driver.

Larger scores are more suspicious. The victim is used only through its output probabilities,
no outlier data and no query history are needed, and the victim is not changed.

Paper: https://doi.org/10.1609/aaai.v38i18.29974 (arXiv 2312.10578).
Reference implementation: https://github.com/xythink/SAME (``ms_defense/SAME_defender.py``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..api import ArtifactError, Detector
from ..artifacts import load_artifact, save_artifact
from ..models import MAEConfig, MaskedAutoencoder, build_classifier, mae_config
from ..training import predict_in_batches, resolve_device, show_progress, train_classifier
from ..validation import check_images
from ._common import check_victim_sha

if TYPE_CHECKING:
    from typing import Self

    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["SAMEDetector", "SAMEScores", "same_score", "reconstruction_scores", "SAME_PRESETS"]

KIND = "same-detector"

#: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``: the black-box victim.
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SAMEScores:
    """Per-query scores, each ``(N,)`` float32: the total and its two terms."""

    score: torch.Tensor
    s1: torch.Tensor  # reconstruction MSE, >= 0
    s2: torch.Tensor  # KL(victim || auxiliary) / K, >= 0


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
    p = p_victim.to(torch.float64)
    log_q = torch.log(p_aux.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
    s2 = (torch.xlogy(p, p) - p * log_q).mean(1).clamp_min(0.0)
    s1, s2 = s1.to(torch.float32), s2.to(torch.float32)
    return SAMEScores(score=alpha * s1 + (1.0 - alpha) * s2, s1=s1, s2=s2)



def reconstruction_scores(x: torch.Tensor, *, victim: ProbabilityFn, reconstruct: Callable[[torch.Tensor], torch.Tensor],
                          aux: torch.nn.Module, alpha: float, num_classes: int, batch_size: int,
                          device: torch.device) -> SAMEScores:
    """SAME's scoring loop for any reconstruction model (shared by the MAE and the conv-AE ablation).

    Args:
        x: validated queries ``(N, C, H, W)`` in ``[-1, 1]`` on the CPU.
        victim: black box, ``images -> probabilities (N, K)``.
        reconstruct: ``images -> reconstructions`` of the same shape, on ``device``.
        aux: the auxiliary classifier (logits), on ``device``.
    """
    parts: list[SAMEScores] = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            batch = x[i:i + batch_size]
            p_victim = torch.as_tensor(victim(batch)).detach().cpu().float()
            if p_victim.shape != (len(batch), num_classes):
                raise ValueError(f"The victim returned shape {tuple(p_victim.shape)}; expected probabilities "
                                 f"of shape ({len(batch)}, {num_classes}).")
            x_hat = reconstruct(batch.to(device))
            p_aux = torch.softmax(aux(x_hat), dim=1).cpu()
            parts.append(same_score(batch, x_hat.cpu(), p_victim, p_aux, alpha))
    return SAMEScores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("score", "s1", "s2")))

#: Named training budgets. ``paper`` is the authors' (MAE: 500 epochs, patch 2, dim 192,
#: depth 12/4; auxiliary: 80 epochs); ``cpu`` fits Fashion-MNIST in minutes on two cores;
#: ``tiny`` is for tests.
SAME_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(mae="paper", mae_epochs=500, mae_warmup_epochs=50, aux_epochs=80),
    "cpu": dict(mae="small", mae_epochs=6, mae_warmup_epochs=1, mae_lr=2e-3, aux_epochs=3, max_train_samples=20000),
    "tiny": dict(mae="tiny", mae_epochs=3, mae_warmup_epochs=0.5, mae_lr=3e-3, aux_epochs=2, max_train_samples=2000),
}


class SAMEDetector(Detector):
    """The SAME detector. Fitted state: ``mae_``, ``aux_``, ``victim_``; larger score = more suspicious.

    Every hyper-parameter defaults to the authors' value (xythink/SAME, ``evaluate_main.py`` and
    ``SAME_Defender``) unless said otherwise; :meth:`from_preset` gives smaller budgets.

    Args:
        mae: an MAE preset name (``"paper"``, ``"small"``, ``"tiny"``) or an :class:`MAEConfig`;
            a preset is sized to the training images at ``fit``.
        alpha: weight of the reconstruction term, in ``[0, 1]`` (authors' driver: 0.99).
        mae_epochs: MAE training epochs (authors: 500).
        mae_lr: AdamW learning rate (authors: 0.01, hard-coded), betas (0.9, 0.95).
        mae_weight_decay: AdamW weight decay (authors: 0.05).
        mae_warmup_epochs: linear warm-up before the cosine decay (authors: 50); may be fractional.
        mae_batch_size: MAE batch size (authors: 128).
        mae_mask_ratio: fraction of patches hidden while training the MAE (authors: 0.75).
        mae_loss: ``"all"`` (authors: MSE over every pixel divided by the mask ratio) or
            ``"masked"`` (standard MAE: MSE over hidden pixels only).
        aux_arch: architecture of the auxiliary classifier; ``None`` takes the victim's ``arch``
            (the authors use the victim's architecture).
        aux_epochs: auxiliary training epochs (authors: 80), SGD lr ``aux_lr`` (0.1), momentum 0.9,
            weight decay 5e-4, cosine schedule, batch ``aux_batch_size`` (128), augmentation on.
        aux_mask_ratio: mask ratio of the reconstructions the auxiliary model is trained on
            (authors: 0.75; scoring always reconstructs with ratio 0).
        max_train_samples: train on a random subset of at most this many images (``None``: all).
        batch_size: scoring batch size.
        seed: fixes initialisation, data order, masks and augmentation.
        device: ``"cpu"``, ``"cuda"``, or ``None``/``"auto"`` for CUDA when available.
        progress: progress bars (``None``: when stderr is a terminal).
    """

    #: What SAME needs beyond black-box probabilities: the provider's own training data.
    #: The manifest ``kind`` of a saved detector (see :class:`~sameguard.api.SaveableDetector`).
    KIND: ClassVar[str] = KIND
    NEEDS: frozenset[str] = frozenset({"defender-data"})
    #: Hyper-parameters used only when scoring: changing them needs no refit.
    SCORING_ONLY_PARAMS: tuple[str, ...] = ("alpha", "batch_size")

    def __init__(
        self,
        *,
        mae: str | MAEConfig = "paper",
        alpha: float = 0.99,
        mae_epochs: int = 500,
        mae_lr: float = 0.01,
        mae_weight_decay: float = 0.05,
        mae_warmup_epochs: float = 50,
        mae_batch_size: int = 128,
        mae_mask_ratio: float = 0.75,
        mae_loss: str = "all",
        aux_arch: str | None = None,
        aux_epochs: int = 80,
        aux_lr: float = 0.1,
        aux_batch_size: int = 128,
        aux_mask_ratio: float = 0.75,
        max_train_samples: int | None = None,
        batch_size: int = 512,
        seed: int = 0,
        device: str | torch.device | None = "cpu",
        progress: bool | None = None,
    ) -> None:
        self.mae = mae
        self.alpha = alpha
        self.mae_epochs = mae_epochs
        self.mae_lr = mae_lr
        self.mae_weight_decay = mae_weight_decay
        self.mae_warmup_epochs = mae_warmup_epochs
        self.mae_batch_size = mae_batch_size
        self.mae_mask_ratio = mae_mask_ratio
        self.mae_loss = mae_loss
        self.aux_arch = aux_arch
        self.aux_epochs = aux_epochs
        self.aux_lr = aux_lr
        self.aux_batch_size = aux_batch_size
        self.aux_mask_ratio = aux_mask_ratio
        self.max_train_samples = max_train_samples
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.progress = progress
        self._check_params()
        self.mae_: MaskedAutoencoder | None = None
        self.aux_: torch.nn.Module | None = None
        self.victim_: ProbabilityFn | None = None
        self.victim_sha256_: str | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.num_classes_: int | None = None
        self.aux_arch_: str | None = None
        self.fit_seconds_: float | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None

    # ------------------------------------------------------------------ parameters
    _HYPER = ("alpha", "mae_epochs", "mae_lr", "mae_weight_decay", "mae_warmup_epochs", "mae_batch_size",
              "mae_mask_ratio", "mae_loss", "aux_arch", "aux_epochs", "aux_lr", "aux_batch_size",
              "aux_mask_ratio", "max_train_samples", "batch_size", "seed")

    def _check_params(self) -> None:
        if not isinstance(self.mae, (str, MAEConfig)):
            raise ValueError(f"mae must be a preset name or an MAEConfig, got {type(self.mae).__name__}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        for name in ("mae_epochs", "aux_epochs", "mae_batch_size", "aux_batch_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("mae_lr", "aux_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.mae_weight_decay < 0 or self.mae_warmup_epochs < 0:
            raise ValueError("mae_weight_decay and mae_warmup_epochs must be non-negative.")
        for name in ("mae_mask_ratio", "aux_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if self.mae_loss not in ("all", "masked"):
            raise ValueError(f"mae_loss must be 'all' (the authors') or 'masked', got {self.mae_loss!r}.")
        if self.mae_loss == "masked" and self.mae_mask_ratio == 0:
            raise ValueError("mae_loss='masked' needs mae_mask_ratio > 0: with no hidden pixels there is nothing to learn.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be a positive integer or None, got {self.max_train_samples!r}.")

    def get_params(self) -> dict[str, Any]:
        """The constructor's hyper-parameters (JSON-serialisable)."""
        params = {name: getattr(self, name) for name in self._HYPER}
        params["mae"] = self.mae if isinstance(self.mae, str) else self.mae.to_dict()
        return params

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> SAMEDetector:
        """A detector with a named training budget from :data:`SAME_PRESETS` plus ``overrides``."""
        if preset not in SAME_PRESETS:
            raise ValueError(f"Unknown SAME preset {preset!r}; choose one of {sorted(SAME_PRESETS)}.")
        return cls(**(SAME_PRESETS[preset] | overrides))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != _DEFAULTS.get(k)}
        return f"SAMEDetector({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def is_fitted(self) -> bool:
        return self.mae_ is not None and self.aux_ is not None and self.victim_ is not None

    # ------------------------------------------------------------------ fitting
    def fit(self, victim: ProbabilityFn, train_data: ImageDataset) -> Self:
        """Train the MAE on ``train_data``, then the auxiliary model on its reconstructions.

        Args:
            victim: the black-box victim: ``images (N, C, H, W) -> probabilities (N, K)`` (e.g. a
                :class:`~sameguard.victim.Victim`). Only its outputs are used, at scoring time.
            train_data: the defender's training data (an :class:`~sameguard.data.ImageDataset`,
                images ``(N, C, H, W)`` in ``[-1, 1]`` and labels ``(N,)``), normally the victim's.
        """
        start = time.perf_counter()
        device = resolve_device(self.device)
        images = check_images(train_data.images, name="train_data.images")
        labels = torch.as_tensor(train_data.labels, dtype=torch.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"train_data.labels must have shape ({len(images)},), got {tuple(labels.shape)}.")
        if self.max_train_samples is not None and len(images) > self.max_train_samples:
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))[: self.max_train_samples]
            images, labels = images[keep], labels[keep]
        c, h, w = images.shape[1:]
        if h != w:
            raise ValueError(f"SAME's MAE needs square images, got {h}x{w}.")
        num_classes = int(getattr(train_data, "num_classes", int(labels.max()) + 1))
        aux_arch = self.aux_arch or getattr(victim, "arch", None)
        if aux_arch is None:
            raise ValueError("aux_arch is None and the victim has no 'arch' attribute: name the auxiliary "
                             "classifier's architecture (SAME uses the victim's).")
        config = self.mae if isinstance(self.mae, MAEConfig) else mae_config(self.mae, h, c, mask_ratio=self.mae_mask_ratio)
        if (config.image_size, config.in_channels) != (h, c):
            raise ValueError(f"The MAE config is for {config.in_channels}x{config.image_size}x{config.image_size} "
                             f"images but the training images are {c}x{h}x{w}.")

        torch.manual_seed(self.seed)
        mae = MaskedAutoencoder(config).to(device)
        logger.info("SAME: training the MAE (%d parameters) on %d images for %d epochs",
                    mae.num_parameters(), len(images), self.mae_epochs)
        self._train_mae(mae, images, device)

        torch.manual_seed(self.seed + 1)
        aux = build_classifier(aux_arch, c, h, num_classes)
        mask_ratio = self.aux_mask_ratio

        def reconstruct_masked(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return mae(x, mask_ratio=mask_ratio, generator=generator)[0]

        logger.info("SAME: training the auxiliary %s on reconstructions (mask ratio %.2f) for %d epochs",
                    aux_arch, mask_ratio, self.aux_epochs)
        train_classifier(aux, images, labels, epochs=self.aux_epochs, batch_size=self.aux_batch_size, lr=self.aux_lr,
                         augment=True, hflip=bool(getattr(train_data, "hflip", False)),
                         input_transform=reconstruct_masked, seed=self.seed + 2, device=device,
                         progress=self.progress, desc="SAME auxiliary")
        self.mae_, self.aux_, self.victim_ = mae.eval(), aux.eval(), victim
        self.victim_sha256_ = getattr(victim, "weights_sha256", None)
        self.image_shape_ = (c, h, w)
        self.num_classes_ = num_classes
        self.aux_arch_ = aux_arch
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.fit_seconds_ = time.perf_counter() - start
        logger.info("SAME fitted in %.1f s", self.fit_seconds_)
        return self

    def _train_mae(self, mae: MaskedAutoencoder, images: torch.Tensor, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        mask_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(self.seed)
        optimizer = torch.optim.AdamW(mae.parameters(), lr=self.mae_lr, betas=(0.9, 0.95), weight_decay=self.mae_weight_decay)
        steps_per_epoch = (len(images) + self.mae_batch_size - 1) // self.mae_batch_size
        total = self.mae_epochs * steps_per_epoch
        warmup = max(1.0, self.mae_warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:  # the authors' warm-up + cosine, per step instead of per epoch
            return min((step + 1) / warmup, 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * step / total)).item()))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        ratio = self.mae_mask_ratio
        bar = tqdm(total=total, desc="SAME MAE", disable=not show_progress(self.progress), leave=False)
        mae.train()
        for epoch in range(self.mae_epochs):
            order = torch.randperm(len(images), generator=generator)
            loss_sum = 0.0
            for start in range(0, len(images), self.mae_batch_size):
                x = images[order[start:start + self.mae_batch_size]].to(device)
                x_hat, mask = mae(x, mask_ratio=ratio, generator=mask_generator)
                if self.mae_loss == "all":
                    loss = F.mse_loss(x_hat, x) / max(ratio, 1e-12) if ratio > 0 else F.mse_loss(x_hat, x)
                else:
                    loss = (((x_hat - x) ** 2) * mask).mean() / ratio
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(x)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            logger.info("SAME MAE epoch %d/%d: loss %.5f", epoch + 1, self.mae_epochs, loss_sum / len(images))
        bar.close()
        mae.eval()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` reconstructions ``G(x, mask_ratio=0)`` of validated queries."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return predict_in_batches(self.mae_.reconstruct, x, self.batch_size, self._model_device())

    @torch.no_grad()
    def score_components(self, x: torch.Tensor) -> SAMEScores:
        """``score``, ``s1`` and ``s2`` of each query in ``x`` (``(N, C, H, W)`` in ``[-1, 1]``)."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return reconstruction_scores(x, victim=self.victim_, reconstruct=self.mae_.reconstruct, aux=self.aux_,
                                     alpha=self.alpha, num_classes=self.num_classes_, batch_size=self.batch_size,
                                     device=self._model_device())

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 SAME scores, larger = more suspicious."""
        return self.score_components(x).score

    def _model_device(self) -> torch.device:
        return next(self.mae_.parameters()).device

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``mae.safetensors``, ``aux.safetensors`` and ``manifest.json`` (with threshold,
        hyper-parameters, normalisation and the victim's weights SHA-256) to ``directory``."""
        self._check_fitted()
        config = {
            "params": self.get_params(),
            "mae_config": self.mae_.config.to_dict(),
            "aux_arch": self.aux_arch_,
            "image_shape": list(self.image_shape_),
            "num_classes": self.num_classes_,
            "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]",
            "threshold": self.threshold_,
            "calibration_fpr": self.calibration_fpr_,
            "victim_weights_sha256": self.victim_sha256_,
            "fit_seconds": self.fit_seconds_,
        }
        return save_artifact(directory, KIND, {"mae": self.mae_.state_dict(), "aux": self.aux_.state_dict()}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: ProbabilityFn, *, check_victim: bool = True,
             device: str | torch.device | None = "cpu") -> SAMEDetector:
        """Load a detector saved by :meth:`save` and attach it to ``victim``.

        Every file's SHA-256 is verified against the manifest. When ``check_victim`` is true and
        both the manifest and ``victim`` carry a weights SHA-256, they must match (a detector is
        fitted for one victim).
        """
        parts, manifest = load_artifact(directory, KIND)
        cfg = manifest["config"]
        params = dict(cfg["params"])
        mae_cfg = MAEConfig(**cfg["mae_config"])
        params["mae"] = params["mae"] if isinstance(params["mae"], str) else mae_cfg
        detector = cls(**params, device=device)
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        device = resolve_device(device)
        mae = MaskedAutoencoder(mae_cfg)
        c, h, _ = cfg["image_shape"]
        aux = build_classifier(cfg["aux_arch"], c, h, cfg["num_classes"])
        try:
            mae.load_state_dict(parts["mae"])
            aux.load_state_dict(parts["aux"])
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"{directory} has weights that do not fit its manifest: {exc}") from None
        detector.mae_, detector.aux_ = mae.to(device).eval(), aux.to(device).eval()
        detector.victim_ = victim
        detector.victim_sha256_ = cfg.get("victim_weights_sha256")
        detector.image_shape_ = tuple(cfg["image_shape"])
        detector.num_classes_ = cfg["num_classes"]
        detector.aux_arch_ = cfg["aux_arch"]
        detector.threshold_ = cfg.get("threshold")
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        detector.fit_seconds_ = cfg.get("fit_seconds")
        return detector


_DEFAULTS = {k: v for k, v in SAMEDetector.__init__.__kwdefaults__.items()}  # for __repr__
