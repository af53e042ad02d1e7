"""Shared fixtures: tiny data, a tiny victim and a tiny fitted SAME detector (trained once per session)."""

from __future__ import annotations

import os

import pytest
import torch

from sameguard.api import DatasetNotFoundError
from sameguard.data import load_dataset
from sameguard.detectors import SAMEDetector
from sameguard.victim import train_victim

# Tiny models train fastest on one thread, and a shared 2-core machine makes two threads crawl.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist_small():
    """(train, test): 3000 training and 1000 test Fashion-MNIST images (real data, offline).

    Skipped when the dataset is not installed, except under CI (CI=true), where it must be.
    """
    try:
        train = load_dataset("fashion-mnist", "train").take(3000, seed=0)
        test = load_dataset("fashion-mnist", "test").take(1000, seed=0)
    except DatasetNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return train, test


@pytest.fixture(scope="session")
def tiny_victim(fmnist_small):
    train, test = fmnist_small
    return train_victim(train, test, arch="lenet5", epochs=2, seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_same(tiny_victim, fmnist_small):
    """A SAME detector with the ``tiny`` preset fitted on 2500 images; 500 held out for calibration."""
    train, _ = fmnist_small
    fit_part, held_out = train.split_off(500 / len(train), seed=0)
    detector = SAMEDetector.from_preset("tiny", seed=0, progress=False).fit(tiny_victim, fit_part)
    detector.calibrate(held_out.images, 0.05)
    return detector


@pytest.fixture
def noise():
    g = torch.Generator().manual_seed(123)
    return torch.rand(200, 1, 28, 28, generator=g) * 2 - 1
