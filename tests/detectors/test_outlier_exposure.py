"""Outlier exposure: the loss by hand, fine-tuning a copy (the victim is untouched), persistence."""

from __future__ import annotations

import math

import pytest
import torch

from sameguard.detectors.msp import MSPDetector
from sameguard.detectors.outlier_exposure import OutlierExposureDetector, oe_loss, uniform_cross_entropy


def test_uniform_cross_entropy_by_hand():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, math.log(3.0), 0.0, 0.0]])
    expected = torch.tensor([math.log(4), math.log(4), math.log(6) - math.log(3) / 4])
    assert torch.allclose(uniform_cross_entropy(z), expected)


def test_oe_loss_by_hand():
    logits_in = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    logits_out = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    expected = -math.log(0.75) + 0.5 * (math.log(2) + math.log(4) - math.log(3) / 2) / 2
    assert oe_loss(logits_in, torch.tensor([1]), logits_out, 0.5).item() == pytest.approx(expected)
    assert oe_loss(logits_in, torch.tensor([1]), logits_out, 0.0).item() == pytest.approx(-math.log(0.75))


def test_fine_tuning_leaves_the_victim_alone(fitted_baselines, baseline_victim, fmnist_tiny):
    detector = fitted_baselines.get("outlier_exposure")
    assert detector.model_ is not baseline_victim.model
    assert detector.victim_sha256_ == baseline_victim.weights_sha256
    _, test = fmnist_tiny
    p = detector.probabilities(test.images[:50])
    assert torch.allclose(p.sum(1), torch.ones(50), atol=1e-5)
    assert torch.allclose(detector.score(test.images[:50]), -p.max(1).values)


def test_outliers_become_less_confident_than_before(fitted_baselines, baseline_victim, noise_queries):
    """Exposure to (other) noise lowers the confidence on noise relative to the original victim."""
    detector = fitted_baselines.get("outlier_exposure")
    before = MSPDetector().fit(baseline_victim).score(noise_queries)
    after = detector.score(noise_queries)
    assert after.mean() > before.mean()


def test_outlier_shape_must_match(baseline_victim, fmnist_tiny):
    train, _ = fmnist_tiny
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        OutlierExposureDetector(epochs=1).fit(baseline_victim, train, torch.zeros(10, 3, 32, 32))
    with pytest.raises(ValueError, match="white-box"):
        OutlierExposureDetector(epochs=1).fit(lambda x: x, train, torch.zeros(10, 1, 28, 28))


def test_save_load_round_trip(fitted_baselines, baseline_victim, fmnist_tiny, noise_queries, tmp_path):
    detector = fitted_baselines.get("outlier_exposure")
    _, test = fmnist_tiny
    x = torch.cat([test.images[:30], noise_queries[:10]])
    detector.save(tmp_path / "oe")
    loaded = OutlierExposureDetector.load(tmp_path / "oe", baseline_victim)
    assert torch.equal(loaded.score(x), detector.score(x))
    assert OutlierExposureDetector.load(tmp_path / "oe").is_fitted()  # the victim is only checked
