"""Reader and writer for the IDX format of MNIST, Fashion-MNIST, KMNIST and EMNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
``uint32`` dimension sizes, then the values in row-major order, big-endian. Files may be
gzip-compressed (detected from the content, whatever the file name says).

Dtype codes: ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
``0x0E`` float64.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MNIST_FILE_NAMES", "read_idx", "read_idx_bytes", "parse_idx", "write_idx"]

#: split -> (images file, labels file) as named by MNIST, Fashion-MNIST and KMNIST (each may
#: also be stored with a ``.gz`` suffix).
MNIST_FILE_NAMES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_GZIP_MAGIC = b"\x1f\x8b"

#: IDX dtype code -> big-endian numpy dtype.
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_TO_CODE: dict[tuple[str, int], int] = {
    (d.kind, d.itemsize): code for code, d in _CODE_TO_DTYPE.items()
}


def read_idx_bytes(path: str | os.PathLike) -> bytes:
    """The IDX payload of ``path``: the file's bytes, decompressed when it is gzip data.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file looks like gzip but cannot be decompressed (names the file).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc}).") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an uncompressed IDX payload into a native-endian numpy array.

    Args:
        data: the IDX bytes (header and values).
        source: file name used in error messages.

    Raises:
        ValueError: bad magic number, unknown dtype code, or a size that does not match the
            header (truncated file or trailing bytes); the message names ``source``.
    """
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file (only {len(data)} bytes, no 4-byte magic number).")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(
            f"{source}: not an IDX file (magic number {data[:4].hex()} does not start with 0000)."
        )
    if code not in _CODE_TO_DTYPE:
        raise ValueError(f"{source}: unknown IDX dtype code 0x{code:02X} in magic number {data[:4].hex()}.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, expected {header}).")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _CODE_TO_DTYPE[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX file {kind}: header says shape {dims} of {dtype.name} "
            f"({expected} bytes of data), found {actual} bytes."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a native-endian numpy array of the stored shape.

    Example: ``read_idx("train-images-idx3-ubyte.gz")`` -> ``uint8 (60000, 28, 28)``.
    """
    return parse_idx(read_idx_bytes(path), source=str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64; at most 255 dimensions.
    The gzip header carries no timestamp, so equal arrays give byte-identical files.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    array = np.asarray(array)
    code = _KIND_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"write_idx supports uint8, int8, int16, int32, float32 and float64 arrays, got {array.dtype}."
        )
    if array.ndim < 1 or array.ndim > 255:
        raise ValueError(f"write_idx needs an array with 1 to 255 dimensions, got {array.ndim}.")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
