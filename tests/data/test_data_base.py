from __future__ import annotations

import pytest
import torch

from sameguard.data import ImageDataset


def make(n: int = 10, num_classes: int = 3) -> ImageDataset:
    images = torch.linspace(-1, 1, n * 2 * 2).reshape(n, 1, 2, 2)
    labels = torch.arange(n) % num_classes
    return ImageDataset("toy", "train", images, labels, tuple("abc"[:num_classes]), hflip=False)


def test_properties():
    ds = make()
    assert (len(ds), ds.num_classes, ds.image_shape) == (10, 3, (1, 2, 2))
    assert "n=10" in repr(ds)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), "float32"),
        (torch.zeros(2, 2, 2), torch.zeros(2, dtype=torch.int64), r"\(N, C, H, W\)"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int32), "int64"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(3, dtype=torch.int64), "disagree"),
        (torch.full((2, 1, 2, 2), 1.5), torch.zeros(2, dtype=torch.int64), r"\[-1, 1\]"),
        (torch.full((2, 1, 2, 2), float("nan")), torch.zeros(2, dtype=torch.int64), "NaN"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([0, 3]), r"\[0, 3\)"),
        (torch.zeros(2, 1, 2, 2), torch.tensor([-1, 0]), r"\[0, 3\)"),
    ],
)
def test_validation(images, labels, match):
    with pytest.raises(ValueError, match=match):
        ImageDataset("toy", "train", images, labels, ("a", "b", "c"), hflip=False)


def test_classes_must_be_a_tuple_of_strings():
    with pytest.raises(ValueError, match="classes"):
        ImageDataset("toy", "train", torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.int64), ["a"], False)


def test_subset():
    ds = make()
    sub = ds.subset([3, 1, 3])
    assert torch.equal(sub.labels, torch.tensor([0, 1, 0]))
    assert torch.equal(sub.images[0], ds.images[3])
    assert (sub.classes, sub.name) == (ds.classes, "toy")
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ds.subset([10])
    with pytest.raises(ValueError, match="integer"):
        ds.subset(torch.tensor([0.5]))


def test_take_is_deterministic_and_distinct():
    ds = make(50)
    a, b, c = ds.take(20, seed=1), ds.take(20, seed=1), ds.take(20, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    flat = a.images.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 20
    assert (len(ds.take(0, seed=0)), len(ds.take(50, seed=0))) == (0, 50)
    with pytest.raises(ValueError, match="at most 50"):
        ds.take(51, seed=0)


def test_split_off():
    ds = make(40)
    rest, part = ds.split_off(0.25, seed=0)
    assert (len(part), len(rest)) == (10, 30)
    key = lambda d: {float(v) for v in d.images[:, 0, 0, 0]}  # noqa: E731 - first pixel is unique
    assert key(rest).isdisjoint(key(part))
    assert key(rest) | key(part) == key(ds)
    rest2, part2 = ds.split_off(0.25, seed=0)
    assert torch.equal(part.images, part2.images)
    assert torch.equal(rest.images, rest2.images)
    _, part3 = ds.split_off(0.25, seed=1)
    assert not torch.equal(part.images, part3.images)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            ds.split_off(bad, seed=0)
    with pytest.raises(ValueError, match="empty part"):
        make(3).split_off(0.1, seed=0)
