"""Validation at the public boundary, in one vocabulary: image batches and hyper-parameters.

Every check takes ``(value, name, ...)``, returns the validated value (converted to its plain
Python or tensor type) and raises :class:`ValueError` with a full sentence that names the argument,
says what was expected and what was given. Use these everywhere instead of local helpers::

    self.epochs = check_int(epochs, "epochs", minimum=1)
    self.lr = check_positive(lr, "lr")
    self.alpha = check_fraction(alpha, "alpha")                  # in [0, 1]
    self.mode = check_choice(mode, "mode", ("mean", "max"))
    x = check_images(x, (1, 28, 28), name="queries")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from .forward_memo import memoized, sharing_active

__all__ = [
    "RANGE_TOLERANCE",
    "check_images",
    "check_int",
    "check_optional_int",
    "check_positive",
    "check_non_negative",
    "check_fraction",
    "check_eta",
    "check_choice",
    "check_name",
]

T = TypeVar("T")

#: Values may exceed [-1, 1] by this much (rounding in float conversions) and are then clamped.
RANGE_TOLERANCE = 1e-4


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_int(value: object, name: str, *, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None``: unbounded on that side)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f" of at least {minimum}"
        hi = "" if maximum is None else (" and" if lo else "") + f" at most {maximum}"
        raise ValueError(f"{name} must be an integer{lo}{hi}, got {value!r}.")
    return int(value)  # type: ignore[arg-type]


def check_optional_int(value: object, name: str, *, minimum: int | None = 0) -> int | None:
    """``None`` (meaning no limit) or an ``int`` of at least ``minimum``."""
    if value is None:
        return None
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or (minimum is not None and value < minimum):
        lo = "" if minimum is None else f" of at least {minimum}"
        raise ValueError(f"{name} must be an integer{lo} or None (no limit), got {value!r}.")
    return int(value)  # type: ignore[arg-type]


def check_positive(value: object, name: str) -> float:
    """``value`` as a finite ``float > 0``."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_non_negative(value: object, name: str) -> float:
    """``value`` as a finite ``float >= 0``."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_fraction(value: object, name: str, *, include_low: bool = True, include_high: bool = True) -> float:
    """``value`` as a ``float`` in ``[0, 1]``; ``include_low``/``include_high`` close or open each end."""
    ok = _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v >= 0 if include_low else v > 0) and (v <= 1 if include_high else v < 1)
    if not ok:
        interval = ("[" if include_low else "(") + "0, 1" + ("]" if include_high else ")")
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_eta(value: object, name: str = "conditional") -> float:
    """``value`` as the ``eta`` of calibration-conditional p-values (see
    :class:`~sameguard.evidence.ConformalCalibrator`): a number in (0, 0.5], since Massart's one-sided DKW
    bound, which their margin relies on, needs ``exp(-2 m eps^2) <= 1/2``; ``name`` names the option."""
    if not (_is_number(value) and math.isfinite(value) and 0.0 < float(value) <= 0.5):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a number in (0, 0.5], got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_choice(value: T, name: str, choices: Sequence[Any]) -> T:
    """``value`` unchanged if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def check_name(value: object, name: str) -> str:
    """A non-empty string (a client id, a detector kind, ...)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def check_images(
    x: object,
    image_shape: Sequence[int] | None = None,
    *,
    name: str = "x",
    check_range: bool = True,
) -> torch.Tensor:
    """Validate an image batch and return it as a contiguous ``float32`` CPU/GPU tensor.

    Args:
        x: a ``torch.Tensor`` or ``numpy.ndarray`` of shape ``(N, C, H, W)``, floating point,
            finite, with values in ``[-1, 1]`` (see :mod:`sameguard.data.transforms`).
        image_shape: the expected ``(C, H, W)``; ``None`` accepts any.
        name: the argument's name, used in error messages.
        check_range: check (and clamp to) ``[-1, 1]``; ``False`` for intermediate tensors such as
            resized or noised images, which may leave the range slightly.

    Raises:
        ValueError: with a sentence that says what was expected and what was given.

    Inside :func:`~sameguard.forward_memo.shared_forward` (a guarded request) a tensor already
    validated with the same ``image_shape`` and ``check_range`` is not checked again: the first
    check's result is returned (the guard's victim, detector and alarm scorers all validate the
    same batch).
    """
    if isinstance(x, torch.Tensor) and sharing_active():
        shape = None if image_shape is None else tuple(image_shape)
        return memoized(("check_images", shape, check_range), x,
                        lambda: _check_images(x, image_shape, name=name, check_range=check_range))
    return _check_images(x, image_shape, name=name, check_range=check_range)


def _check_images(x: object, image_shape: Sequence[int] | None, *, name: str, check_range: bool) -> torch.Tensor:
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
    lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; NaN or +-inf anywhere shows in lo or hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} image(s); images must be finite.")
    if not check_range:
        return x.contiguous()
    if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must have values in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "pixels in [0, 255] map to [-1, 1] by x = 2 * pixel / 255 - 1 (sameguard.data.to_model_range)."
        )
    if lo < -1.0 or hi > 1.0:  # within the tolerance: clamp (a copy); otherwise the batch itself
        x = x.clamp(-1.0, 1.0)
    return x.contiguous()
