"""Helpers for the action tests: random probability rows with a fixed seed."""

from __future__ import annotations

import pytest
import torch


def _probs(n: int, k: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g) * 3, dim=1)


@pytest.fixture(scope="session")
def probs():
    """``probs(n, k=10, seed=0)``: ``(n, k)`` softmax rows, peaked (logits scaled by 3)."""
    return _probs
