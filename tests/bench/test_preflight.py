"""``sameguard bench`` checks every dataset split a profile needs before any work starts."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest

from sameguard.api import DatasetNotFoundError
from sameguard.bench.config import load_config
from sameguard.bench.preflight import check_data, required_data
from sameguard.cli import main
from sameguard.data.idx import write_idx


def test_paper_profile_needs_mnist_emnist_and_kmnist():
    needed = {(name, split) for name, split, _ in required_data(load_config("paper"))}
    assert needed == {("mnist", "train"), ("mnist", "test"), ("emnist-digits", "train"), ("kmnist", "test")}


def _fake_mnist(root) -> None:
    """Tiny MNIST IDX files (both splits) under ``root/mnist``."""
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir(parents=True)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(root / "mnist" / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / "mnist" / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def test_mnist_present_emnist_missing_fails_before_any_work(tmp_path, capsys):
    _fake_mnist(tmp_path / "data")
    with pytest.raises(DatasetNotFoundError) as exc:
        check_data(load_config("paper"), data_dir=str(tmp_path / "data"))
    message = str(exc.value)
    assert "emnist-digits (train split" in message and "kmnist (test split" in message
    assert "mnist (train split" not in message.replace("emnist-digits", "")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["bench", "--config", "paper", "--data-dir", str(tmp_path / "data"),
                     "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "emnist-digits" in err and "Nothing was run" in err
    assert not (tmp_path / "bench").exists() and out.getvalue() == ""
