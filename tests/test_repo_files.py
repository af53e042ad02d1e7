"""The Makefile's PyTorch index variable and the .gitignore of what the commands write by default."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install", *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_torch_index_is_a_make_variable():
    plain = [line for line in _make_n().splitlines() if "pip install" in line and "torch==" in line]
    assert len(plain) == 1 and "--index-url" not in plain[0]  # the default: pip's configured index
    cpu = [line for line in _make_n("TORCH_INDEX=https://download.pytorch.org/whl/cpu").splitlines()
           if "pip install" in line and "torch==" in line]
    assert len(cpu) == 1 and "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in cpu[0]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("path", ["sameguard.db", "sameguard.db-wal", "sameguard.db-shm", "runs/demo/x",
                                  "runs/bench/quick/report.md"])
def test_default_outputs_are_ignored(path):
    result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], check=False)
    assert result.returncode == 0, f"{path} is not ignored by .gitignore"
