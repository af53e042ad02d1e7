"""The Fashion-MNIST loader: where it looks, checksums, downloads, subsets, and the real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sameguard.api import DatasetNotFoundError, IntegrityError
from sameguard.data import fashion_mnist as fm
from sameguard.data import files, load_dataset, load_fashion_mnist, write_idx

FMNIST_SMALL = Path(__file__).parents[1] / "fixtures" / "fashion-mnist-small"


def expected_images(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).float().unsqueeze(1) * 2 / 255 - 1


def assert_loads(ds, data, split="train"):
    assert (ds.name, ds.split, ds.hflip) == ("fashion-mnist", split, True)
    assert (ds.classes[0], ds.classes[9]) == ("T-shirt/top", "Ankle boot")
    torch.testing.assert_close(ds.images, expected_images(data[f"{split}_images"]), rtol=0, atol=1e-6)
    assert torch.equal(ds.labels, torch.from_numpy(data[f"{split}_labels"].astype(np.int64)))


def test_user_dir_beats_debian_dir(tmp_path, monkeypatch, write_mnist_like):
    user = write_mnist_like(tmp_path / "user", seed=1)
    write_mnist_like(fm.DEBIAN_DIR, seed=2)  # same names, other content: would fail the hash
    monkeypatch.setattr(fm, "SHA256", user["sha256"])
    assert_loads(load_fashion_mnist("train", data_dir=tmp_path / "user"), user)
    assert_loads(load_fashion_mnist("test", data_dir=tmp_path / "user"), user, "test")


def test_subfolder_and_env_var(tmp_path, monkeypatch, write_mnist_like):
    data = write_mnist_like(tmp_path / "root" / "fashion-mnist", seed=3, gz=False)
    monkeypatch.setattr(fm, "SHA256", data["sha256"])
    monkeypatch.setenv(files.DATA_DIR_ENV, str(tmp_path / "root"))
    assert_loads(load_fashion_mnist("train"), data)


def test_debian_dir_is_used_when_nothing_else(monkeypatch, write_mnist_like):
    data = write_mnist_like(fm.DEBIAN_DIR, seed=4)
    monkeypatch.setattr(fm, "SHA256", data["sha256"])
    assert_loads(load_fashion_mnist("test"), data, "test")
    assert_loads(load_dataset("fashion-mnist", "test"), data, "test")


def test_missing_dataset_lists_the_three_ways_and_places(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train", data_dir=tmp_path / "nothing-here")
    msg = str(info.value)
    for needle in (
        "apt-get install dataset-fashion-mnist",
        "--data-dir",
        "SAMEGUARD_DATA_DIR",
        "--download",
        "SAMEGUARD_DOWNLOAD=1",
        str(tmp_path / "nothing-here"),
        str(tmp_path / "nothing-here" / "fashion-mnist"),
        str(fm.DEBIAN_DIR),
        "train-images-idx3-ubyte",
    ):
        assert needle in msg, needle
    assert isinstance(info.value, FileNotFoundError)


def test_hash_mismatch_raises_integrity_error(tmp_path, monkeypatch, write_mnist_like):
    data = write_mnist_like(tmp_path / "d", seed=5)
    wrong = dict(data["sha256"], **{"train-images-idx3-ubyte": "0" * 64})
    monkeypatch.setattr(fm, "SHA256", wrong)
    with pytest.raises(IntegrityError) as info:
        load_fashion_mnist("train", data_dir=tmp_path / "d")
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert data["sha256"]["train-images-idx3-ubyte"] in msg and "0" * 64 in msg


def test_cache_rereads_and_reverifies_a_changed_file(tmp_path, monkeypatch, write_mnist_like):
    data = write_mnist_like(tmp_path / "d", seed=6)
    monkeypatch.setattr(fm, "SHA256", data["sha256"])
    reads = []
    real_read = files.read_idx_bytes
    monkeypatch.setattr(files, "read_idx_bytes", lambda p: reads.append(p) or real_read(p))
    first = load_fashion_mnist("test", data_dir=tmp_path / "d")
    second = load_fashion_mnist("test", data_dir=tmp_path / "d")
    assert len(reads) == 2 and torch.equal(first.images, second.images)  # 2 files, read once
    path = tmp_path / "d" / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(IntegrityError):
        load_fashion_mnist("test", data_dir=tmp_path / "d")


def _serve_from(source: Path, calls: list[str]):
    def fetch(url: str, dest: Path) -> None:
        calls.append(url)
        shutil.copyfile(source / url.rsplit("/", 1)[1], dest)

    return fetch


def test_download_when_allowed(tmp_path, monkeypatch, write_mnist_like):
    source = write_mnist_like(tmp_path / "server", seed=7)
    monkeypatch.setattr(fm, "SHA256", source["sha256"])
    monkeypatch.setattr(fm, "DOWNLOAD_URL", "http://example.invalid/fmnist/")
    calls: list[str] = []
    monkeypatch.setattr(fm, "_fetch", _serve_from(tmp_path / "server", calls))
    with pytest.raises(DatasetNotFoundError):
        load_fashion_mnist("train", data_dir=tmp_path / "data")
    assert calls == []

    ds = load_fashion_mnist("train", data_dir=tmp_path / "data", download=True)
    assert_loads(ds, source)
    assert calls == [
        "http://example.invalid/fmnist/train-images-idx3-ubyte.gz",
        "http://example.invalid/fmnist/train-labels-idx1-ubyte.gz",
    ]
    target = tmp_path / "data" / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    ]
    load_fashion_mnist("train", data_dir=tmp_path / "data", download=True)
    assert len(calls) == 2  # already there: no second download

    monkeypatch.setenv(files.DOWNLOAD_ENV, "1")  # env switch, default cache dir
    assert_loads(load_fashion_mnist("test"), source, "test")
    assert (files.default_data_dir("fashion-mnist") / "t10k-images-idx3-ubyte.gz").is_file()


def test_corrupt_download_is_refused_and_not_kept(tmp_path, monkeypatch, write_mnist_like):
    write_mnist_like(tmp_path / "server", seed=8)
    monkeypatch.setattr(fm, "SHA256", {stem: "f" * 64 for stem in fm.SHA256})
    monkeypatch.setattr(fm, "_fetch", _serve_from(tmp_path / "server", []))
    with pytest.raises(IntegrityError, match="downloaded"):
        load_fashion_mnist("train", data_dir=tmp_path / "data", download=True)
    assert list((tmp_path / "data" / "fashion-mnist").iterdir()) == []


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_real_fashion_mnist_test_split(fmnist_full_dir):
    """The full official files, verified against the official SHA-256 (no subset manifest there)."""
    assert not (fmnist_full_dir / fm.SUBSET_MANIFEST).exists()
    ds = load_fashion_mnist("test", data_dir=fmnist_full_dir)
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))


@pytest.mark.parametrize("split, n", [("train", 3000), ("test", 1000)])
def test_shipped_subset_loads_through_the_loader(split, n):
    ds = load_fashion_mnist(split, data_dir=FMNIST_SMALL)
    assert (len(ds), ds.image_shape, ds.name, ds.split) == (n, (1, 28, 28), "fashion-mnist", split)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert torch.bincount(ds.labels, minlength=10).min() >= n // 20  # every class is there


@pytest.mark.parametrize("split, n", [("train", 3000), ("test", 1000)])
def test_shipped_subset_is_take_of_the_full_split(split, n, fmnist_full_dir):
    """The subset holds exactly the images ``take(n, seed=0)`` draws from the full split."""
    small = load_fashion_mnist(split, data_dir=FMNIST_SMALL)
    full = load_fashion_mnist(split, data_dir=fmnist_full_dir).take(n, seed=0)
    assert torch.equal(small.images, full.images)
    assert torch.equal(small.labels, full.labels)


def _copy_subset(tmp_path: Path) -> Path:
    target = tmp_path / "subset"
    shutil.copytree(FMNIST_SMALL, target)
    return target


def test_a_changed_subset_file_fails_its_manifest(tmp_path):
    target = _copy_subset(tmp_path)
    write_idx(target / "t10k-labels-idx1-ubyte.gz", np.zeros(1000, dtype=np.uint8))
    with pytest.raises(IntegrityError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("test", data_dir=target)


def test_without_its_manifest_a_subset_fails_the_official_hashes(tmp_path):
    target = _copy_subset(tmp_path)
    (target / fm.SUBSET_MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=fm.SHA256["t10k-images-idx3-ubyte"]):
        load_fashion_mnist("test", data_dir=target)


@pytest.mark.parametrize("manifest", [
    "not json",
    json.dumps({"dataset": "mnist", "sha256": {}}),
    json.dumps({"dataset": "fashion-mnist", "sha256": {"train-images-idx3-ubyte": "ab"}}),
])
def test_a_broken_manifest_is_refused(tmp_path, manifest):
    target = _copy_subset(tmp_path)
    (target / fm.SUBSET_MANIFEST).write_text(manifest)
    with pytest.raises(IntegrityError, match="not a valid Fashion-MNIST subset manifest"):
        load_fashion_mnist("test", data_dir=target)
