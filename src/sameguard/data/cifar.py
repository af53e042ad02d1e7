"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the files the user provides (no download).

Both official releases are understood; the binary one is preferred when both are present:

=========  ===========================================  ===============================================
dataset    binary version                               python version
=========  ===========================================  ===============================================
CIFAR-10   ``cifar-10-batches-bin/data_batch_{1..5}.bin``  ``cifar-10-batches-py/data_batch_{1..5}``,
           ``test_batch.bin`` (1 label byte + 3072)      ``test_batch`` (pickled dicts)
CIFAR-100  ``cifar-100-binary/train.bin``, ``test.bin``     ``cifar-100-python/train``, ``test``, ``meta``
           (coarse + fine label bytes + 3072),
           ``fine_label_names.txt``
=========  ===========================================  ===============================================

These folders are looked for in the user's data directory (``data_dir=`` / ``--data-dir``, else
``$SAMEGUARD_DATA_DIR``) and its ``cifar10/`` or ``cifar100/`` subfolder, and in
``~/.cache/sameguard/data/cifar10/`` (resp. ``cifar100/``); ``data_dir`` may also point at one of
the folders above itself. CIFAR-100 uses the 100 fine labels.

The python version is a set of pickles. They are read by :class:`NumpyOnlyUnpickler`, which
resolves only the few numpy globals needed to rebuild an array and refuses every other global
(a pickle can otherwise run arbitrary code when it is read) with
:class:`~sameguard.api.ArtifactError`, before anything is called.

Images are ``(N, 3, 32, 32)`` in ``[-1, 1]`` (see :mod:`sameguard.data.transforms`), ``hflip=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sameguard.api import ArtifactError, DatasetNotFoundError
from sameguard.data import files
from sameguard.data.base import SPLITS, ImageDataset
from sameguard.data.transforms import to_model_range
from sameguard.validation import check_choice

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.numeric import _frombuffer as _np_frombuffer

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "NumpyOnlyUnpickler",
    "read_numpy_pickle",
    "load_cifar10",
    "load_cifar100",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_PIXELS = 3 * 32 * 32


# --------------------------------------------------------------------------- restricted unpickler


def _safe_dtype(spec: Any, *args: Any) -> np.dtype:
    dtype = np.dtype(spec, *args)
    if dtype.hasobject:
        raise ArtifactError(f"Refusing a pickled numpy dtype that holds Python objects ({dtype}).")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise ArtifactError(f"Refusing _codecs.encode with encoding {encoding!r} in a pickle (latin1 only).")
    return text.encode("latin1", errors)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, lists, dicts, strings and numbers, and nothing else.

    :meth:`find_class` maps the few globals that numpy array pickles reference (under their
    numpy 1 and numpy 2 module names) to safe callables and raises
    :class:`~sameguard.api.ArtifactError` for any other global, so a malicious pickle is refused
    before any of its code runs. Object dtypes are refused too.

    Use: ``NumpyOnlyUnpickler(file, encoding="bytes").load()``, or :func:`read_numpy_pickle`.
    """

    ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise ArtifactError(
                f"Refusing to load the global {module}.{name} from a pickle: only numpy array "
                "reconstruction is allowed in dataset files."
            ) from None


def read_numpy_pickle(path: str | os.PathLike) -> Any:
    """Read a pickle of numpy arrays and plain containers with :class:`NumpyOnlyUnpickler`.

    Byte strings written by Python 2 (as in the official CIFAR files) stay ``bytes``
    (``encoding="bytes"``), so the CIFAR dictionaries have keys like ``b"data"``.

    Raises:
        ArtifactError: the pickle references a forbidden global or is malformed (names the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, encoding="bytes").load()
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ArtifactError(f"{path}: not a readable pickle of numpy arrays ({exc!r}).") from exc


# --------------------------------------------------------------------------- file readers


