"""Outlier Exposure (Hendrycks, Mazeika, Dietterich, ICLR 2019), the out-of-distribution detector
of Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020).

A copy of the victim is fine-tuned on the defender's data together with an outlier set, with
the OE loss::

    L = CE(f(x_in), y) + lambda * mean_{x_out} CE_uniform(f(x_out)),
    CE_uniform(z) = -(1/K) sum_k log softmax(z)_k = logsumexp(z) - mean_k z_k

which keeps the classifier accurate and makes it uncertain (near-uniform) on outliers; the
score is the negative maximum softmax probability of the fine-tuned model (see
:func:`sameguard.detectors.msp.msp_score`): larger = more suspicious.

Defaults are those of the reference fine-tuning script (``CIFAR/oe_tune.py``): ``lambda = 0.5``,
10 epochs, SGD lr 0.001 with Nesterov momentum 0.9, weight decay 5e-4, cosine schedule (per
step, down to 1e-6), 128 in-distribution and 256 outlier images per step, in and out images
in one forward pass, random-crop augmentation of both. Adaptive Misinformation's code trains
the served model with OE from the start (README: ``oe_lamb = 1``, 20 epochs, SGD 0.1) and
additionally trains a misinformation network, which is an *action* (not implemented here).
The outlier set is the caller's choice (the paper's: 80M Tiny Images; AM's: KMNIST for MNIST,
Indoor67 by default); say which.

Needs: outlier data (``"outlier-data"``), a change to the served model's training
(``"training-change"``: the OE-tuned copy should be the model the provider serves), white-box
access to the victim's weights to copy them (``"white-box"``) and the defender's labelled data
(``"defender-data"``).

Paper: https://arxiv.org/abs/1812.04606 (ICLR 2019); AM: https://arxiv.org/abs/1911.07100.
Reference implementations: https://github.com/hendrycks/outlier-exposure,
https://github.com/sanjaykariyappa/adaptive_misinformation.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..api import ArtifactError, Detector
from ..artifacts import load_artifact, save_artifact
from ..data.transforms import augment as augment_batch
from ..models import build_classifier
from ..training import predict_in_batches, resolve_device, show_progress
from ..validation import check_images, check_int, check_non_negative, check_optional_int, check_positive
from ._common import (ParamsMixin, check_victim_sha, images_of, labelled_images, subsample, victim_image_shape,
                      white_box_network)
from .msp import msp_score

if TYPE_CHECKING:
    from typing import Self

    from ..data import ImageDataset

logger = logging.getLogger(__name__)

__all__ = ["OutlierExposureDetector", "oe_loss", "uniform_cross_entropy"]


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``(N,)`` cross-entropy from the uniform distribution to ``softmax(logits)``: ``logsumexp(z) - mean_k z_k``.

    It is ``log K`` exactly when the logits are all equal (``>= log K`` always).
    """
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def oe_loss(logits_in: torch.Tensor, targets: torch.Tensor, logits_out: torch.Tensor, oe_weight: float) -> torch.Tensor:
    """The OE objective ``CE(logits_in, targets) + oe_weight * mean(uniform_cross_entropy(logits_out))`` (a scalar)."""
    return F.cross_entropy(logits_in, targets) + oe_weight * uniform_cross_entropy(logits_out).mean()


