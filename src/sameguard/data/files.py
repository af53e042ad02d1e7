"""Where dataset files are looked for, and how they are read once and checked.

Every file-based loader searches, in order:

1. the data directory the user names (``data_dir=`` / ``--data-dir``, else the environment
   variable ``SAMEGUARD_DATA_DIR``): first its per-dataset subfolder (``<dir>/fashion-mnist/``,
   ``<dir>/mnist/``, ...), then the directory itself;
2. places specific to the dataset (the Debian package directory for Fashion-MNIST);
3. sameguard's own data directory ``~/.cache/sameguard/data/<dataset>/`` (where downloads go).

Decoded arrays are cached in-process, keyed by path, size and modification time, so a second
load of an unchanged file costs nothing and a changed file is read (and verified) again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sameguard.api import IntegrityError
from sameguard.data.idx import parse_idx, read_idx_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_DIR_ENV",
    "DOWNLOAD_ENV",
    "DEFAULT_DATA_ROOT",
    "user_data_dir",
    "default_data_dir",
    "download_allowed",
    "candidate_dirs",
    "find_file",
    "find_files_together",
    "sha256_hex",
    "check_sha256",
    "cached_read",
    "describe_dirs",
    "read_idx_cached",
    "load_idx_pair",
]

#: Environment variable naming the user's data directory.
DATA_DIR_ENV = "SAMEGUARD_DATA_DIR"
#: Environment variable that allows downloads when set to 1/true/yes/on.
DOWNLOAD_ENV = "SAMEGUARD_DOWNLOAD"
#: sameguard's own data directory (``~`` is expanded when used); tests monkeypatch it.
DEFAULT_DATA_ROOT = "~/.cache/sameguard/data"

_TRUE = {"1", "true", "yes", "on"}


def user_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$SAMEGUARD_DATA_DIR`` if set and non-empty, else ``None``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else None


def default_data_dir(subdir: str) -> Path:
    """``~/.cache/sameguard/data/<subdir>`` (from :data:`DEFAULT_DATA_ROOT`)."""
    return Path(DEFAULT_DATA_ROOT).expanduser() / subdir


def download_allowed(download: bool) -> bool:
    """Whether a download is allowed: ``download=True`` or ``$SAMEGUARD_DOWNLOAD`` set to 1/true."""
    return bool(download) or os.environ.get(DOWNLOAD_ENV, "").strip().lower() in _TRUE


def candidate_dirs(
    data_dir: str | os.PathLike | None, subdirs: Sequence[str], extra: Iterable[Path] = ()
) -> list[Path]:
    """The ordered, de-duplicated directories to search for one dataset.

    ``[user_dir/sub for sub in subdirs, user_dir, *extra, default_data_dir(subdirs[0])]``;
    the user directory entries are left out when neither ``data_dir`` nor the environment
    variable names one. The dataset's own subfolder comes before the directory itself because
    MNIST, KMNIST and Fashion-MNIST use the same file names.
    """
    dirs: list[Path] = []
    user = user_data_dir(data_dir)
    if user is not None:
        dirs.extend(user / s for s in subdirs)
        dirs.append(user)
    dirs.extend(Path(p) for p in extra)
    dirs.append(default_data_dir(subdirs[0]))
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def find_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists first, else ``None``."""
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def find_files_together(dirs: Iterable[Path], stems: Sequence[str]) -> list[Path] | None:
    """The files ``stems`` (each plain or ``.gz``) from the first directory that holds them all."""
    for d in dirs:
        found = [find_file(d, s) for s in stems]
        if all(p is not None for p in found):
            logger.debug("found %s in %s", ", ".join(stems), d)
            return found  # type: ignore[return-value]
    return None


def describe_dirs(dirs: Iterable[Path]) -> str:
    """Directories as an indented bullet list for error messages."""
    return "\n".join(f"  - {d}" for d in dirs)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str, path: str | os.PathLike) -> None:
    """Raise :class:`~sameguard.api.IntegrityError` unless ``sha256(data) == expected``."""
    actual = sha256_hex(data)
    if actual != expected.lower():
        raise IntegrityError(
            f"{path}: SHA-256 of the decompressed content is {actual}, expected {expected}. "
            "The file is corrupt, truncated or not the official release; delete it and provide "
            "the dataset again."
        )


@functools.lru_cache(maxsize=32)
def _cached_call(reader: Callable[..., Any], path: str, size: int, mtime_ns: int, args: tuple) -> Any:
    logger.debug("reading %s", path)
    return reader(Path(path), *args)


def cached_read(reader: Callable[..., Any], path: str | os.PathLike, *args: Any) -> Any:
    """``reader(path, *args)``, remembered while the file's size and modification time stay the same.

    ``args`` must be hashable. The result is shared between callers: readers should return
    read-only numpy arrays (``arr.flags.writeable = False``) and callers must copy before
    changing them.
    """
    path = Path(path).resolve()
    st = path.stat()
    return _cached_call(reader, str(path), st.st_size, st.st_mtime_ns, tuple(args))


def _read_idx_checked(path: Path, expected_sha256: str | None) -> np.ndarray:
    data = read_idx_bytes(path)
    if expected_sha256 is not None:
        check_sha256(data, expected_sha256, path)
    arr = parse_idx(data, source=str(path))
    arr.flags.writeable = False
    return arr


def read_idx_cached(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read-only array of the IDX file ``path``, checked against ``sha256`` of its payload if given.

    The check runs whenever the file is (re)read, i.e. on the first load and after any change
    to the file; the decoded array is then served from the in-process cache.
    """
    return cached_read(_read_idx_checked, path, sha256)


def load_idx_pair(
    images_path: Path,
    labels_path: Path,
    sha256: tuple[str | None, str | None] = (None, None),
) -> tuple[np.ndarray, np.ndarray]:
    """An images file ``uint8 (N, H, W)`` and its labels file ``(N,)``, checked for consistency.

    Returns the (read-only, cached) image array and the labels as a new ``int64`` array.
    """
    images = read_idx_cached(images_path, sha256[0])
    labels = read_idx_cached(labels_path, sha256[1])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}."
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}."
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels."
        )
    return images, labels.astype(np.int64)
