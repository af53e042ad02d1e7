from __future__ import annotations

import pytest

from sameguard.api import DatasetNotFoundError
from sameguard.data import DATASETS, available_datasets, load_dataset


def test_names():
    assert available_datasets() == [
        "fashion-mnist", "digits", "mnist", "kmnist", "emnist-digits", "emnist-letters", "cifar10", "cifar100",
    ]
    assert all(spec.name == name for name, spec in DATASETS.items())
    assert [n for n, s in DATASETS.items() if not s.needs_files] == ["digits"]
    assert [n for n, s in DATASETS.items() if s.can_download] == ["fashion-mnist"]


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="dataset must be one of 'fashion-mnist', 'digits'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
        load_dataset("digits", "val")


def test_loaded_shapes_match_the_specs(tmp_path, write_mnist_like):
    ds = load_dataset("digits", "test", download=True)
    assert ds.image_shape == DATASETS["digits"].image_shape and len(ds) == 359
    write_mnist_like(tmp_path / "kmnist")
    ds = load_dataset("kmnist", "test", data_dir=str(tmp_path))
    assert ds.image_shape == DATASETS["kmnist"].image_shape == (1, 28, 28)


def test_files_missing(tmp_path):
    for name in ("mnist", "kmnist", "emnist-digits", "emnist-letters", "cifar10", "cifar100", "fashion-mnist"):
        with pytest.raises(DatasetNotFoundError):
            load_dataset(name, "test", data_dir=tmp_path)
