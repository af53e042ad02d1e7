"""The validation anomalies used to choose SAME's default: shapes, ranges, exact transforms."""

from __future__ import annotations

import pytest
import torch

from sameguard.bench.validation_anomalies import (VALIDATION_KINDS, gaussian_blur, shuffle_patches,
                                                  validation_anomalies)


def images(n=6, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_every_kind_has_the_held_out_shape_and_range():
    x = images()
    sets = validation_anomalies(x, seed=1)
    assert tuple(sets) == VALIDATION_KINDS
    for name, a in sets.items():
        assert a.shape == x.shape, name
        assert float(a.min()) >= -1 and float(a.max()) <= 1, name
    torch.testing.assert_close(sets["inverted"], -x)
    assert torch.equal(validation_anomalies(x, seed=1)["uniform noise"], sets["uniform noise"])  # seeded


def test_blur_keeps_constants_and_smooths_a_spike():
    flat = torch.full((1, 1, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.0), flat)
    spike = torch.full((1, 1, 9, 9), -1.0)
    spike[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(spike, 1.0)
    assert float(blurred[0, 0, 4, 4]) < 1.0 and float(blurred[0, 0, 4, 5]) > -1.0


def test_shuffled_patches_are_a_permutation_of_the_tiles():
    x = images(2)
    y = shuffle_patches(x, grid=4, seed=3)
    tiles = lambda t: sorted(tuple(p.flatten().tolist()) for p in t.unfold(0, 2, 2).unfold(1, 2, 2).reshape(-1, 4))
    for i in range(2):
        assert tiles(x[i, 0]) == tiles(y[i, 0])
    assert not torch.equal(x, y)
    with pytest.raises(ValueError, match="grid"):
        shuffle_patches(torch.zeros(1, 1, 9, 9), grid=4)
