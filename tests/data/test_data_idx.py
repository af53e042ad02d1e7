from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from sameguard.data import parse_idx, read_idx, write_idx


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip_is_exact(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, arr)


def test_header_layout_is_big_endian_mnist_style(tmp_path):
    path = write_idx(tmp_path / "labels-idx1-ubyte", np.array([7, 1, 255], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 1, 255])
    path = write_idx(tmp_path / "x-idx1", np.array([1], dtype=np.int32))
    assert path.read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 0, 1])


def test_gzip_is_detected_from_content_and_deterministic(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    a = write_idx(tmp_path / "a.gz", arr)
    b = write_idx(tmp_path / "b.gz", arr)
    assert a.read_bytes() == b.read_bytes()  # no timestamp in the gzip header
    plain_named = tmp_path / "c-no-suffix"
    plain_named.write_bytes(a.read_bytes())
    np.testing.assert_array_equal(read_idx(plain_named), arr)


def test_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="bad-magic.*magic number"):
        read_idx(path)


def test_unknown_dtype_code(tmp_path):
    path = tmp_path / "bad-code"
    path.write_bytes(b"\x00\x00\x0a\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="bad-code.*dtype code 0x0A"):
        read_idx(path)


def test_truncated_and_trailing_data(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((2, 3), dtype=np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(good[:-1])
    (tmp_path / "long").write_bytes(good + b"\x00")
    (tmp_path / "header").write_bytes(good[:6])
    with pytest.raises(ValueError, match="short.*truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="long.*trailing"):
        read_idx(tmp_path / "long")
    with pytest.raises(ValueError, match="header.*truncated IDX header"):
        read_idx(tmp_path / "header")
    with pytest.raises(ValueError, match="<bytes>"):
        parse_idx(b"\x00\x00")


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(write_idx(tmp_path / "p", np.arange(1000, dtype=np.int32)).read_bytes())
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gz.*gzip"):
        read_idx(path)


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))
