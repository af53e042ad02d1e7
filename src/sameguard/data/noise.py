"""Uniform noise images: an obviously unnatural query set (e.g. the demo's anomaly)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["uniform_noise"]


def uniform_noise(n: int, shape: Sequence[int] = (1, 28, 28), seed: int = 0) -> torch.Tensor:
    """``n`` images of independent uniform values in ``[-1, 1]``.

    Args:
        n: number of images, ``>= 0``.
        shape: ``(C, H, W)`` of one image, positive ints.
        seed: seed of the private ``torch.Generator``; the same seed gives the same images.

    Returns:
        ``float32`` tensor ``(n, C, H, W)`` in the model range (see :mod:`sameguard.data.transforms`).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}.")
    if len(shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape
    ):
        raise ValueError(f"shape must be a (C, H, W) triple of positive ints, got {tuple(shape)!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand((int(n), *(int(s) for s in shape)), generator=g).mul_(2.0).sub_(1.0)
