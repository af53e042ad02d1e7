"""Image conversions and augmentation, and the package's one normalisation convention.

Normalisation convention
------------------------
Everywhere in sameguard an image batch is a ``float32`` tensor of shape ``(N, C, H, W)`` with
values in ``[-1, 1]``, obtained from 8-bit pixels ``p`` in ``0..255`` by::

    x = 2 * p / 255 - 1        # 0 -> -1 (black / background), 255 -> +1 (white)

which is what the SAME authors' code does (``Normalize(mean=0.5, std=0.5)`` after ``ToTensor``).
:func:`to_model_range` applies it and :func:`to_uint8` inverts it (for saving PNGs). Other modules
refer to this docstring instead of repeating it. Background pixels, added by :func:`pad_to` and by
the random crop of :func:`augment`, take the value ``-1`` (zero intensity).

Every function here is pure: it returns a new tensor and never changes its input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sameguard.validation import check_images, check_int

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND",
    "to_model_range",
    "to_uint8",
    "resize",
    "pad_to",
    "grayscale_to_rgb",
    "rgb_to_grayscale",
    "adapt_to",
    "augment",
]

#: Value of a zero-intensity (black) pixel in the model range; used for padding.
BACKGROUND = -1.0

# ITU-R BT.601 luma weights, as used by Pillow's "L" mode and torchvision.
_LUMA = (0.299, 0.587, 0.114)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``size`` as ``(height, width)``: an int for a square, or a pair of positive ints."""
    if isinstance(size, Sequence) and not isinstance(size, str):
        if len(size) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {size!r}.")
        return check_int(size[0], f"{name} (height)"), check_int(size[1], f"{name} (width)")
    side = check_int(size, name)
    return side, side


def to_model_range(pixels: np.ndarray, *, channels_first: bool = False) -> torch.Tensor:
    """Convert 8-bit pixels to the model range (see the module docstring).

    Args:
        pixels: ``uint8`` array of shape ``(N, H, W)`` (grey), ``(N, H, W, C)``
            (channels last, the default for 4-D input) or ``(N, C, H, W)`` when
            ``channels_first=True``.
        channels_first: whether a 4-D array is laid out ``(N, C, H, W)``.

    Returns:
        ``float32`` tensor ``(N, C, H, W)`` with values ``2 * p / 255 - 1`` in ``[-1, 1]``.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"to_model_range expects uint8 pixels in 0..255, got dtype {pixels.dtype}.")
    if pixels.ndim == 3:
        pixels = pixels[:, None, :, :]
    elif pixels.ndim == 4:
        if not channels_first:
            pixels = pixels.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            "to_model_range expects pixels of shape (N, H, W), (N, H, W, C) or (N, C, H, W) "
            f"with channels_first=True, got shape {pixels.shape}."
        )
    # A fresh float32 copy (the input may be a read-only cached array); p / 127.5 rounds the
    # exact value 2p/255 once, like 2 * p / 255 does.
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return t.div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_model_range`: ``(N, C, H, W)`` in ``[-1, 1]`` -> ``uint8 (N, H, W, C)``.

    Values are rounded to the nearest pixel level and clipped to ``0..255``, so the round trip
    ``to_uint8(to_model_range(p))`` returns ``p`` exactly (with a channel axis added).
    """
    x = check_images(x, name="x", check_range=False)
    p = ((x.detach().to("cpu", torch.float32) + 1.0) * 127.5).round_().clamp_(0, 255)
    return p.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def resize(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images to ``size`` (``int`` or ``(height, width)``).

    Bilinear interpolation with antialiasing (so shrinking does not alias), values clipped to
    ``[-1, 1]``. Returns ``x`` unchanged (same object) when it already has the size.
    """
    x = check_images(x, name="x", check_range=False)
    h, w = _pair(size, "size")
    if tuple(x.shape[-2:]) == (h, w):
        return x
    out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(-1.0, 1.0)


def pad_to(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Centre ``(N, C, H, W)`` images on a ``size`` canvas of background ``-1``.

    When the margin is odd, the extra pixel goes to the bottom / right. ``size`` must be at
    least the current height and width.
    """
    x = check_images(x, name="x", check_range=False)
    h, w = _pair(size, "size")
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    if dh < 0 or dw < 0:
        raise ValueError(
            f"pad_to cannot shrink images of size {tuple(x.shape[-2:])} to {(h, w)}; use resize."
        )
    top, left = dh // 2, dw // 2
    return F.pad(x, (left, dw - left, top, dh - top), value=BACKGROUND)


def grayscale_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 3, H, W)`` by repeating the grey channel."""
    x = check_images(x, name="x", check_range=False)
    if x.shape[1] != 1:
        raise ValueError(f"grayscale_to_rgb expects 1 channel, got {x.shape[1]}.")
    return x.repeat(1, 3, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` with ITU-R BT.601 luma weights (0.299, 0.587, 0.114).

    The weights sum to 1, so applying them in the model range equals applying them to pixels.
    """
    x = check_images(x, name="x", check_range=False)
    if x.shape[1] != 3:
        raise ValueError(f"rgb_to_grayscale expects 3 channels, got {x.shape[1]}.")
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).clamp_(-1.0, 1.0)


