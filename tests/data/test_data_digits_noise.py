from __future__ import annotations

import pytest
import torch

from sameguard.data import digits as digits_module
from sameguard.data import load_digits, uniform_noise
from sameguard.data.digits import split_indices


def test_digits_shape_range_and_layout():
    ds = load_digits("train")
    assert (ds.name, ds.hflip, ds.num_classes) == ("digits", False, 10)
    assert (ds.images.shape, ds.images.dtype) == ((1438, 1, 28, 28), torch.float32)
    assert (ds.images.min().item(), ds.images.max().item()) == (-1.0, 1.0)
    # digit in the central 20x20 box, background -1 around it
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert (ds.images[:, 0, border] == -1.0).all()
    assert (ds.images[:, 0, 4:24, 4:24] > -1.0).flatten(1).any(1).all()
    assert torch.equal(torch.unique(ds.labels), torch.arange(10))


def test_digits_splits_are_fixed_disjoint_and_complete():
    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1438, 359)
    again = load_digits("test")
    assert torch.equal(test.images, again.images) and torch.equal(test.labels, again.labels)
    i_train, i_test = split_indices("train"), split_indices("test")
    assert set(i_train.tolist()).isdisjoint(i_test.tolist())
    assert sorted(i_train.tolist() + i_test.tolist()) == list(range(1797))
    all_images, all_labels = digits_module._all_digits()
    assert torch.equal(test.images, all_images[torch.from_numpy(i_test)])
    assert torch.equal(train.labels, all_labels[torch.from_numpy(i_train)])
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


def test_uniform_noise():
    x = uniform_noise(5, (3, 4, 6), seed=1)
    assert (x.shape, x.dtype) == ((5, 3, 4, 6), torch.float32)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.4
    assert torch.equal(x, uniform_noise(5, (3, 4, 6), seed=1))
    assert not torch.equal(x, uniform_noise(5, (3, 4, 6), seed=2))
    assert uniform_noise(2).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="shape"):
        uniform_noise(2, (28, 28))
    with pytest.raises(ValueError, match="at least 0"):
        uniform_noise(-1)
