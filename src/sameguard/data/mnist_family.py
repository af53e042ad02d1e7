"""MNIST, KMNIST and EMNIST from IDX files the user provides (no download).

Files are looked for in the user's data directory (``data_dir=`` / ``--data-dir``, else
``$SAMEGUARD_DATA_DIR``), first in a per-dataset subfolder, then directly, then in
``~/.cache/sameguard/data/<dataset>/``:

============  =====================================  ===================================================
dataset       subfolders                             files (each plain or ``.gz``)
============  =====================================  ===================================================
MNIST         ``mnist/``                             ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
                                                     ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
KMNIST        ``kmnist/``                            same names as MNIST
EMNIST        ``emnist/``, ``emnist/gzip/``          ``emnist-<variant>-train-images-idx3-ubyte``,
                                                     ``emnist-<variant>-train-labels-idx1-ubyte``,
                                                     ``emnist-<variant>-test-images-idx3-ubyte``,
                                                     ``emnist-<variant>-test-labels-idx1-ubyte``
============  =====================================  ===================================================

MNIST, KMNIST and Fashion-MNIST share their file names, so keep each in its own subfolder when
a data directory holds more than one of them.

sameguard does not download these datasets: no checksums are published for them that it could
verify. EMNIST images are stored transposed in the official files; the loader transposes them
back so that they look like MNIST digits. EMNIST "letters" labels ``1..26`` are shifted to
``0..25``. Images are ``(N, 1, 28, 28)`` in ``[-1, 1]`` (see :mod:`sameguard.data.transforms`);
horizontal flips are not a sensible augmentation for digits or letters (``hflip=False``).
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path

import numpy as np
import torch

from sameguard.api import DatasetNotFoundError
from sameguard.data import files
from sameguard.data.base import SPLITS, ImageDataset
from sameguard.data.idx import MNIST_FILE_NAMES
from sameguard.data.transforms import to_model_range
from sameguard.validation import check_choice

logger = logging.getLogger(__name__)

__all__ = ["DIGITS", "KMNIST_CLASSES", "EMNIST_CLASSES", "load_mnist", "load_kmnist", "load_emnist"]

DIGITS: tuple[str, ...] = tuple(string.digits)

KMNIST_CLASSES: tuple[str, ...] = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")

#: EMNIST variant -> class names, in label order (from the official ``*-mapping.txt`` files).
#: "letters" merges upper and lower case: class "A" is A or a.
EMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "digits": DIGITS,
    "mnist": DIGITS,
    "letters": tuple(string.ascii_uppercase),
    "balanced": tuple(string.digits + string.ascii_uppercase + "abdefghnqrt"),
    "bymerge": tuple(string.digits + string.ascii_uppercase + "abdefghnqrt"),
    "byclass": tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase),
}

def _not_found(
    title: str, split: str, stems: tuple[str, str], subdir: str, searched: list[Path], user: Path | None
) -> DatasetNotFoundError:
    where = (
        f"The data directory is {user}."
        if user is not None
        else f"No data directory was given (data_dir= / --data-dir, or {files.DATA_DIR_ENV})."
    )
    return DatasetNotFoundError(
        f"{title} ({split} split) not found. Put {stems[0]}.gz and {stems[1]}.gz (or the "
        f"uncompressed files) in DIR/{subdir}/ or DIR itself, and pass --data-dir DIR "
        f"(data_dir=DIR) or set {files.DATA_DIR_ENV}=DIR. {where}\n"
        f"sameguard does not download {title}: there are no published checksums it could verify, "
        "so get the files from the dataset's authors.\n"
        f"Places searched:\n{files.describe_dirs(searched)}"
    )


def _load_idx_dataset(
    *,
    title: str,
    split: str,
    stems: tuple[str, str],
    subdirs: list[str],
    data_dir: str | os.PathLike | None,
) -> tuple[np.ndarray, np.ndarray]:
    searched = files.candidate_dirs(data_dir, subdirs)
    found = files.find_files_together(searched, stems)
    if found is None:
        raise _not_found(title, split, stems, subdirs[0], searched, files.user_data_dir(data_dir))
    images, labels = files.load_idx_pair(found[0], found[1])
    logger.info("loaded %s %s split (%d images) from %s", title, split, len(labels), found[0].parent)
    return images, labels


def _dataset(name: str, split: str, images: np.ndarray, labels: np.ndarray, classes) -> ImageDataset:
    return ImageDataset(
        name=name,
        split=split,
        images=to_model_range(images),
        labels=torch.from_numpy(labels),
        classes=tuple(classes),
        hflip=False,
    )


def load_mnist(split: str = "train", *, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """MNIST handwritten digits: ``(N, 1, 28, 28)`` in ``[-1, 1]``, labels ``0..9``.

    Args:
        split: ``"train"`` (60 000) or ``"test"`` (10 000).
        data_dir: directory holding the IDX files in ``mnist/`` or directly; defaults to
            ``$SAMEGUARD_DATA_DIR``.

    Raises:
        DatasetNotFoundError: the files are not in any searched place (the message says where to
            put which file).
    """
    check_choice(split, "split", SPLITS)
    images, labels = _load_idx_dataset(
        title="MNIST", split=split, stems=MNIST_FILE_NAMES[split],
        subdirs=["mnist"], data_dir=data_dir,
    )
    return _dataset("mnist", split, images, labels, DIGITS)


def load_kmnist(split: str = "train", *, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Kuzushiji-MNIST (10 cursive hiragana): ``(N, 1, 28, 28)`` in ``[-1, 1]``, labels ``0..9``.

    Same file names as MNIST, looked for in the data directory's ``kmnist/`` subfolder, then in
    the directory itself.
    """
    check_choice(split, "split", SPLITS)
    images, labels = _load_idx_dataset(
        title="KMNIST", split=split, stems=MNIST_FILE_NAMES[split],
        subdirs=["kmnist"], data_dir=data_dir,
    )
    return _dataset("kmnist", split, images, labels, KMNIST_CLASSES)


