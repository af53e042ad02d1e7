"""Datasets by name: :data:`DATASETS`, :func:`load_dataset` and :func:`available_datasets`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sameguard.data.base import SPLITS, ImageDataset
from sameguard.data.cifar import load_cifar10, load_cifar100
from sameguard.data.digits import load_digits
from sameguard.data.fashion_mnist import load_fashion_mnist
from sameguard.data.mnist_family import load_emnist, load_kmnist, load_mnist
from sameguard.validation import check_choice

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "DatasetSpec", "DATASETS", "available_datasets", "load_dataset"]


#: ``loader(split, data_dir, download) -> ImageDataset``.
Loader = Callable[[str, "str | os.PathLike | None", bool], ImageDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about one dataset before loading it.

    Attributes:
        name: registry name.
        loader: ``loader(split, data_dir, download) -> ImageDataset``.
        image_shape: ``(C, H, W)`` of its images.
        num_classes: number of classes.
        description: one line for help texts.
        needs_files: whether the user must provide files (False: ships with a dependency).
        can_download: whether ``download=True`` can fetch verified files.
    """

    name: str
    loader: Loader
    image_shape: tuple[int, int, int]
    num_classes: int
    description: str
    needs_files: bool
    can_download: bool = False


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "fashion-mnist",
            lambda split, data_dir, download: load_fashion_mnist(split, data_dir=data_dir, download=download),
            (1, 28, 28), 10,
            "Fashion-MNIST, 70 000 grey 28x28 clothing images (Debian package, data dir or download)",
            needs_files=True, can_download=True,
        ),
        DatasetSpec(
            "digits",
            lambda split, data_dir, download: load_digits(split),
            (1, 28, 28), 10,
            "scikit-learn's 1 797 handwritten 8x8 digits, resized and padded to 28x28 (no files needed)",
            needs_files=False,
        ),
        DatasetSpec(
            "mnist",
            lambda split, data_dir, download: load_mnist(split, data_dir=data_dir),
            (1, 28, 28), 10,
            "MNIST, 70 000 grey 28x28 handwritten digits (IDX files in the data dir)",
            needs_files=True,
        ),
        DatasetSpec(
            "kmnist",
            lambda split, data_dir, download: load_kmnist(split, data_dir=data_dir),
            (1, 28, 28), 10,
            "Kuzushiji-MNIST, 70 000 grey 28x28 cursive hiragana (IDX files in the data dir)",
            needs_files=True,
        ),
        DatasetSpec(
            "emnist-digits",
            lambda split, data_dir, download: load_emnist(split, variant="digits", data_dir=data_dir),
            (1, 28, 28), 10,
            "EMNIST digits, 280 000 grey 28x28 handwritten digits (IDX files in the data dir)",
            needs_files=True,
        ),
        DatasetSpec(
            "emnist-letters",
            lambda split, data_dir, download: load_emnist(split, variant="letters", data_dir=data_dir),
            (1, 28, 28), 26,
            "EMNIST letters, 145 600 grey 28x28 handwritten letters, case merged (IDX files in the data dir)",
            needs_files=True,
        ),
        DatasetSpec(
            "cifar10",
            lambda split, data_dir, download: load_cifar10(split, data_dir=data_dir),
            (3, 32, 32), 10,
            "CIFAR-10, 60 000 colour 32x32 images of 10 classes (binary or python release in the data dir)",
            needs_files=True,
        ),
        DatasetSpec(
            "cifar100",
            lambda split, data_dir, download: load_cifar100(split, data_dir=data_dir),
            (3, 32, 32), 100,
            "CIFAR-100, 60 000 colour 32x32 images of 100 classes (binary or python release in the data dir)",
            needs_files=True,
        ),
    )
}


def available_datasets() -> list[str]:
    """The registry names, in registration order."""
    return list(DATASETS)


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load a dataset split by registry name.

    Args:
        name: one of :func:`available_datasets`.
        split: ``"train"`` or ``"test"``.
        data_dir: directory holding the dataset's files; defaults to ``$SAMEGUARD_DATA_DIR``.
        download: allow fetching verified files for datasets that support it
            (``DATASETS[name].can_download``); ignored, with a log message, for the others.

    Returns:
        An :class:`ImageDataset`; images ``(N, *DATASETS[name].image_shape)`` in ``[-1, 1]``.

    Raises:
        ValueError: unknown name or split.
        DatasetNotFoundError: the dataset's files could not be found (the message says how to
            provide them).
    """
    spec = DATASETS[check_choice(name, "dataset", tuple(DATASETS))]
    check_choice(split, "split", SPLITS)
    if download and not spec.can_download:
        logger.info("download is not available for %r; looking for local files only", name)
    dataset = spec.loader(split, Path(data_dir) if data_dir is not None else None, download)
    if dataset.image_shape != spec.image_shape or dataset.num_classes != spec.num_classes:
        raise ValueError(
            f"Dataset {name!r} loaded with image shape {dataset.image_shape} and "
            f"{dataset.num_classes} classes, expected {spec.image_shape} and {spec.num_classes}; "
            "the files do not hold this dataset."
        )
    return dataset
