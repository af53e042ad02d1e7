"""Uniform noise images: an obviously unnatural query set (e.g. the demo's anomaly)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from sameguard.validation import check_int

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
    n = check_int(n, "n", minimum=0)
    if len(shape) != 3:
        raise ValueError(f"shape must be a (C, H, W) triple of positive ints, got {tuple(shape)!r}.")
    dims = tuple(check_int(s, f"shape[{i}]", minimum=1) for i, s in enumerate(shape))
    g = torch.Generator().manual_seed(check_int(seed, "seed", minimum=None))
    return torch.rand((n, *dims), generator=g).mul_(2.0).sub_(1.0)
