"""Untrained networks of the benchmark's architectures, for the timing scripts (``alarm_cost``,
``inference_options``): how long a forward pass takes does not depend on the weights."""

from __future__ import annotations

from typing import Any

import torch

from ..data.base import ImageDataset
from ..detectors import SAMEDetector
from ..models import build_classifier
from ..victim import Victim

__all__ = ["build_models"]


def build_models(*, preset: str = "cpu", victim_arch: str = "conv3", seed: int = 0,
                 fit_images: int = 64) -> tuple[Victim, Any]:
    """``(victim, detector)``: an untrained ``victim_arch`` victim on 28x28x1 images and a SAME detector
    with ``preset``'s architecture, fitted for one epoch on ``fit_images`` random images in ``[-1, 1]``
    and calibrated on half of them (threshold, and the term statistics of presets that standardise)."""
    torch.manual_seed(seed)
    classes = tuple(str(i) for i in range(10))
    victim = Victim(build_classifier(victim_arch, 1, 28, 10), arch=victim_arch, dataset="fashion-mnist",
                    image_shape=(1, 28, 28), classes=classes)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(fit_images, 1, 28, 28, generator=g) * 2 - 1
    data = ImageDataset("fashion-mnist", "train", x, torch.arange(fit_images) % 10, classes, False)
    detector = SAMEDetector.from_preset(preset, mae_epochs=1, mae_warmup_epochs=0, aux_epochs=1, seed=seed,
                                        progress=False).fit(victim, data)
    detector.calibrate(x[: max(2, fit_images // 2)], 0.05)
    return victim, detector
