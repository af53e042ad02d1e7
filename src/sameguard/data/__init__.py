"""Datasets and image transforms for sameguard.

Every loader returns an :class:`ImageDataset`: ``images`` ``(N, C, H, W)`` ``float32`` in
``[-1, 1]`` (the package's one normalisation convention, documented in
:mod:`sameguard.data.transforms`), ``labels`` ``(N,)`` ``int64``, class names and whether
horizontal flips suit the data.

A short tour::

    from sameguard.data import load_dataset, available_datasets, augment, adapt_to, to_uint8

    available_datasets()      # ['fashion-mnist', 'digits', 'mnist', ...]
    train = load_dataset("fashion-mnist", "train")          # 60 000 x 1 x 28 x 28
    train, calib = train.split_off(0.1, seed=0)             # held-out part for calibration
    few = train.take(1000, seed=0)                          # a deterministic random subset

    g = torch.Generator().manual_seed(0)
    x = augment(few.images[:128], g, crop_padding=4, hflip=few.hflip)

    proxy = load_dataset("digits", "test")                  # ships with scikit-learn
    cifar = load_dataset("cifar10", "test", data_dir="~/data")
    queries = adapt_to(cifar.images, train.image_shape)     # 3x32x32 -> 1x28x28
    pngs = to_uint8(queries)                                # uint8 (N, 28, 28, 1)

Where files come from: Fashion-MNIST is found in ``data_dir`` / ``$SAMEGUARD_DATA_DIR``, in
the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or is
downloaded and verified when ``download=True`` / ``SAMEGUARD_DOWNLOAD=1``. scikit-learn's
``digits`` needs nothing. MNIST, KMNIST, EMNIST and CIFAR-10/100 read the official files from
the data directory; when something is missing, :class:`~sameguard.api.DatasetNotFoundError`
says which files to put where.
"""

from __future__ import annotations

from sameguard.data.base import ImageDataset
from sameguard.data.cifar import NumpyOnlyUnpickler, load_cifar10, load_cifar100, read_numpy_pickle
from sameguard.data.digits import load_digits
from sameguard.data.fashion_mnist import load_fashion_mnist
from sameguard.data.idx import parse_idx, read_idx, write_idx
from sameguard.data.mnist_family import load_emnist, load_kmnist, load_mnist
from sameguard.data.noise import uniform_noise
from sameguard.data.registry import DATASETS, DatasetSpec, available_datasets, load_dataset
from sameguard.data.transforms import (
    adapt_to,
    augment,
    grayscale_to_rgb,
    pad_to,
    resize,
    rgb_to_grayscale,
    to_model_range,
    to_uint8,
)

__all__ = [
    "ImageDataset",
    "DatasetSpec",
    "DATASETS",
    "available_datasets",
    "load_dataset",
    "load_fashion_mnist",
    "load_digits",
    "load_mnist",
    "load_kmnist",
    "load_emnist",
    "load_cifar10",
    "load_cifar100",
    "uniform_noise",
    "to_model_range",
    "to_uint8",
    "resize",
    "pad_to",
    "grayscale_to_rgb",
    "rgb_to_grayscale",
    "adapt_to",
    "augment",
    "read_idx",
    "parse_idx",
    "write_idx",
    "read_numpy_pickle",
    "NumpyOnlyUnpickler",
]
