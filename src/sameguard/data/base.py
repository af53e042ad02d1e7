"""The in-memory dataset type every loader returns: :class:`ImageDataset`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sameguard.validation import check_fraction, check_int, check_name

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "ImageDataset"]

#: The splits every loader offers.
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set held in memory, in the package's normalisation convention.

    Attributes:
        name: registry name, e.g. ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"`` for loaded data (subsets keep their parent's split).
        images: ``(N, C, H, W)`` ``float32`` in ``[-1, 1]`` (see :mod:`sameguard.data.transforms`).
        labels: ``(N,)`` ``int64`` in ``[0, num_classes)``.
        classes: class names, one per class index.
        hflip: whether horizontal flips are a sensible augmentation for this data (clothes,
            objects: yes; digits, letters: no).

    The fields are validated on construction. The dataclass is frozen, but the tensors are not
    copied: treat them as read-only (use ``.clone()`` before changing them in place).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    hflip: bool

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check_name(self.split, "split")
        if not isinstance(self.classes, tuple) or not self.classes or not all(
            isinstance(c, str) for c in self.classes
        ):
            raise ValueError(f"classes must be a non-empty tuple of strings, got {self.classes!r}.")
        x, y = self.images, self.labels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32:
            raise ValueError(
                "images must be a float32 tensor of shape (N, C, H, W), got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}."
            )
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
            raise ValueError(
                "labels must be an int64 tensor of shape (N,), got "
                f"{type(y).__name__} {getattr(y, 'dtype', '')} {tuple(getattr(y, 'shape', ()))}."
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"images and labels disagree on N: {x.shape[0]} images, {y.shape[0]} labels.")
        if x.numel() > 0:
            lo, hi = torch.aminmax(x)
            if torch.isnan(lo) or torch.isnan(hi) or lo < -1.0 or hi > 1.0:
                raise ValueError(
                    f"images must lie in [-1, 1] without NaN, found values in [{lo.item()}, {hi.item()}]."
                )
        if y.numel() > 0:
            ylo, yhi = int(y.min()), int(y.max())
            if ylo < 0 or yhi >= len(self.classes):
                raise ValueError(
                    f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, "
                    f"found values in [{ylo}, {yhi}]."
                )
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip must be a bool, got {self.hflip!r}.")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape=({c}, {h}, {w}), num_classes={self.num_classes}, hflip={self.hflip})"
        )

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The examples at ``indices`` (1-D integer positions, in that order; repeats allowed)."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dim() != 1 or (idx.numel() > 0 and (idx.is_floating_point() or idx.dtype == torch.bool)):
            raise ValueError(
                f"indices must be a 1-D sequence of integer positions, got dtype {idx.dtype} "
                f"and shape {tuple(idx.shape)}."
            )
        idx = idx.to(torch.int64)
        n = len(self)
        if idx.numel() > 0 and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"indices must lie in [0, {n}) for a dataset of {n} examples.")
        return ImageDataset(
            name=self.name,
            split=self.split,
            images=self.images[idx],
            labels=self.labels[idx],
            classes=self.classes,
            hflip=self.hflip,
        )

    def _permutation(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(check_int(seed, "seed", minimum=None))
        return torch.randperm(len(self), generator=g)

    def take(self, n: int, seed: int) -> ImageDataset:
        """``n`` distinct examples drawn at random, kept in their original order.

        The same ``seed`` gives the same examples; ``take(n, seed)`` is a subset of
        ``take(m, seed)`` for ``n <= m``.
        """
        n = check_int(n, "n", minimum=0, maximum=len(self))
        return self.subset(self._permutation(seed)[:n].sort().values)

    def split_off(self, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
        """Split at random into ``(rest, part)`` where ``part`` holds ``round(fraction * N)`` examples.

        The two parts are disjoint, cover the dataset, keep the original order within each part,
        and depend only on ``seed``. Typical use: ``train, held_out = ds.split_off(0.1, seed=0)``.

        Args:
            fraction: share of examples to split off, in ``(0, 1)``; both parts must be non-empty.
            seed: seed of the random permutation.
        """
        check_fraction(fraction, "fraction", include_low=False, include_high=False)
        n = len(self)
        k = int(round(fraction * n))
        if k == 0 or k == n:
            raise ValueError(
                f"Splitting off a fraction {fraction} of {n} examples leaves an empty part; "
                "use a larger dataset or a different fraction."
            )
        perm = self._permutation(seed)
        part, rest = perm[:k].sort().values, perm[k:].sort().values
        return self.subset(rest), self.subset(part)
