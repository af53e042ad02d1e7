"""The contracts in sameguard.api: the threshold at a target false-positive rate."""

import pytest
import torch

from sameguard.api import threshold_at_fpr


def test_threshold_exact_on_hand_made_scores():
    scores = torch.arange(100, dtype=torch.float32)  # 0..99
    t = threshold_at_fpr(scores, 0.05)
    assert t == 94.0  # 95..99 (5 of 100) are above
    assert int((scores > t).sum()) == 5
    assert threshold_at_fpr(scores, 0.0) == 99.0


def test_threshold_with_ties_never_exceeds_target():
    scores = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0])
    t = threshold_at_fpr(scores, 0.5)
    assert float((scores > t).float().mean()) <= 0.5


@pytest.mark.parametrize("fpr", [-0.1, 1.0])
def test_threshold_rejects_bad_fpr(fpr):
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr(torch.zeros(3), fpr)


def test_threshold_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        threshold_at_fpr(torch.zeros(0), 0.1)
    with pytest.raises(ValueError, match="finite"):
        threshold_at_fpr(torch.tensor([0.0, float("nan")]), 0.1)
