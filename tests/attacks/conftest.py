"""Shared fixtures of the attack tests."""

from __future__ import annotations

import pytest
import torch

from sameguard.models import build_classifier
from sameguard.victim import Victim


@pytest.fixture(scope="module")
def random_victim() -> Victim:
    """A fixed, untrained LeNet-5 (no training needed to count queries)."""
    torch.manual_seed(1234)
    model = build_classifier("lenet5", 1, 28, 10)
    return Victim(model, arch="lenet5", dataset="fashion-mnist", image_shape=(1, 28, 28),
                  classes=[str(i) for i in range(10)])
