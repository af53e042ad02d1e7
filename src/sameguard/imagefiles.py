"""Reading query images from files: a ``.npy`` array or a folder of PNG images.

* ``.npy``: either float values already in ``[-1, 1]`` with shape ``(N, C, H, W)``, or ``uint8``
  pixels ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, converted with
  :func:`sameguard.data.to_model_range`. Loaded with ``allow_pickle=False``.
* a folder: every ``*.png`` in it (sorted by name), converted to the expected channels
  (``L`` for 1, ``RGB`` for 3); all must already have the expected height and width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data.transforms import to_model_range
from .validation import check_images

__all__ = ["read_images", "write_pngs"]


def read_images(path: str | os.PathLike, image_shape: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` and one name per image (file name or array index).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unsupported file, no PNGs, or images that do not fit ``image_shape``.
    """
    p = Path(path)
    c, h, w = (int(s) for s in image_shape)
    if not p.exists():
        raise FileNotFoundError(f"No such file or folder: {p}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"{p} contains no .png images.")
        mode = {1: "L", 3: "RGB"}.get(c)
        if mode is None:
            raise ValueError(f"PNG folders are supported for 1- or 3-channel models, not {c} channels.")
        arrays = []
        for f in files:
            arrays.append(_read_png(f, mode, (w, h)))
        pixels = np.stack(arrays)
        x = to_model_range(pixels)
        return check_images(x, (c, h, w), name=str(p)), [f.name for f in files]
    if p.suffix.lower() != ".npy":
        raise ValueError(f"{p}: expected a .npy file or a folder of .png images.")
    array = _read_npy(p)
    if array.dtype == np.uint8:
        channels_first = array.ndim == 4 and array.shape[1] == c and array.shape[-1] != c
        x = to_model_range(array, channels_first=channels_first)
    else:
        x = torch.from_numpy(np.ascontiguousarray(array))
        if x.dim() == 3 and c == 1:
            x = x.unsqueeze(1)
    x = check_images(x, (c, h, w), name=str(p))
    return x, [str(i) for i in range(len(x))]


#: The first bytes of every ``.npy`` file (numpy's format specification).
NPY_MAGIC = b"\x93NUMPY"


def _read_npy(p: Path) -> np.ndarray:
    """The numeric array in the ``.npy`` file ``p``, read with ``allow_pickle=False``.

    Raises:
        ValueError: ``p`` is not a ``.npy`` file (no numpy header), holds Python objects, or is damaged.
    """
    with open(p, "rb") as fh:
        head = fh.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        raise ValueError(f"{p} is not a numpy .npy file (it does not start with numpy's header); save the images "
                         "with numpy.save as a numeric array (N, C, H, W) floats in [-1, 1] or uint8 pixels.")
    try:
        array = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"{p} holds Python objects (dtype object), not numbers; sameguard never unpickles "
                             "files: save the images as a numeric array (float32 in [-1, 1] or uint8 pixels).") from None
        raise ValueError(f"{p} is a damaged .npy file ({exc}).") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{p} is a damaged or truncated .npy file ({exc}).") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{p} holds {array.dtype} values; expected numbers (float32 in [-1, 1] or uint8 pixels).")
    return array


def _read_png(f: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One PNG as ``uint8`` pixels in ``mode`` (``L`` or ``RGB``), checked to be ``size`` = (width, height).

    Raises:
        ValueError: ``f`` is not a readable PNG image, or has another size.
    """
    try:
        with Image.open(f) as img:
            if img.format != "PNG":
                raise ValueError(f"{f} is a {img.format} image, not a PNG; convert it to PNG.")
            if img.size != size:
                raise ValueError(f"{f} is {img.size[0]}x{img.size[1]} pixels; the model expects {size[0]}x{size[1]}.")
            return np.asarray(img.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError(f"{f} is not a PNG image (its content is not an image format Pillow can read).") from None
    except OSError as exc:
        raise ValueError(f"{f} is a damaged PNG image ({exc}).") from None


def write_pngs(x: torch.Tensor, directory: str | os.PathLike, prefix: str = "img") -> list[Path]:
    """Save ``(N, C, H, W)`` images in ``[-1, 1]`` as ``<prefix>_00000.png``...; returns the paths."""
    from .data.transforms import to_uint8

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(check_images(x))
    paths = []
    for i, img in enumerate(pixels):
        path = out / f"{prefix}_{i:05d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(path)
    return paths
