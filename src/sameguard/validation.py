"""Input validation at the public boundary: one place that says what an image batch must be."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["check_images", "RANGE_TOLERANCE"]

#: Values may exceed [-1, 1] by this much (rounding in float conversions) and are then clamped.
RANGE_TOLERANCE = 1e-4


def check_images(x: object, image_shape: Sequence[int] | None = None, *, name: str = "x") -> torch.Tensor:
    """Validate an image batch and return it as a contiguous ``float32`` CPU/GPU tensor.

    Args:
        x: a ``torch.Tensor`` or ``numpy.ndarray`` of shape ``(N, C, H, W)``, floating point,
            finite, with values in ``[-1, 1]`` (see :mod:`sameguard.data.transforms`).
        image_shape: the expected ``(C, H, W)``; ``None`` accepts any.
        name: the argument's name, used in error messages.

    Raises:
        ValueError: with a sentence that says what was expected and what was given.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array of images, got {type(x).__name__}.")
    if not torch.is_floating_point(x):
        raise ValueError(
            f"{name} must be a floating-point tensor with values in [-1, 1], got dtype {x.dtype}; "
            "convert uint8 pixels with sameguard.data.to_model_range (x = 2 * pixel / 255 - 1)."
        )
    expected = "(N, C, H, W)" if image_shape is None else f"(N, {', '.join(map(str, image_shape))})"
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: expected at least one image of shape {expected}.")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{name} must have shape {expected} (channels, height, width), got {tuple(x.shape)}."
        )
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} image(s); images must be finite.")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must have values in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "pixels in [0, 255] map to [-1, 1] by x = 2 * pixel / 255 - 1 (sameguard.data.to_model_range)."
        )
    return x.clamp(-1.0, 1.0).contiguous()
