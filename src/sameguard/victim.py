"""The victim: the provider's classifier, served as a black box that returns probabilities."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import load_artifact, save_artifact, state_dict_sha256
from .forward_memo import memoized, no_grad
from .models import build_classifier
from .training import accuracy, predict_in_batches, resolve_device, train_classifier
from .validation import check_images

logger = logging.getLogger(__name__)

__all__ = ["Victim", "train_victim"]

KIND = "victim"
#: The input convention every victim is trained and served with (recorded in its manifest).
NORMALISATION = "x = 2 * pixel / 255 - 1, values in [-1, 1]"


class Victim:
    """A classifier with the metadata needed to serve, attack and defend it.

    ``victim(x)`` (or :meth:`predict_proba`) is the black-box interface: images ``(N, C, H, W)``
    in ``[-1, 1]`` in, probabilities ``(N, K)`` out. SAME and the attacks only use that;
    :meth:`logits` and :attr:`model` are there for white-box baselines and for training.

    Args:
        model: a network returning logits (see :mod:`sameguard.models`).
        arch: its architecture name in :data:`sameguard.models.CLASSIFIERS`.
        dataset: the name of the data it was trained on.
        image_shape: ``(C, H, W)`` of its inputs.
        classes: class names, ``K`` of them.
        test_accuracy: measured accuracy on the dataset's test split, if known.
        training: how it was trained (epochs, batch size, learning rate, momentum, weight decay,
            schedule, augmentation, seed, training images), when known; saved in the manifest.
    """

    def __init__(self, model: nn.Module, *, arch: str, dataset: str, image_shape: Sequence[int],
                 classes: Sequence[str], test_accuracy: float | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 512,
                 training: dict[str, Any] | None = None) -> None:
        self.model = model.to(device).eval()
        self.arch = arch
        self.dataset = dataset
        self.image_shape = tuple(int(s) for s in image_shape)
        self.classes = tuple(classes)
        self.test_accuracy = test_accuracy
        self.training = None if training is None else dict(training)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights (names, shapes and values); ties a detector to its victim."""
        return state_dict_sha256(self.model.state_dict())

    @no_grad
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """White-box access: ``(N, K)`` logits of validated images ``(N, C, H, W)`` in ``[-1, 1]``."""
        x = check_images(x, self.image_shape)
        # Computed once per batch within a guarded request (the guard and its scorers share it).
        return memoized((self.model, self.batch_size, str(self.device)), x,
                        lambda: predict_in_batches(self.model, x, self.batch_size, self.device))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Black-box access: ``(N, K)`` class probabilities (softmax of the logits)."""
        return torch.softmax(self.logits(x), dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 top-1 labels."""
        return self.logits(x).argmax(dim=1)

    __call__ = predict_proba

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "dataset": self.dataset,
            "image_shape": list(self.image_shape),
            "classes": list(self.classes),
            "test_accuracy": self.test_accuracy,
            "normalisation": NORMALISATION,
            "training": self.training,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``manifest.json`` to ``directory``."""
        config = self.describe() | {"weights_sha256": self.weights_sha256}
        return save_artifact(directory, KIND, {"model": self.model.state_dict()}, config)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Victim:
        """Load a victim saved by :meth:`save`, verifying every file's SHA-256."""
        parts, manifest = load_artifact(directory, KIND)
        cfg = manifest["config"]
        c, h, _ = cfg["image_shape"]
        model = build_classifier(cfg["arch"], c, h, len(cfg["classes"]))
        model.load_state_dict(parts["model"])
        return cls(model, arch=cfg["arch"], dataset=cfg["dataset"], image_shape=cfg["image_shape"],
                   classes=cfg["classes"], test_accuracy=cfg.get("test_accuracy"), device=device,
                   training=cfg.get("training"))

    def __repr__(self) -> str:
        acc = "?" if self.test_accuracy is None else f"{self.test_accuracy:.4f}"
        return f"Victim(arch={self.arch!r}, dataset={self.dataset!r}, image_shape={self.image_shape}, test_accuracy={acc})"


def train_victim(train, test=None, *, arch: str = "conv3", epochs: int = 20, batch_size: int = 128,
                 lr: float = 0.1, seed: int = 0, device: str | torch.device | None = "cpu",
                 progress: bool | None = None) -> Victim:
    """Train a victim classifier on an :class:`~sameguard.data.ImageDataset` with the authors' recipe.

    SGD (lr 0.1, momentum 0.9, weight decay 5e-4), cosine schedule, batch 128, random-crop
    augmentation (plus flips where the dataset allows them); the authors' driver uses 20 epochs.
    ``test``, when given, is used only to measure :attr:`Victim.test_accuracy`.
    """
    device = resolve_device(device)
    torch.manual_seed(seed)
    c, h, _ = train.image_shape
    model = build_classifier(arch, c, h, train.num_classes)
    train_classifier(model, train.images, train.labels, epochs=epochs, batch_size=batch_size, lr=lr,
                     augment=True, hflip=train.hflip, seed=seed, device=device, progress=progress,
                     desc=f"victim {arch}")
    training = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": 0.9, "weight_decay": 5e-4,
                "schedule": "cosine", "augment": "random crop (4-pixel padding)" + (", horizontal flip" if train.hflip else ""),
                "seed": seed, "train_images": len(train)}
    victim = Victim(model, arch=arch, dataset=train.name, image_shape=train.image_shape,
                    classes=train.classes, device=device, training=training)
    if test is not None:
        victim.test_accuracy = accuracy(victim, test.images, test.labels)
        logger.info("Victim %s on %s: test accuracy %.4f", arch, train.name, victim.test_accuracy)
    return victim
