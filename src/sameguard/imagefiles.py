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
from PIL import Image

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
            with Image.open(f) as img:
                if img.size != (w, h):
                    raise ValueError(f"{f} is {img.size[0]}x{img.size[1]} pixels; the model expects {w}x{h}.")
                arrays.append(np.asarray(img.convert(mode), dtype=np.uint8))
        pixels = np.stack(arrays)
        x = to_model_range(pixels)
        return check_images(x, (c, h, w), name=str(p)), [f.name for f in files]
    if p.suffix.lower() != ".npy":
        raise ValueError(f"{p}: expected a .npy file or a folder of .png images.")
    try:
        array = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{p} is not a plain numpy array file (pickled arrays are refused): {exc}") from None
    if array.dtype == np.uint8:
        channels_first = array.ndim == 4 and array.shape[1] == c and array.shape[-1] != c
        x = to_model_range(array, channels_first=channels_first)
    else:
        x = torch.from_numpy(np.ascontiguousarray(array))
        if x.dim() == 3 and c == 1:
            x = x.unsqueeze(1)
    x = check_images(x, (c, h, w), name=str(p))
    return x, [str(i) for i in range(len(x))]


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