class OutlierExposureDetector(ParamsMixin, Detector):
    """Negative MSP of an OE-fine-tuned copy of the victim. Stateless; larger = more suspicious.

    Needs: ``"outlier-data"``, ``"training-change"``, ``"white-box"`` and ``"defender-data"``.

    Args:
        oe_weight: ``lambda``, weight of the outlier term (OE: 0.5; AM's code: 1).
        epochs: fine-tuning epochs (OE: 10); an epoch is one pass over the in-distribution data.
        lr: initial SGD learning rate (OE: 0.001), cosine-annealed per step to 1e-6.
        momentum: Nesterov momentum (0.9).
        weight_decay: L2 penalty (5e-4).
        batch_size: in-distribution images per step (128).
        outlier_batch_size: outlier images per step (256); the outlier set is cycled as needed.
        augment: random-crop augmentation (4-pixel padding; flips where the data allows) of
            in-distribution and outlier batches, as in the reference script.
        max_train_samples: fine-tune on at most this many in-distribution images (``None``: all).
        score_batch_size: scoring batch size.
        seed: fixes batch order, outlier order and augmentation.
        device: ``"cpu"``, ``"cuda"``, or ``None``/``"auto"``.
        progress: progress bars (``None``: when stderr is a terminal).

    Fitted state: ``model_`` (the fine-tuned copy; the victim is not modified), ``arch_``,
    ``image_shape_``, ``num_classes_``.
    """

    #: The manifest ``kind`` of a saved detector (see :class:`~sameguard.api.SaveableDetector`).
    KIND: ClassVar[str] = "outlier-exposure-detector"
    NEEDS: frozenset[str] = frozenset({"outlier-data", "training-change", "white-box", "defender-data"})

    def __init__(self, *, oe_weight: float = 0.5, epochs: int = 10, lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 128, outlier_batch_size: int = 256,
                 augment: bool = True, max_train_samples: int | None = None, score_batch_size: int = 512,
                 seed: int = 0, device: str | torch.device | None = "cpu", progress: bool | None = None) -> None:
        self.oe_weight = oe_weight
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.outlier_batch_size = outlier_batch_size
        self.augment = augment
        self.max_train_samples = max_train_samples
        self.score_batch_size = score_batch_size
        self.seed = seed
        self.device = device
        self.progress = progress
        check_non_negative(oe_weight, "oe_weight")
        check_positive(lr, "lr")
        check_non_negative(momentum, "momentum")
        check_non_negative(weight_decay, "weight_decay")
        for name in ("epochs", "batch_size", "outlier_batch_size", "score_batch_size"):
            check_int(getattr(self, name), name)
        check_int(seed, "seed", minimum=0)
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be True or False, got {augment!r}.")
        check_optional_int(max_train_samples, "max_train_samples", minimum=1)
        self.model_: nn.Module | None = None
        self.arch_: str | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.num_classes_: int | None = None
        self.victim_sha256_: str | None = None
        self.fit_seconds_: float | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None

    def is_fitted(self) -> bool:
        return self.model_ is not None

    def fit(self, victim: Any, train_data: ImageDataset, outlier_data: ImageDataset | torch.Tensor) -> Self:
        """Fine-tune a copy of ``victim``'s network with the OE loss.

        Args:
            victim: a :class:`~sameguard.victim.Victim` (its ``.model`` is copied, not changed).
            train_data: the defender's labelled images ``(N, C, H, W)`` in ``[-1, 1]``.
            outlier_data: outlier images of the victim's input shape (an ImageDataset or a
                tensor), e.g. an attacker proxy set adapted with :func:`sameguard.data.adapt_to`.
        """
        start = time.perf_counter()
        network = white_box_network(victim)
        images, labels, num_classes = labelled_images(train_data, "train_data")
        shape = victim_image_shape(victim) or tuple(images.shape[1:])
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"train_data images are {tuple(images.shape[1:])} but the victim takes {shape}.")
        outliers = images_of(outlier_data, "outlier_data", shape)
        keep = subsample(len(images), self.max_train_samples, self.seed)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        device = resolve_device(self.device)
        model = copy.deepcopy(network).to(device)
        for p in model.parameters():
            p.requires_grad_(True)
        self._fine_tune(model, images, labels, outliers, hflip=bool(getattr(train_data, "hflip", False)), device=device)
        self.model_ = model.eval()
        self.arch_ = getattr(victim, "arch", None)
        self.image_shape_ = shape
        self.num_classes_ = num_classes
        self.victim_sha256_ = getattr(victim, "weights_sha256", None)
        self.threshold_ = None
        self.calibration_fpr_ = None
        self.fit_seconds_ = time.perf_counter() - start
        logger.info("Outlier exposure: fine-tuned on %d images and %d outliers in %.1f s",
                    len(images), len(outliers), self.fit_seconds_)
        return self

    def _fine_tune(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, outliers: torch.Tensor, *,
                   hflip: bool, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay, nesterov=self.momentum > 0)
        steps_per_epoch = math.ceil(len(images) / self.batch_size)
        total = self.epochs * steps_per_epoch
        floor = 1e-6 / self.lr

        def factor(step: int) -> float:  # the reference's cosine annealing to 1e-6, per step
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * step / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        out_order = torch.randperm(len(outliers), generator=generator)
        out_pos = 0
        bar = tqdm(total=total, desc="OE fine-tuning", disable=not show_progress(self.progress), leave=False)
        model.train()
        for epoch in range(self.epochs):
            order = torch.randperm(len(images), generator=generator)
            loss_sum, seen = 0.0, 0
            for start in range(0, len(images), self.batch_size):
                idx = order[start:start + self.batch_size]
                out_idx = []
                while len(out_idx) < self.outlier_batch_size:  # cycle through the outliers
                    if out_pos == len(out_order):
                        out_order, out_pos = torch.randperm(len(outliers), generator=generator), 0
                    take = min(self.outlier_batch_size - len(out_idx), len(out_order) - out_pos)
                    out_idx.extend(out_order[out_pos:out_pos + take].tolist())
                    out_pos += take
                x_in, x_out = images[idx], outliers[out_idx]
                if self.augment:
                    x_in = augment_batch(x_in, generator, crop_padding=4, hflip=hflip)
                    x_out = augment_batch(x_out, generator, crop_padding=4, hflip=hflip)
                logits = model(torch.cat([x_in, x_out]).to(device))
                loss = oe_loss(logits[:len(idx)], labels[idx].to(device), logits[len(idx):], self.oe_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.4f}")
            logger.info("OE epoch %d/%d: loss %.4f", epoch + 1, self.epochs, loss_sum / seen)
        bar.close()

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` probabilities of the fine-tuned model on validated ``x`` ``(N, C, H, W)`` in ``[-1, 1]``."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        device = next(self.model_.parameters()).device
        return predict_in_batches(lambda b: torch.softmax(self.model_(b), dim=1), x, self.score_batch_size, device)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 ``-max_k p_k`` of the OE model; larger = more suspicious."""
        return msp_score(self.probabilities(x))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (the fine-tuned network) and ``manifest.json`` to ``directory``."""
        self._check_fitted()
        if self.arch_ is None:
            raise ArtifactError("Cannot save: the victim had no 'arch' name, so the fine-tuned network cannot be rebuilt.")
        config = {
            "params": self.get_params(),
            "arch": self.arch_,
            "image_shape": list(self.image_shape_),
            "num_classes": self.num_classes_,
            "normalisation": "x = 2 * pixel / 255 - 1, values in [-1, 1]",
            "threshold": self.threshold_,
            "calibration_fpr": self.calibration_fpr_,
            "victim_weights_sha256": self.victim_sha256_,
            "fit_seconds": self.fit_seconds_,
        }
        return save_artifact(directory, self.KIND, {"model": self.model_.state_dict()}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, victim: Any = None, *, check_victim: bool = True,
             device: str | torch.device | None = "cpu") -> OutlierExposureDetector:
        """Load a detector saved by :meth:`save` (hashes verified); ``victim`` is only checked, not used."""
        parts, manifest = load_artifact(directory, cls.KIND)
        cfg = manifest["config"]
        check_victim_sha(directory, victim, cfg.get("victim_weights_sha256"), check_victim)
        detector = cls(**cfg["params"], device=device)
        c, h, _ = cfg["image_shape"]
        model = build_classifier(cfg["arch"], c, h, cfg["num_classes"])
        try:
            model.load_state_dict(parts["model"])
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"{directory} has weights that do not fit its manifest: {exc}") from None
        detector.model_ = model.to(resolve_device(device)).eval()
        detector.arch_ = cfg["arch"]
        detector.image_shape_ = tuple(cfg["image_shape"])
        detector.num_classes_ = cfg["num_classes"]
        detector.victim_sha256_ = cfg.get("victim_weights_sha256")
        detector.threshold_ = cfg.get("threshold")
        detector.calibration_fpr_ = cfg.get("calibration_fpr")
        detector.fit_seconds_ = cfg.get("fit_seconds")
        return detector
