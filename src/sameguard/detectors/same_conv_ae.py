"""SAME ablation: a plain convolutional auto-encoder in place of the masked auto-encoder.

Everything is SAME's (Xie et al., AAAI 2024; see :mod:`sameguard.detectors.same`) except the
reconstruction model ``G``: a :class:`~sameguard.models.autoencoder.ConvAutoencoder` with a
``latent_dim`` bottleneck, trained on the defender's data with a plain reconstruction loss
``mean((G(x) - x)^2)`` (Adam). SAME trains its auxiliary classifier ``f_A`` on reconstructions
of **75 %-masked** images; a plain auto-encoder has no masking, so here ``f_A`` (the victim's
architecture, SAME's recipe: SGD 0.1, cosine, augmentation) is trained on the plain
reconstructions ``G(x)`` of the (augmented) training images with the true labels: the
auto-encoder's own information loss plays the role of the masking. Queries are scored with
SAME's formula, :func:`sameguard.detectors.same.same_score`::

    x_hat = G(x);  s1 = mean (x_hat - x)^2;  s2 = (1/K) KL(f_V(x) || softmax f_A(x_hat))
    score = alpha * s1 + (1 - alpha) * s2          (alpha = 0.99)

Larger = more suspicious. The other two ablations need no class: reconstruction only is
``SAMEDetector(alpha=1.0)`` and auxiliary deviation only is ``SAMEDetector(alpha=0.0)``.

Needs what SAME needs: the defender's training data (``"defender-data"``) and the victim's
output probabilities; no outlier data, no history, no change to the victim.

Paper: https://doi.org/10.1609/aaai.v38i18.29974 (arXiv 2312.10578), ablation of the MAE.
Reference implementation: https://github.com/xythink/SAME (its ``ml_models/__init__.py``
imports an ``autoencoder`` module that is not in the repository).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..api import ArtifactError, Detector
from ..artifacts import load_artifact, save_artifact
from ..models import build_classifier
from ..models.autoencoder import ConvAEConfig, ConvAutoencoder
from ..training import predict_in_batches, resolve_device, train_classifier
from ..validation import check_images
from ._common import (ParamsMixin, ProbabilityFn, check_int, check_positive, check_victim_sha, labelled_images,
                      subsample, train_reconstructor)
from .same import SAMEScores, reconstruction_scores

if TYPE_CHECKING:
    from typing import Self

    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["ConvAESAMEDetector", "CONV_AE_SAME_PRESETS"]

KIND = "same-conv-ae-detector"

#: Named training budgets, mirroring :data:`sameguard.detectors.same.SAME_PRESETS`: ``paper``
#: gives the auto-encoder SAME's MAE budget (500 epochs) and the auxiliary model 80 epochs;
#: ``cpu`` fits Fashion-MNIST in minutes on two cores; ``tiny`` is for tests.
CONV_AE_SAME_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(ae_epochs=500, aux_epochs=80),
    "cpu": dict(ae_epochs=6, aux_epochs=3, max_train_samples=20000),
    "tiny": dict(ae_epochs=5, ae_batch_size=32, aux_epochs=2, aux_batch_size=32, width=16, latent_dim=32,
                 max_train_samples=2000),
}


class ConvAESAMEDetector(ParamsMixin, Detector):
    """SAME with a plain convolutional auto-encoder (the MAE ablation). Larger = more suspicious.

    Needs: ``"defender-data"`` (as SAME): the victim is used only through its probabilities.

    Args:
        alpha: weight of the reconstruction term (SAME's driver: 0.99).
        latent_dim: auto-encoder bottleneck size.
        width: channels of the auto-encoder's first convolution.
        ae_epochs: auto-encoder epochs (default: SAME's MAE budget, 500).
        ae_lr: Adam learning rate of the auto-encoder.
        ae_batch_size: auto-encoder batch size.
        aux_arch: auxiliary classifier architecture (``None``: the victim's ``arch``).
        aux_epochs, aux_lr, aux_batch_size: SAME's auxiliary recipe (80 epochs, SGD 0.1, 128).
        max_train_samples: train on a random subset of at most this many images (``None``: all).
        batch_size: scoring batch size.
        seed: fixes initialisation, data order and augmentation.
        device: ``"cpu"``, ``"cuda"``, or ``None``/``"auto"``.
        progress: progress bars (``None``: when stderr is a terminal).

    Fitted state: ``ae_``, ``aux_``, ``victim_``, ``image_shape_``, ``num_classes_``, ``aux_arch_``.
    """

    #: The manifest ``kind`` of a saved detector (see :class:`~sameguard.api.SaveableDetector`).
    KIND: ClassVar[str] = KIND
    NEEDS: frozenset[str] = frozenset({"defender-data"})
    #: Hyper-parameters used only when scoring: changing them needs no refit.
    SCORING_ONLY_PARAMS: tuple[str, ...] = ("alpha", "batch_size")

    def __init__(self, *, alpha: float = 0.99, latent_dim: int = 64, width: int = 32, ae_epochs: int = 500,
                 ae_lr: float = 1e-3, ae_batch_size: int = 128, aux_arch: str | None = None, aux_epochs: int = 80,
                 aux_lr: float = 0.1, aux_batch_size: int = 128, max_train_samples: int | None = None,
                 batch_size: int = 512, seed: int = 0, device: str | torch.device | None = "cpu",
                 progress: bool | None = None) -> None:
        self.alpha = alpha
        self.latent_dim = latent_dim
        self.width = width
        self.ae_epochs = ae_epochs
        self.ae_lr = ae_lr
        self.ae_batch_size = ae_batch_size
        self.aux_arch = aux_arch
        self.aux_epochs = aux_epochs
        self.aux_lr = aux_lr
        self.aux_batch_size = aux_batch_size
        self.max_train_samples = max_train_samples
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.progress = progress
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
        for name in ("latent_dim", "width", "ae_epochs", "ae_batch_size", "aux_epochs", "aux_batch_size", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("seed", seed, minimum=0)
        check_positive("ae_lr", ae_lr)
        check_positive("aux_lr", aux_lr)
        if max_train_samples is not None:
            check_int("max_train_samples", max_train_samples)
        if aux_arch is not None and not isinstance(aux_arch, str):
            raise ValueError(f"aux_arch must be an architecture name or None, got {aux_arch!r}.")
        self.ae_: ConvAutoencoder | None = None
        self.aux_: nn.Module | None = None
        self.victim_: ProbabilityFn | None = None
        self.victim_sha256_: str | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.num_classes_: int | None = None
        self.aux_arch_: str | None = None
        self.fit_seconds_: float | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ConvAESAMEDetector:
        """A detector with a named training budget from :data:`CONV_AE_SAME_PRESETS` plus ``overrides``."""
        if preset not in CONV_AE_SAME_PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(CONV_AE_SAME_PRESETS)}.")
        return cls(**(CONV_AE_SAME_PRESETS[preset] | overrides))

    def is_fitted(self) -> bool:
        return self.ae_ is not None and self.aux_ is not None and self.victim_ is not None

    def fit(self, victim: ProbabilityFn, train_data: ImageDataset) -> Self:
        """Train the auto-encoder on ``train_data``, then the auxiliary model on its reconstructions.

        Args:
            victim: the black-box victim ``images -> probabilities`` (e.g. a :class:`~sameguard.victim.Victim`).
            train_data: the defender's labelled images ``(N, C, H, W)`` in ``[-1, 1]``.
        """
        start = time.perf_counter()
        if not callable(victim):
            raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
        images, labels, num_classes = labelled_images(train_data, "train_data")
        keep = subsample(len(images), self.max_train_samples, self.seed)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        c, h, w = images.shape[1:]
        if h != w:
            raise ValueError(f"The auto-encoder needs square images, got {h}x{w}.")
        aux_arch = self.aux_arch or getattr(victim, "arch", None)
        if aux_arch is None:
            raise ValueError("aux_arch is None and the victim has no 'arch' attribute: name the auxiliary "
                             "classifier's architecture (SAME uses the victim's).")
        device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        ae = ConvAutoencoder(ConvAEConfig(image_size=h, in_channels=c, width=self.width, latent_dim=self.latent_dim))
        logger.info("Conv-AE SAME: training the auto-encoder (%d parameters) on %d images for %d epochs",
                    ae.num_parameters(), len(images), self.ae_epochs)
        train_reconstructor(ae, images, lambda model, x, _g: F.mse_loss(model(x), x), epochs=self.ae_epochs,
                            lr=self.ae_lr, batch_size=self.ae_batch_size, seed=self.seed, device=device,
                            progress=self.progress, desc="Conv-AE SAME auto-encoder")
        torch.manual_seed(self.seed + 1)
        aux = build_classifier(aux_arch, c, h, num_classes)
        logger.info("Conv-AE SAME: training the auxiliary %s on reconstructions for %d epochs", aux_arch, self.aux_epochs)
        train_classifier(aux, images, labels, epochs=self.aux_epochs, batch_size=self.aux_batch_size, lr=self.aux_lr,
                         augment=True, hflip=bool(getattr(train_data, "hflip", False)),
                         input_transform=lambda x, _g: ae.reconstruct(x), seed=self.seed + 2, device=device,
                         progress=self.progress, desc="Conv-AE SAME auxiliary")
        self.ae_, self.aux_, self.victim_ = ae.eval(), aux.eval(), victim
        self.victim_sha256_ = getattr(victim, "weights_sha256", None)
        self.image_shape_ = (c, h, w)
        self.num_classes_ = num_classes
        self.aux_arch_ = aux_arch
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.fit_seconds_ = time.perf_counter() - start
        logger.info("Conv-AE SAME fitted in %.1f s", self.fit_seconds_)
        return self

    def _device(self) -> torch.device:
        return next(self.ae_.parameters()).device

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` reconstructions ``G(x)`` of validated queries."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return predict_in_batches(self.ae_.reconstruct, x, self.batch_size, self._device())

    def score_components(self, x: torch.Tensor) -> SAMEScores:
        """``score``, ``s1`` and ``s2`` of each query in ``x`` (``(N, C, H, W)`` in ``[-1, 1]``)."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return reconstruction_scores(x, victim=self.victim_, reconstruct=self.ae_.reconstruct, aux=self.aux_,
                                              alpha=self.alpha, num_classes=self.num_classes_,
                                              batch_size=self.batch_size, device=self._device())

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 SAME scores with the conv auto-encoder; larger = more suspicious."""
        return self.score_components(x).score

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``ae.safetensors``, ``aux.safetensors`` and ``manifest.json`` to ``directory``."""
        self._check_fitted()
        config = {
            "params": self.get_params(),
            "ae_config": self.ae_.config.to_dict(),
            "aux_arch": self.aux_arch_,
            "image_shape": list(self.image_shape_),
            "num_classes": self.num_classes_,
            "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]",
            "threshold": self.threshold_,
            "calibration_fpr": self.calibration_fpr_,
            "victim_weights_sha256": self.victim_sha256_,
            "fit_seconds": self.fit_seconds_,
        }
        return save_artifact(directory, KIND, {"ae": self.ae_.state_dict(), "aux": self.aux_.state_dict()}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: ProbabilityFn, *, check_victim: bool = True,
             device: str | torch.device | None = "cpu") -> ConvAESAMEDetector:
        """Load a detector saved by :meth:`save` and attach it to ``victim`` (hashes verified)."""
        parts, manifest = load_artifact(directory, KIND)
        cfg = manifest["config"]
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        detector = cls(**cfg["params"], device=device)
        ae = ConvAutoencoder(ConvAEConfig(**cfg["ae_config"]))
        c, h, _ = cfg["image_shape"]
        aux = build_classifier(cfg["aux_arch"], c, h, cfg["num_classes"])
        try:
            ae.load_state_dict(parts["ae"])
            aux.load_state_dict(parts["aux"])
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"{directory} has weights that do not fit its manifest: {exc}") from None
        device = resolve_device(device)
        detector.ae_, detector.aux_ = ae.to(device).eval(), aux.to(device).eval()
        detector.victim_ = victim
        detector.victim_sha256_ = cfg.get("victim_weights_sha256")
        detector.image_shape_ = tuple(cfg["image_shape"])
        detector.num_classes_ = cfg["num_classes"]
        detector.aux_arch_ = cfg["aux_arch"]
        detector.threshold_ = cfg.get("threshold")
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        detector.fit_seconds_ = cfg.get("fit_seconds")
        return detector