def adapt_to(images: torch.Tensor, image_shape: Sequence[int]) -> torch.Tensor:
    """Convert a batch to another ``(C, H, W)``, e.g. a CIFAR proxy set ``3x32x32 -> 1x28x28``.

    Channels are converted first (RGB -> grey with :func:`rgb_to_grayscale`, grey -> RGB by
    repetition), then the images are resized with :func:`resize` to exactly ``(H, W)`` (the
    aspect ratio follows the target). Only 1 and 3 channels are supported.

    Args:
        images: ``(N, C, H, W)`` in ``[-1, 1]``.
        image_shape: target ``(C, H, W)``.

    Returns:
        ``(N, *image_shape)`` float tensor in ``[-1, 1]``.
    """
    images = check_images(images, name="images", check_range=False)
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be a positive (C, H, W) triple, got {tuple(image_shape)!r}.")
    c, h, w = (int(s) for s in image_shape)
    src_c = images.shape[1]
    if src_c != c and not ({src_c, c} == {1, 3}):
        raise ValueError(f"adapt_to converts between 1 and 3 channels only, got {src_c} -> {c}.")
    out = images
    if src_c == 3 and c == 1:
        out = rgb_to_grayscale(out)
    out = resize(out, (h, w))
    if src_c == 1 and c == 3:
        out = grayscale_to_rgb(out)
    return out


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    crop_padding: int = 4,
    hflip: bool = False,
) -> torch.Tensor:
    """Random crop with padding and optional horizontal flip, drawn per image.

    Each image is padded by ``crop_padding`` pixels of background ``-1`` on every side and an
    ``H x W`` window is cut at a random offset (the classic CIFAR augmentation; a zero-intensity
    border rather than a reflection, so no content is invented). With ``hflip=True`` each image
    is then mirrored left-right with probability 1/2. All randomness comes from ``generator``
    (a CPU ``torch.Generator``): the same generator state gives the same output.

    Args:
        x: ``(N, C, H, W)`` images in ``[-1, 1]``.
        generator: source of randomness; it is advanced by the call.
        crop_padding: border width in pixels, ``>= 0``; 0 disables the crop.
        hflip: whether to apply random horizontal flips (see ``ImageDataset.hflip``).

    Returns:
        A new ``(N, C, H, W)`` tensor, same dtype and device as ``x``.
    """
    x = check_images(x, name="x", check_range=False)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    p = check_int(crop_padding, "crop_padding", minimum=0)
    n, _, h, w = x.shape
    out = x.clone()
    if p > 0 and n > 0:
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator).to(x.device)
        padded = F.pad(x, (p, p, p, p), value=BACKGROUND)
        rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (N, W)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        out = padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]
    if hflip and n > 0:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out[flip] = out[flip].flip(-1)
    return out
