"""Request bodies to image batches, without the app: JSON arrays, base64 float32, PNG files."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi import HTTPException
from PIL import Image

from sameguard.service.decoding import check_batch_size, decode_b64, decode_instances, decode_json, decode_png

SHAPE = (1, 4, 3)  # (C, H, W): small and not square, so height and width cannot be swapped unnoticed


def _x(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *SHAPE, generator=g) * 2 - 1


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("encoding", ["instances", "b64"])
def test_service_decoding_json_round_trips_float32(encoding):
    x = _x()
    if encoding == "instances":
        body = {"instances": x.tolist(), "output": "labels"}
    else:
        body = {"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), "shape": list(x.shape),
                "output": "labels"}
    images, output = decode_json(json.dumps(body).encode(), SHAPE, max_batch=8)
    assert output == "labels"
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, x, atol=0, rtol=0)  # float32 -> JSON / bytes -> float32 is exact


@pytest.mark.parametrize(("raw", "status", "phrase"), [
    (b'{"instances": [1, 2', 400, "line 1 column"),
    (b"{\"a\": \"\x80\"}", 400, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"output": "labels"}', 422, "exactly one"),
    (b'{"instances": [], "temperature": 2}', 422, "Extra inputs"),
])
def test_service_decoding_json_errors(raw, status, phrase):
    with pytest.raises(HTTPException) as error:
        decode_json(raw, SHAPE, max_batch=8)
    assert error.value.status_code == status
    assert phrase in error.value.detail


@pytest.mark.parametrize(("b64", "shape", "status", "phrase"), [
    ("not base64!", [1, 1, 4, 3], 422, "base64"),
    (base64.b64encode(b"\x00" * 48).decode(), [2, 1, 4, 3], 422, "bytes"),
    ("", [1, 1, 3, 4], 422, "shape must be (N, 1, 4, 3)"),
    ("", [9, 1, 4, 3], 413, "at most 8"),
])
def test_service_decoding_b64_errors(b64, shape, status, phrase):
    with pytest.raises(HTTPException) as error:
        decode_b64(b64, shape, SHAPE, max_batch=8)
    assert error.value.status_code == status
    assert phrase in error.value.detail


@pytest.mark.parametrize(("instances", "status", "phrase"), [
    ([[[[0.0] * 3] * 4], [[[0.0] * 2] * 4]], 422, "rectangular"),
    ([[[["0.5"] * 3] * 4]], 422, "numbers"),
    ([[[[0.0] * 3] * 4]] * 9, 413, "at most 8"),
])
def test_service_decoding_instances_errors(instances, status, phrase):
    with pytest.raises(HTTPException) as error:
        decode_instances(instances, SHAPE, max_batch=8)
    assert error.value.status_code == status
    assert phrase in error.value.detail


@pytest.mark.parametrize(("channels", "mode_shape"), [(1, (4, 3)), (3, (4, 3, 3))])
def test_service_decoding_png_converts_to_the_model_channels(channels, mode_shape):
    pixels = np.arange(12, dtype=np.uint8).reshape(4, 3) * 20
    out = decode_png(_png(pixels), (channels, 4, 3))
    assert out.shape == mode_shape and out.dtype == np.uint8
    if channels == 1:
        assert np.array_equal(out, pixels)  # integers: exact


@pytest.mark.parametrize(("data", "phrase"), [
    (_png(np.zeros((3, 4), dtype=np.uint8)), "is 4x3 pixels; the model expects 3x4"),
    (_png(np.zeros((4, 3), dtype=np.uint8), fmt="GIF"), "is GIF, not PNG"),
    (b"GIF89a not really", "not a readable PNG"),
])
def test_service_decoding_png_errors(data, phrase):
    with pytest.raises(HTTPException) as error:
        decode_png(data, SHAPE, name="'images' item 0")
    assert error.value.status_code == 422
    assert phrase in error.value.detail


@pytest.mark.parametrize(("n", "refused"), [(8, False), (9, True)])
def test_service_decoding_batch_size_limit(n, refused):
    if refused:
        with pytest.raises(HTTPException) as error:
            check_batch_size(n, 8)
        assert error.value.status_code == 413
    else:
        check_batch_size(n, 8)
