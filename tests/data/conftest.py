"""Fixtures for the data tests: an isolated environment and writers of tiny dataset files."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sameguard.data import fashion_mnist, files
from sameguard.data.idx import MNIST_FILE_NAMES, write_idx


@pytest.fixture(autouse=True)
def isolated_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user data dir, no download permission, an empty Debian dir and cache, and no network."""
    monkeypatch.delenv(files.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(files.DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(files, "DEFAULT_DATA_ROOT", str(tmp_path / "cache-root"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian-fashion-mnist")

    def no_network(url: str, dest: Path) -> None:
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(fashion_mnist, "_fetch", no_network)


def payload_sha256(path: Path) -> str:
    """SHA-256 of the decompressed content of an IDX file written by the fixtures."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return hashlib.sha256(data).hexdigest()


MnistWriter = Callable[..., dict[str, np.ndarray]]


@pytest.fixture
def write_mnist_like() -> MnistWriter:
    """``write(directory, seed=0, n_train=6, n_test=4, gz=True, num_classes=10)`` -> arrays.

    Writes the four MNIST-named IDX files of random 28x28 uint8 images and labels and returns
    ``{"train_images", "train_labels", "test_images", "test_labels", "sha256": {stem: hex}}``.
    """

    def write(
        directory: Path, seed: int = 0, n_train: int = 6, n_test: int = 4, gz: bool = True,
        num_classes: int = 10,
    ) -> dict:
        rng = np.random.default_rng(seed)
        directory.mkdir(parents=True, exist_ok=True)
        out: dict = {"sha256": {}}
        for split, n in (("train", n_train), ("test", n_test)):
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, num_classes, size=n).astype(np.uint8)
            for stem, arr in zip(MNIST_FILE_NAMES[split], (images, labels)):
                path = write_idx(directory / (stem + (".gz" if gz else "")), arr)
                out["sha256"][stem] = payload_sha256(path)
            out[f"{split}_images"], out[f"{split}_labels"] = images, labels
        return out

    return write
