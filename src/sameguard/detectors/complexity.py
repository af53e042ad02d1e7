"""Input complexity of a query as its compressed length (Serrà et al., ICLR 2020).

Serrà, Álvarez, Gómez, Slizovskaia, Núñez and Luque, "Input complexity and out-of-distribution
detection with likelihood-based generative models" (ICLR 2020, arXiv 1909.11480) show that a
generative model's likelihood, or a reconstruction error, is dominated by how complex the input
is: simple images (mostly black digits) look "more in-distribution" than clothing whatever the
model was trained on. They estimate the complexity ``L(x)`` of an image by the length of a
lossless compression of it (PNG, FLIF, JPEG2000), in bits per dimension, and subtract it from the
model's score. SAME's robust variant (``complexity=`` of
:class:`~sameguard.detectors.same_base.ReconstructionDetector`) uses this estimate.

Images are quantised to 8 bits as in the data pipeline (``pixel = round((x + 1) * 127.5)``),
so an image loaded from a PNG file compresses to the same length here as in the file it came
from (up to the container's fixed overhead).
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch

from ..validation import check_choice, check_images

__all__ = ["COMPLEXITY_METHODS", "compressed_bits_per_pixel", "to_uint8"]

#: The compressors :func:`compressed_bits_per_pixel` knows.
COMPLEXITY_METHODS: tuple[str, ...] = ("png", "zlib")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` images in ``[-1, 1]`` as ``uint8`` pixels ``round((x + 1) * 127.5)``, same shape."""
    pixels = torch.round((x.detach().cpu().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5)
    return pixels.to(torch.uint8).numpy()


def _png_bytes(image: np.ndarray) -> int:
    """Length in bytes of ``image`` (``(C, H, W)`` uint8) written as a PNG at compression level 9.

    One channel is an ``L`` image, three an ``RGB`` image; any other channel count is written as
    one grey ``(C * H, W)`` image (channels stacked vertically).
    """
    from PIL import Image

    c, h, w = image.shape
    if c == 1:
        pil = Image.fromarray(np.ascontiguousarray(image[0]))
    elif c == 3:
        pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    else:
        pil = Image.fromarray(np.ascontiguousarray(image.reshape(c * h, w)))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=9, optimize=False)
    return buffer.tell()


def _zlib_bytes(image: np.ndarray) -> int:
    """Length in bytes of ``image``'s raw ``uint8`` bytes (C order) after ``zlib.compress(level=9)``."""
    return len(zlib.compress(np.ascontiguousarray(image).tobytes(), 9))


def compressed_bits_per_pixel(x: torch.Tensor, method: str = "png") -> torch.Tensor:
    """Serrà et al.'s complexity estimate ``L(x)``: compressed length in bits per pixel value.

    Args:
        x: ``(N, C, H, W)`` images in ``[-1, 1]`` (quantised to 8 bits first, see :func:`to_uint8`).
        method: ``"png"`` (Pillow's PNG encoder, level 9, the container's headers included, as
            Serrà et al. use a real image format) or ``"zlib"`` (DEFLATE of the raw bytes, level 9).

    Returns:
        ``(N,)`` float32 ``L(x) = 8 * compressed_bytes / (C * H * W)``, deterministic, > 0. An
        incompressible image (uniform noise) is near 8 (a little above, from the format's
        overhead); a constant image is far below 1.
    """
    check_choice(method, "method", COMPLEXITY_METHODS)
    images = to_uint8(check_images(x, name="x"))
    length = _png_bytes if method == "png" else _zlib_bytes
    values = images.shape[1] * images.shape[2] * images.shape[3]
    bits = [8.0 * length(image) / values for image in images]
    return torch.tensor(bits, dtype=torch.float32)
