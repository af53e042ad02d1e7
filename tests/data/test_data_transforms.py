from __future__ import annotations

import numpy as np
import pytest
import torch

from sameguard.data import (
    adapt_to,
    augment,
    grayscale_to_rgb,
    pad_to,
    resize,
    rgb_to_grayscale,
    to_model_range,
    to_uint8,
)


def test_model_range_values_and_round_trip():
    p = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = to_model_range(p)
    assert (x.dtype, x.shape) == (torch.float32, (1, 1, 16, 16))
    assert (x.min().item(), x.max().item()) == (-1.0, 1.0)  # the ends are exact
    expected = 2 * torch.arange(256, dtype=torch.float64) / 255 - 1
    torch.testing.assert_close(x.flatten().double(), expected, rtol=0, atol=1e-7)
    back = to_uint8(x)
    assert (back.dtype, back.shape) == (np.uint8, (1, 16, 16, 1))
    np.testing.assert_array_equal(back[..., 0], p)


def test_model_range_layouts():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    x = to_model_range(hwc)
    assert x.shape == (2, 3, 5, 7)
    assert x[1, 2, 4, 6].item() == pytest.approx(2 * float(hwc[1, 4, 6, 2]) / 255 - 1, abs=1e-7)
    chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    assert torch.equal(to_model_range(chw, channels_first=True), x)
    np.testing.assert_array_equal(to_uint8(x), hwc)


def test_model_range_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(np.zeros((1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_model_range(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))


def test_resize_and_pad():
    x = torch.full((2, 1, 8, 8), 0.5)
    y = resize(x, 20)
    assert y.shape == (2, 1, 20, 20)
    assert torch.allclose(y, torch.full_like(y, 0.5))
    assert resize(x, (8, 8)) is x
    assert resize(torch.ones(1, 3, 32, 32), (28, 30)).shape == (1, 3, 28, 30)
    p = pad_to(x, (11, 12))
    assert p.shape == (2, 1, 11, 12)
    # margins 3 rows (1 top, 2 bottom) and 4 columns (2 left, 2 right)
    assert torch.equal(p[:, :, 1:9, 2:10], x)
    assert (p[:, :, 0] == -1).all() and (p[:, :, 9:] == -1).all()
    assert (p[..., :2] == -1).all() and (p[..., 10:] == -1).all()
    with pytest.raises(ValueError, match="shrink"):
        pad_to(x, 4)
    with pytest.raises(ValueError, match="size"):
        resize(x, 0)


def test_channel_conversions():
    g = torch.rand(2, 1, 4, 4) * 2 - 1
    rgb = grayscale_to_rgb(g)
    assert rgb.shape == (2, 3, 4, 4) and torch.equal(rgb[:, 2:], g)
    assert torch.allclose(rgb_to_grayscale(rgb), g, atol=1e-6)
    red = torch.full((1, 3, 1, 1), -1.0)
    red[:, 0] = 1.0  # pure red: luma 0.299 -> pixel 76.2 -> x = 2 * 0.299 - 1
    assert torch.allclose(rgb_to_grayscale(red), torch.tensor(2 * 0.299 - 1))
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_grayscale(g)


def test_adapt_to():
    cifar_like = torch.rand(3, 3, 32, 32) * 2 - 1
    out = adapt_to(cifar_like, (1, 28, 28))
    assert out.shape == (3, 1, 28, 28) and out.min() >= -1 and out.max() <= 1
    grey = torch.rand(3, 1, 28, 28) * 2 - 1
    up = adapt_to(grey, (3, 32, 32))
    assert up.shape == (3, 3, 32, 32) and torch.equal(up[:, 0], up[:, 1])
    assert adapt_to(grey, (1, 28, 28)) is grey
    with pytest.raises(ValueError, match="1 and 3 channels"):
        adapt_to(grey, (2, 28, 28))


def _images(n: int = 64) -> torch.Tensor:
    # distinct, left-right asymmetric images
    return torch.linspace(-1, 1, n * 1 * 6 * 6).reshape(n, 1, 6, 6)


def test_augment_is_deterministic_and_pure():
    x = _images()
    before = x.clone()
    a = augment(x, torch.Generator().manual_seed(3), crop_padding=2, hflip=True)
    b = augment(x, torch.Generator().manual_seed(3), crop_padding=2, hflip=True)
    c = augment(x, torch.Generator().manual_seed(4), crop_padding=2, hflip=True)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)


def test_augment_identity_without_crop_or_flip():
    x = _images()
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), crop_padding=0), x)


def test_augment_flip_is_exact_and_per_image():
    x = _images()
    out = augment(x, torch.Generator().manual_seed(0), crop_padding=0, hflip=True)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())  # every image is exactly one of the two
    assert 10 < int(flipped.sum()) < 54  # about half of 64


def test_augment_crop_is_a_shifted_window_with_black_border():
    x = _images(32)
    p = 2
    out = augment(x, torch.Generator().manual_seed(1), crop_padding=p)
    padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
    offsets = []
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert matches, f"image {i} is not a crop of its padded version"
        offsets.append(matches[0])
    assert len(set(offsets)) > 5  # offsets vary from image to image


def test_augment_rejects_bad_arguments():
    x = _images(2)
    with pytest.raises(ValueError, match="Generator"):
        augment(x, 0)
    with pytest.raises(ValueError, match="crop_padding"):
        augment(x, torch.Generator(), crop_padding=-1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment(x[0], torch.Generator())