def load_emnist(
    split: str = "train", *, variant: str = "digits", data_dir: str | os.PathLike | None = None
) -> ImageDataset:
    """EMNIST (Cohen et al., 2017): ``(N, 1, 28, 28)`` in ``[-1, 1]``, upright like MNIST.

    Args:
        split: ``"train"`` or ``"test"``.
        variant: one of :data:`EMNIST_CLASSES` (``"digits"``, ``"letters"``, ``"balanced"``,
            ``"mnist"``, ``"bymerge"``, ``"byclass"``). For ``"letters"`` the file's labels
            ``1..26`` become ``0..25``.
        data_dir: directory holding the files in ``emnist/`` (or ``emnist/gzip/``, the layout
            of the official archive) or directly; defaults to ``$SAMEGUARD_DATA_DIR``.

    Returns:
        An :class:`ImageDataset` named ``"emnist-<variant>"``.
    """
    check_choice(split, "split", SPLITS)
    check_choice(variant, "variant", sorted(EMNIST_CLASSES))
    stems = (
        f"emnist-{variant}-{split}-images-idx3-ubyte",
        f"emnist-{variant}-{split}-labels-idx1-ubyte",
    )
    name = f"emnist-{variant}"
    images, labels = _load_idx_dataset(
        title=f"EMNIST {variant}", split=split, stems=stems,
        subdirs=["emnist", "emnist/gzip"], data_dir=data_dir,
    )
    images = images.transpose(0, 2, 1)  # the official files store each image transposed
    if variant == "letters":
        if labels.size and labels.min() < 1:
            raise ValueError(
                f"EMNIST letters labels must be 1..26 in the file, found {int(labels.min())}."
            )
        labels = labels - 1
    return _dataset(name, split, images, labels, EMNIST_CLASSES[variant])