def _read_binary_batch(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes; the last label byte is used."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path}: size {raw.size} bytes is not a positive multiple of the {record}-byte CIFAR "
            "record; the file is truncated or not a CIFAR binary batch."
        )
    rec = raw.reshape(-1, record)
    images = rec[:, label_bytes:].reshape(-1, 3, 32, 32)
    labels = rec[:, label_bytes - 1].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _field(batch: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def _read_python_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = read_numpy_pickle(path)
    try:
        if not isinstance(batch, dict):
            raise TypeError(f"expected a dict, got {type(batch).__name__}")
        data = np.asarray(_field(batch, "data"))
        labels = np.asarray(_field(batch, label_key), dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a CIFAR python batch ({exc}).") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ArtifactError(
            f"{path}: expected uint8 data of shape (N, {_PIXELS}), got {data.dtype} {data.shape}."
        )
    if labels.shape != (data.shape[0],):
        raise ArtifactError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}.")
    images = data.reshape(-1, 3, 32, 32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _read_names_txt(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _read_names_pickle(path: Path, key: str) -> tuple[str, ...]:
    meta = read_numpy_pickle(path)
    try:
        names = _field(meta, key)
    except (KeyError, TypeError):
        raise ArtifactError(f"{path}: no {key!r} list in this CIFAR meta file.") from None
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """One release format of one dataset: its folder, batch files and how to read them."""

    folder: str
    files: dict[str, tuple[str, ...]]
    read: Callable[[Path], tuple[np.ndarray, np.ndarray]]
    names_file: str | None = None
    read_names: Callable[[Path], tuple[str, ...]] | None = None


def _binary(label_bytes: int) -> Callable[[Path], tuple[np.ndarray, np.ndarray]]:
    return lambda p: files.cached_read(_read_binary_batch, p, label_bytes)


def _python(label_key: str) -> Callable[[Path], tuple[np.ndarray, np.ndarray]]:
    return lambda p: files.cached_read(_read_python_batch, p, label_key)


_CIFAR10_LAYOUTS = (
    _Layout(
        folder="cifar-10-batches-bin",
        files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        read=_binary(1),
    ),
    _Layout(
        folder="cifar-10-batches-py",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        read=_python("labels"),
    ),
)

_CIFAR100_LAYOUTS = (
    _Layout(
        folder="cifar-100-binary",
        files={"train": ("train.bin",), "test": ("test.bin",)},
        read=_binary(2),
        names_file="fine_label_names.txt",
        read_names=_read_names_txt,
    ),
    _Layout(
        folder="cifar-100-python",
        files={"train": ("train",), "test": ("test",)},
        read=_python("fine_labels"),
        names_file="meta",
        read_names=lambda p: _read_names_pickle(p, "fine_label_names"),
    ),
)


def _load(
    name: str,
    title: str,
    split: str,
    layouts: tuple[_Layout, ...],
    data_dir: str | os.PathLike | None,
    default_classes: tuple[str, ...],
) -> ImageDataset:
    check_choice(split, "split", SPLITS)
    searched: list[Path] = []
    for base in files.candidate_dirs(data_dir, [name]):
        # the release folders inside ``base`` first, then ``base`` as such a folder itself
        candidates = [(base / lay.folder, lay) for lay in layouts] + [(base, lay) for lay in layouts]
        for folder, layout in candidates:
            if folder not in searched:
                searched.append(folder)
            paths = [folder / f for f in layout.files[split]]
            if all(p.is_file() for p in paths):
                return _build(name, title, split, layout, folder, paths, default_classes)
    user = files.user_data_dir(data_dir)
    given = (
        f"The data directory is {user}."
        if user is not None
        else f"No data directory was given (data_dir= / --data-dir, or {files.DATA_DIR_ENV})."
    )
    formats = ", or ".join(
        f"{layout.folder}/ with {', '.join(layout.files[split])}" for layout in layouts
    )
    raise DatasetNotFoundError(
        f"{title} ({split} split) not found. Extract the official archive into a directory DIR "
        f"(or DIR/{name}/) so that it holds {formats}; then pass --data-dir DIR (data_dir=DIR) "
        f"or set {files.DATA_DIR_ENV}=DIR. {given}\n"
        f"sameguard does not download {title}: there are no published checksums it could verify.\n"
        f"Places searched:\n{files.describe_dirs(searched)}"
    )


def _build(
    name: str,
    title: str,
    split: str,
    layout: _Layout,
    folder: Path,
    paths: list[Path],
    default_classes: tuple[str, ...],
) -> ImageDataset:
    parts = [layout.read(p) for p in paths]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1].copy()
    classes = default_classes
    if layout.names_file is not None and layout.read_names is not None:
        names_path = folder / layout.names_file
        if names_path.is_file():
            classes = layout.read_names(names_path)
        else:
            logger.warning("%s not found; using generic class names", names_path)
    logger.info("loaded %s %s split (%d images) from %s", title, split, len(labels), folder)
    return ImageDataset(
        name=name,
        split=split,
        images=to_model_range(images, channels_first=True),
        labels=torch.from_numpy(labels),
        classes=tuple(classes),
        hflip=True,
    )


def load_cifar10(split: str = "train", *, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """CIFAR-10: ``(N, 3, 32, 32)`` in ``[-1, 1]``, labels ``0..9`` (50 000 train, 10 000 test).

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: directory holding ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``
            (under ``cifar10/`` or directly), or one of those folders; defaults to
            ``$SAMEGUARD_DATA_DIR``.

    Raises:
        DatasetNotFoundError: no searched place holds the files (the message says which).
        ArtifactError: a python-version file is malformed or references a forbidden global.
    """
    return _load("cifar10", "CIFAR-10", split, _CIFAR10_LAYOUTS, data_dir, CIFAR10_CLASSES)


def load_cifar100(split: str = "train", *, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """CIFAR-100 with its 100 fine labels: ``(N, 3, 32, 32)`` in ``[-1, 1]``, labels ``0..99``.

    Class names come from ``fine_label_names.txt`` (binary version) or ``meta`` (python
    version) when present, else ``"class_0"`` .. ``"class_99"``. See :func:`load_cifar10` for
    ``data_dir``; the folders are ``cifar-100-binary/`` and ``cifar-100-python/`` (or ``cifar100/``).
    """
    return _load(
        "cifar100", "CIFAR-100", split, _CIFAR100_LAYOUTS, data_dir,
        tuple(f"class_{i}" for i in range(100)),
    )
