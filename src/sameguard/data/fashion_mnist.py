"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 70 000 grey 28x28 images of 10 clothing classes.

The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are looked for in:

1. the user's data directory (``data_dir=`` / ``--data-dir``, else ``$SAMEGUARD_DATA_DIR``),
   in its ``fashion-mnist/`` subfolder or directly;
2. the Debian package directory :data:`DEBIAN_DIR` (``apt-get install dataset-fashion-mnist``);
3. ``~/.cache/sameguard/data/fashion-mnist/``, where downloads go when no data directory is named.

When the files are nowhere and downloads are allowed (``download=True`` / ``--download`` or
``SAMEGUARD_DOWNLOAD=1``), the official files are fetched from :data:`DOWNLOAD_URL` into
``<data dir>/fashion-mnist/`` (or the cache directory above).

Every file read is checked against :data:`SHA256`, the SHA-256 of the *decompressed* IDX bytes
(Debian re-compresses the files, so hashes of the ``.gz`` files differ between sources while the
payloads are identical). A mismatch raises :class:`~sameguard.api.IntegrityError`.

A directory may also hold a *subset* of Fashion-MNIST: the same four file names and format with
fewer images, and a manifest :data:`SUBSET_MANIFEST` (``subset.json``) giving the SHA-256 of each
decompressed file. The files are then checked against the manifest instead of :data:`SHA256`.
The tests ship such a subset (``tests/fixtures/fashion-mnist-small/``, 3000 training and 1000 test
images), so they run where the full dataset is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import torch

from sameguard.api import DatasetNotFoundError, IntegrityError
from sameguard.data import files
from sameguard.data.base import SPLITS, ImageDataset
from sameguard.data.idx import MNIST_FILE_NAMES, read_idx_bytes
from sameguard.data.transforms import to_model_range
from sameguard.validation import check_choice

logger = logging.getLogger(__name__)

__all__ = [
    "NAME",
    "CLASSES",
    "FILES",
    "SHA256",
    "DEBIAN_DIR",
    "DOWNLOAD_URL",
    "SUBSET_MANIFEST",
    "load_fashion_mnist",
]

NAME = "fashion-mnist"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: split -> (images file, labels file), without the optional ``.gz``.
FILES: dict[str, tuple[str, str]] = MNIST_FILE_NAMES

#: SHA-256 of the decompressed IDX payload of each file (computed from Debian's
#: dataset-fashion-mnist files, which hold the official payloads).
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Base URL of the official files (``<DOWNLOAD_URL><name>.gz``).
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

#: Name of the manifest that marks a directory as holding a subset of Fashion-MNIST.
SUBSET_MANIFEST = "subset.json"

_DOWNLOAD_TIMEOUT_S = 60


def _expected_sha256(directory: Path) -> dict[str, str]:
    """The payload hashes the files in ``directory`` must have: :data:`SHA256`, or a subset's manifest."""
    manifest = directory / SUBSET_MANIFEST
    if not manifest.is_file():
        return SHA256
    try:
        data = json.loads(manifest.read_text())
        hashes = {stem: data["sha256"][stem] for stems in FILES.values() for stem in stems}
        if data.get("dataset") != NAME or not all(isinstance(h, str) and len(h) == 64 for h in hashes.values()):
            raise ValueError(f"expected dataset {NAME!r} and a 64-digit SHA-256 for each of the four files")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{manifest}: not a valid Fashion-MNIST subset manifest ({exc}).") from None
    logger.info("%s holds a subset of Fashion-MNIST (%s); checking its files against it", directory, manifest.name)
    return hashes


def _search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    return files.candidate_dirs(data_dir, [NAME], extra=[DEBIAN_DIR])


def _download_dir(data_dir: str | os.PathLike | None) -> Path:
    user = files.user_data_dir(data_dir)
    return user / NAME if user is not None else files.default_data_dir(NAME)


def _fetch(url: str, dest: Path) -> None:
    """Copy ``url`` to the file ``dest`` (tests replace this function; no retries)."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _download(stems: tuple[str, ...], target: Path) -> None:
    """Fetch the missing ``stems`` into ``target``, verifying each before it takes its final name."""
    target.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        if files.find_file(target, stem) is not None:
            continue
        url = f"{DOWNLOAD_URL}{stem}.gz"
        final = target / f"{stem}.gz"
        fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{stem}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            logger.info("downloading %s to %s", url, final)
            _fetch(url, tmp)
            files.check_sha256(read_idx_bytes(tmp), SHA256[stem], f"{url} (downloaded)")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)


def _not_found(split: str, searched: list[Path], download_dir: Path) -> DatasetNotFoundError:
    stems = FILES[split]
    return DatasetNotFoundError(
        f"Fashion-MNIST ({split} split) not found: no directory holds both {stems[0]}[.gz] and "
        f"{stems[1]}[.gz].\n"
        "Provide it in one of three ways:\n"
        "  1. install the Debian/Ubuntu package: apt-get install dataset-fashion-mnist\n"
        f"  2. put the four IDX files in a directory and pass --data-dir DIR (data_dir=DIR) or set "
        f"{files.DATA_DIR_ENV}=DIR (in DIR/{NAME}/ or DIR itself)\n"
        f"  3. allow the download with --download (download=True) or {files.DOWNLOAD_ENV}=1; "
        f"the verified official files go to {download_dir}\n"
        f"Places searched:\n{files.describe_dirs(searched)}"
    )


def load_fashion_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load a Fashion-MNIST split as images ``(N, 1, 28, 28)`` in ``[-1, 1]`` and labels in ``0..9``.

    ``N`` is 60 000 for ``"train"`` and 10 000 for ``"test"`` (fewer from a subset directory). See
    the module docstring for where files are looked for, the download, the integrity check and
    subsets.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: directory holding the files (in ``fashion-mnist/`` or directly); defaults to
            ``$SAMEGUARD_DATA_DIR``.
        download: fetch the official files when they are not found (also enabled by
            ``SAMEGUARD_DOWNLOAD=1``).

    Raises:
        DatasetNotFoundError: the files are nowhere and downloading is not allowed.
        IntegrityError: a file's content does not have the expected SHA-256.
    """
    check_choice(split, "split", SPLITS)
    stems = FILES[split]
    searched = _search_dirs(data_dir)
    found = files.find_files_together(searched, stems)
    if found is None:
        target = _download_dir(data_dir)
        if not files.download_allowed(download):
            raise _not_found(split, searched, target)
        _download(stems, target)
        found = files.find_files_together([target], stems)
        if found is None:  # only if something removed the files meanwhile
            raise _not_found(split, [*searched, target], target)
    expected = _expected_sha256(found[0].parent)
    images, labels = files.load_idx_pair(found[0], found[1], (expected[stems[0]], expected[stems[1]]))
    logger.info("loaded Fashion-MNIST %s split (%d images) from %s", split, len(labels), found[0].parent)
    return ImageDataset(
        name=NAME,
        split=split,
        images=to_model_range(images),
        labels=torch.from_numpy(labels),
        classes=CLASSES,
        hflip=True,
    )
