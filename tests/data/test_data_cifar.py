from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch

from sameguard.api import ArtifactError, DatasetNotFoundError
from sameguard.data import NumpyOnlyUnpickler, load_cifar10, load_cifar100, load_dataset


def fake(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return images, rng.integers(0, num_classes, size=n)


def py2_style_pickle(obj) -> bytes:
    """A protocol-2 pickle naming numpy's numpy-1 module, like the official (Python 2) files."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar10(root, seed=0, per_batch=2, binary=True, python=True):
    batches = {f"data_batch_{i}": fake(per_batch, 10, seed + i) for i in range(1, 6)}
    batches["test_batch"] = fake(3, 10, seed + 10)
    for name, (images, labels) in batches.items():
        if binary:
            (root / "cifar-10-batches-bin").mkdir(parents=True, exist_ok=True)
            records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(labels), -1)], 1)
            (root / "cifar-10-batches-bin" / f"{name}.bin").write_bytes(records.tobytes())
        if python:
            (root / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
            d = {
                b"batch_label": name.encode(),
                b"labels": [int(v) for v in labels],
                b"data": images.reshape(len(labels), -1),
                b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
            }
            (root / "cifar-10-batches-py" / name).write_bytes(py2_style_pickle(d))
    return batches


def write_cifar100(root, seed=0, names=True):
    splits = {"train": fake(4, 100, seed), "test": fake(3, 100, seed + 1)}
    coarse = {s: np.asarray(lab) // 5 for s, (_, lab) in splits.items()}
    fine_names = [f"fine{i}" for i in range(100)]
    (root / "cifar-100-binary").mkdir(parents=True)
    (root / "cifar-100-python").mkdir(parents=True)
    for split, (images, labels) in splits.items():
        rec = np.concatenate(
            [coarse[split][:, None], labels[:, None], images.reshape(len(labels), -1)], 1
        ).astype(np.uint8)
        (root / "cifar-100-binary" / f"{split}.bin").write_bytes(rec.tobytes())
        d = {
            b"fine_labels": [int(v) for v in labels],
            b"coarse_labels": [int(v) for v in coarse[split]],
            b"data": images.reshape(len(labels), -1),
        }
        (root / "cifar-100-python" / split).write_bytes(pickle.dumps(d, protocol=2))
    if names:
        (root / "cifar-100-binary" / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
        meta = {b"fine_label_names": [n.encode() for n in fine_names], b"coarse_label_names": []}
        (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return splits


def expected(images):
    return torch.from_numpy(images).float() * 2 / 255 - 1


def test_cifar10_binary_and_python_give_identical_tensors(tmp_path):
    batches = write_cifar10(tmp_path / "bin", binary=True, python=False)
    write_cifar10(tmp_path / "py", binary=False, python=True)
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        a = load_cifar10(split, data_dir=tmp_path / "bin")
        b = load_cifar10(split, data_dir=tmp_path / "py")
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        images = np.concatenate([batches[n][0] for n in names])
        labels = np.concatenate([batches[n][1] for n in names])
        assert a.images.shape == (len(labels), 3, 32, 32)
        torch.testing.assert_close(a.images, expected(images), rtol=0, atol=1e-6)
        assert torch.equal(a.labels, torch.from_numpy(labels))
        assert (a.classes[0], a.hflip) == ("airplane", True)


def test_cifar10_binary_is_preferred_and_folder_can_be_given_directly(tmp_path):
    batches = write_cifar10(tmp_path, seed=0, python=False)
    write_cifar10(tmp_path, seed=100, binary=False)  # different content in the python folder
    assert torch.equal(
        load_cifar10("test", data_dir=tmp_path).labels, torch.from_numpy(batches["test_batch"][1])
    )
    py = load_cifar10("test", data_dir=tmp_path / "cifar-10-batches-py")
    torch.testing.assert_close(py.images, expected(fake(3, 10, 110)[0]), rtol=0, atol=1e-6)


def test_cifar100_formats_agree_and_read_names(tmp_path):
    splits = write_cifar100(tmp_path / "a")
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / "cifar-100-python", tmp_path / "b" / "cifar-100-python")
    a = load_cifar100("train", data_dir=tmp_path / "a")
    b = load_dataset("cifar100", "train", data_dir=tmp_path / "b")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.labels, torch.from_numpy(splits["train"][1]))  # fine labels
    assert a.classes == b.classes == tuple(f"fine{i}" for i in range(100))


def test_cifar100_without_names_uses_generic_names(tmp_path):
    write_cifar100(tmp_path, names=False)
    ds = load_cifar100("test", data_dir=tmp_path / "cifar-100-python")
    assert (ds.num_classes, ds.classes[7]) == (100, "class_7")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    (tmp_path / "cifar-10-batches-py").mkdir()
    payload = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(ArtifactError, match=r"test_batch.*Refusing.*system"):
        load_cifar10("test", data_dir=tmp_path)
    assert not marker.exists()
    with pytest.raises(ArtifactError, match="builtins.eval"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(eval)), encoding="bytes").load()
    objects = np.array([1, "x"], dtype=object)
    with pytest.raises(ArtifactError, match="objects"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(objects, protocol=2)), encoding="bytes").load()


def test_restricted_unpickler_reads_numpy_pickles_of_every_protocol():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        got = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({b"a": arr}, protocol=protocol)), encoding="bytes").load()
        np.testing.assert_array_equal(got[b"a"], arr)


def test_truncated_binary_batch(tmp_path):
    write_cifar10(tmp_path, python=False)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="test_batch.bin.*3073-byte"):
        load_cifar10("test", data_dir=tmp_path)


def test_missing_cifar_says_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10("train", data_dir=tmp_path)
    msg = str(info.value)
    for needle in ("cifar-10-batches-bin/", "cifar-10-batches-py/", "data_batch_5", "--data-dir", "does not download"):
        assert needle in msg, needle
    with pytest.raises(DatasetNotFoundError, match="cifar-100-binary"):
        load_cifar100("test")
