"""scikit-learn's handwritten digits (UCI optdigits): 1 797 real 8x8 images, shaped like MNIST.

The images ship inside scikit-learn (no download). Each 8x8 image with values ``0..16`` is
scaled to pixels ``16 -> 255``, converted to the model range (see
:mod:`sameguard.data.transforms`), upsampled to 20x20 (bilinear, antialiased) and centred on a
28x28 background, as MNIST centres its digits in a 20x20 box. Result: ``(N, 1, 28, 28)``.

Splits are fixed: a permutation of the 1 797 indices by ``numpy.random.RandomState(0)`` (a
generator whose stream numpy keeps stable); its first :data:`TEST_SIZE` = 359 indices (20 %,
rounded down) form ``"test"``, the remaining 1 438 form ``"train"``. Both keep the original order.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from sameguard.data.base import SPLITS, ImageDataset
from sameguard.data.transforms import pad_to, resize
from sameguard.validation import check_choice

logger = logging.getLogger(__name__)

__all__ = ["NAME", "NUM_EXAMPLES", "TEST_SIZE", "split_indices", "load_digits"]

NAME = "digits"
NUM_EXAMPLES = 1797
TEST_SIZE = NUM_EXAMPLES // 5
_SPLIT_SEED = 0


def split_indices(split: str) -> np.ndarray:
    """Sorted indices into scikit-learn's digits of the fixed ``"train"`` or ``"test"`` split."""
    check_choice(split, "split", SPLITS)
    perm = np.random.RandomState(_SPLIT_SEED).permutation(NUM_EXAMPLES)
    chosen = perm[:TEST_SIZE] if split == "test" else perm[TEST_SIZE:]
    return np.sort(chosen)


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    raw = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8) in 0..16
    if raw.shape != (NUM_EXAMPLES, 8, 8):
        raise RuntimeError(f"scikit-learn's digits have shape {raw.shape}, expected ({NUM_EXAMPLES}, 8, 8).")
    # pixel = value * 255 / 16, then x = 2 * pixel / 255 - 1 = value / 8 - 1
    x = torch.from_numpy(raw).unsqueeze(1) / 8.0 - 1.0
    x = pad_to(resize(x, 20), 28)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return x, y


def load_digits(split: str = "train") -> ImageDataset:
    """The fixed ``"train"`` (1 438) or ``"test"`` (359) split: ``(N, 1, 28, 28)`` in ``[-1, 1]``.

    Labels are ``0..9``; ``hflip=False``.
    """
    idx = torch.from_numpy(split_indices(split))
    x, y = _all_digits()
    return ImageDataset(
        name=NAME,
        split=split,
        images=x[idx],
        labels=y[idx],
        classes=tuple(str(d) for d in range(10)),
        hflip=False,
    )
