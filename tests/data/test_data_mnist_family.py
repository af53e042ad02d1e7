from __future__ import annotations

import numpy as np
import pytest
import torch

from sameguard.api import DatasetNotFoundError
from sameguard.data import files, load_emnist, load_kmnist, load_mnist, write_idx


def write_emnist(directory, variant, split, images, labels, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    # the official files store each image transposed
    write_idx(directory / f"emnist-{variant}-{split}-images-idx3-ubyte{suffix}", images.transpose(0, 2, 1))
    write_idx(directory / f"emnist-{variant}-{split}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))


def test_emnist_is_transposed_back_and_letters_are_shifted(tmp_path):
    upright = np.zeros((3, 28, 28), dtype=np.uint8)
    upright[:, 2, 5] = 255  # one bright pixel: row 2, column 5
    upright[:, 2:20, 3] = 128  # a vertical stroke
    write_emnist(tmp_path / "emnist", "letters", "train", upright, np.array([1, 26, 5]))
    ds = load_emnist("train", variant="letters", data_dir=tmp_path)
    assert (ds.name, ds.num_classes, ds.hflip) == ("emnist-letters", 26, False)
    assert torch.equal(ds.labels, torch.tensor([0, 25, 4]))
    assert (ds.classes[0], ds.classes[25]) == ("A", "Z")
    assert (ds.images[0, 0, 2, 5].item(), ds.images[0, 0, 5, 2].item()) == (1.0, -1.0)
    assert (ds.images[:, 0, 2:20, 3] > 0).all()


def test_emnist_digits_in_official_gzip_folder(tmp_path, monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    write_emnist(tmp_path / "emnist" / "gzip", "digits", "test", images, np.array([3, 9]), gz=False)
    monkeypatch.setenv(files.DATA_DIR_ENV, str(tmp_path))
    ds = load_emnist("test")
    assert (ds.name, ds.classes) == ("emnist-digits", tuple("0123456789"))
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(images).float() * 2 / 255 - 1, rtol=0, atol=1e-6)


def test_emnist_letters_with_label_zero_is_refused(tmp_path):
    write_emnist(tmp_path, "letters", "test", np.zeros((2, 28, 28), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match="1..26"):
        load_emnist("test", variant="letters", data_dir=tmp_path)


def test_mnist_and_kmnist(tmp_path, write_mnist_like):
    mnist = write_mnist_like(tmp_path / "mnist", seed=1, gz=False)
    kmnist = write_mnist_like(tmp_path, seed=2)  # directly in the data dir
    m = load_mnist("test", data_dir=tmp_path)
    k = load_kmnist("train", data_dir=tmp_path)
    assert (m.name, m.images.shape) == ("mnist", (4, 1, 28, 28))
    assert torch.equal(m.labels, torch.from_numpy(mnist["test_labels"].astype(np.int64)))
    assert (k.name, len(k), k.num_classes) == ("kmnist", 6, 10)
    assert torch.equal(k.labels, torch.from_numpy(kmnist["train_labels"].astype(np.int64)))


def test_missing_mnist_says_which_files_go_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist("train", data_dir=tmp_path)
    msg = str(info.value)
    for needle in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "DIR/mnist/", "--data-dir",
        "SAMEGUARD_DATA_DIR", "does not download", str(tmp_path / "mnist"),
    ):
        assert needle in msg, needle


def test_missing_emnist_without_data_dir(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="No data directory was given") as info:
        load_emnist("test", variant="balanced")
    assert "emnist-balanced-test-images-idx3-ubyte" in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        load_emnist("train", variant="bogus")
    with pytest.raises(ValueError, match="split"):
        load_kmnist("val")
