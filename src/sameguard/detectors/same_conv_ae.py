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
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..models.autoencoder import ConvAEConfig, ConvAutoencoder
from ..validation import check_int, check_positive
from ._common import train_reconstructor
from .same_base import BatchTransform, ReconstructionDetector

logger = logging.getLogger(__name__)

__all__ = ["ConvAESAMEDetector", "CONV_AE_SAME_PRESETS"]


#: Named training budgets, mirroring :data:`sameguard.detectors.same.SAME_PRESETS`: ``paper``
#: gives the auto-encoder SAME's MAE budget (500 epochs) and the auxiliary model 80 epochs;
#: ``cpu`` fits Fashion-MNIST in minutes on two cores; ``tiny`` is for tests.
CONV_AE_SAME_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(ae_epochs=500, aux_epochs=80),
    "cpu": dict(ae_epochs=6, aux_epochs=3, max_train_samples=20000),
    "tiny": dict(ae_epochs=5, ae_batch_size=32, aux_epochs=2, aux_batch_size=32, width=16, latent_dim=32,
                 max_train_samples=2000),
}


class ConvAESAMEDetector(ReconstructionDetector):
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
        standardize, log_terms, complexity: SAME's robust score options (all off by default: the
            authors' score); see :class:`~sameguard.detectors.same_base.ReconstructionDetector`.

    Fitted state: ``ae_`` (also ``reconstructor_``), ``aux_``, ``victim_``, ``image_shape_``,
    ``num_classes_``, ``aux_arch_``; ``threshold_`` and ``term_stats_`` after ``calibrate``.
    """

    #: The manifest ``kind`` of a saved detector (see :class:`~sameguard.api.SaveableDetector`).
    KIND: ClassVar[str] = "same-conv-ae-detector"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = CONV_AE_SAME_PRESETS
    PART: ClassVar[str] = "ae"
    LABEL: ClassVar[str] = "Conv-AE SAME"

    def __init__(self, *, alpha: float = 0.99, latent_dim: int = 64, width: int = 32, ae_epochs: int = 500,
                 ae_lr: float = 1e-3, ae_batch_size: int = 128, aux_arch: str | None = None, aux_epochs: int = 80,
                 aux_lr: float = 0.1, aux_batch_size: int = 128, max_train_samples: int | None = None,
                 batch_size: int = 512, seed: int = 0, device: str | torch.device | None = "cpu",
                 progress: bool | None = None, standardize: bool = False, log_terms: bool = False,
                 complexity: str | None = None) -> None:
        self.latent_dim = latent_dim
        self.width = width
        self.ae_epochs = ae_epochs
        self.ae_lr = ae_lr
        self.ae_batch_size = ae_batch_size
        super().__init__(alpha=alpha, aux_arch=aux_arch, aux_epochs=aux_epochs, aux_lr=aux_lr,
                         aux_batch_size=aux_batch_size, max_train_samples=max_train_samples, batch_size=batch_size,
                         seed=seed, device=device, progress=progress, standardize=standardize,
                         log_terms=log_terms, complexity=complexity)

    def _check_params(self) -> None:
        for name in ("latent_dim", "width", "ae_epochs", "ae_batch_size"):
            check_int(getattr(self, name), name)
        check_positive(self.ae_lr, "ae_lr")

    @property
    def ae_(self) -> ConvAutoencoder | None:
        """The fitted auto-encoder ``G`` (``None`` before ``fit``)."""
        return self.reconstructor_

    def _reconstructor_config(self, channels: int, size: int) -> ConvAEConfig:
        return ConvAEConfig(image_size=size, in_channels=channels, width=self.width, latent_dim=self.latent_dim)

    @classmethod
    def _new_reconstructor(cls, config: ConvAEConfig | dict[str, Any]) -> ConvAutoencoder:
        return ConvAutoencoder(config if isinstance(config, ConvAEConfig) else ConvAEConfig(**config))

    def _train_reconstructor(self, model: nn.Module, images: torch.Tensor, device: torch.device) -> None:
        """Adam on the plain reconstruction loss ``mean((G(x) - x)^2)``."""
        logger.info("Conv-AE SAME: training the auto-encoder (%d parameters) on %d images for %d epochs",
                    model.num_parameters(), len(images), self.ae_epochs)
        train_reconstructor(model, images, lambda m, x, _g: F.mse_loss(m(x), x), epochs=self.ae_epochs,
                            lr=self.ae_lr, batch_size=self.ae_batch_size, seed=self.seed, device=device,
                            progress=self.progress, desc="Conv-AE SAME auto-encoder")

    def _aux_input(self, model: nn.Module) -> BatchTransform:
        return lambda x, _g: model.reconstruct(x)
