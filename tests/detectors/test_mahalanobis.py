"""Mahalanobis baseline: exact values on a hand-made 2-D Gaussian, pre-processing, persistence."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sameguard.api import ArtifactError, IntegrityError
from sameguard.data import ImageDataset
from sameguard.detectors.mahalanobis import (MahalanobisDetector, fit_tied_gaussians, mahalanobis_distances,
                                              mahalanobis_score)

# Two classes in 2-D, centred at (-0.5, 0) and (0.5, 0), each with the four offsets
# (+-0.1, 0) and (0, +-0.2): tied covariance diag(0.005, 0.02), precision diag(200, 50).
OFFSETS = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.2], [0.0, -0.2]])
MEANS = torch.tensor([[-0.5, 0.0], [0.5, 0.0]])
POINTS = torch.cat([MEANS[0] + OFFSETS, MEANS[1] + OFFSETS])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


class _Flatten(nn.Module):
    """A 'network' whose penultimate features are the two pixels themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@pytest.fixture
def toy():
    victim = SimpleNamespace(model=_Flatten(), image_shape=(1, 1, 2))
    data = ImageDataset(name="toy", split="train", images=POINTS.reshape(8, 1, 1, 2), labels=LABELS,
                        classes=("a", "b"), hflip=False)
    return victim, data


def test_fit_tied_gaussians_by_hand():
    means, precision = fit_tied_gaussians(POINTS, LABELS, 2)
    assert torch.allclose(means, MEANS.double())
    assert torch.allclose(precision, torch.diag(torch.tensor([200.0, 50.0])).double(), rtol=1e-6)


def test_mahalanobis_score_by_hand():
    means, precision = MEANS.double(), torch.diag(torch.tensor([200.0, 50.0])).double()
    f = torch.tensor([[-0.5, 0.0], [0.0, 0.2], [0.6, 0.1], [-0.3, 0.1]])
    # (0, 0.2) is 200 * 0.25 + 50 * 0.04 = 52 from both; (0.6, 0.1) is 200 * 0.01 + 50 * 0.01 = 2.5 from class 1.
    expected = torch.tensor([0.0, 52.0, 2.5, 8.5])
    assert torch.allclose(mahalanobis_score(f, means, precision), expected, atol=1e-5)
    d = mahalanobis_distances(f.double(), means, precision)
    assert d.shape == (4, 2) and torch.allclose(d[2], torch.tensor([200 * 1.21 + 0.5, 2.5]).double())


def test_fit_requires_every_class():
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        fit_tied_gaussians(POINTS, LABELS, 3)


def test_detector_on_toy_victim(toy):
    victim, data = toy
    detector = MahalanobisDetector().fit(victim, data)
    x = torch.tensor([[-0.5, 0.0], [0.0, 0.2], [-0.3, 0.1]]).reshape(3, 1, 1, 2)
    assert torch.allclose(detector.score(x), torch.tensor([0.0, 52.0, 8.5]), atol=1e-4)


def test_noise_magnitude_moves_towards_closest_class(toy):
    """x = (-0.3, 0.1): closest is class 0, gradient sign (+, +); eps = 0.05 gives (-0.35, 0.05),
    at distance 200 * 0.15^2 + 50 * 0.05^2 = 4.625 instead of 8.5."""
    victim, data = toy
    detector = MahalanobisDetector(noise_magnitude=0.05).fit(victim, data)
    x = torch.tensor([[-0.3, 0.1]]).reshape(1, 1, 1, 2)
    assert torch.allclose(detector.score(x), torch.tensor([4.625]), atol=1e-4)


def test_needs_white_box_victim(fmnist_tiny):
    train, _ = fmnist_tiny
    with pytest.raises(ValueError, match="white-box"):
        MahalanobisDetector().fit(lambda x: torch.ones(len(x), 10) / 10, train)


@pytest.fixture(scope="module")
def lenet_mahalanobis(baseline_victim, fmnist_tiny):
    """On the trained LeNet-5's 84-D penultimate layer."""
    train, _ = fmnist_tiny
    return MahalanobisDetector(max_train_samples=500).fit(baseline_victim, train)


def test_real_victim_features(lenet_mahalanobis, fmnist_tiny):
    detector = lenet_mahalanobis
    assert detector.means_.shape == (10, 84)
    assert detector.precision_.shape == (84, 84)
    assert torch.allclose(detector.precision_, detector.precision_.T, atol=1e-6)
    _, test = fmnist_tiny
    assert (detector.score(test.images[:20]) >= 0).all()


def test_noise_magnitude_changes_scores(baseline_victim, fmnist_tiny, lenet_mahalanobis):
    train, test = fmnist_tiny
    tuned = MahalanobisDetector(noise_magnitude=0.01, max_train_samples=500).fit(baseline_victim, train)
    x = test.images[:20]
    torch.testing.assert_close(tuned.means_, lenet_mahalanobis.means_)  # two fits on the same data
    assert not torch.allclose(tuned.score(x), lenet_mahalanobis.score(x), rtol=1e-4, atol=1e-6)
    assert torch.equal(tuned.score(x), tuned.score(x))  # the same call twice: no hidden state


def test_save_load_round_trip(lenet_mahalanobis, baseline_victim, fmnist_tiny, noise_queries, tmp_path):
    detector = lenet_mahalanobis
    _, test = fmnist_tiny
    x = torch.cat([test.images[:30], noise_queries[:10]])
    detector.save(tmp_path / "maha")
    loaded = MahalanobisDetector.load(tmp_path / "maha", baseline_victim)
    assert torch.equal(loaded.score(x), detector.score(x))
    assert loaded.get_params() == detector.get_params()


def test_load_refuses_tampering_and_other_victims(lenet_mahalanobis, baseline_victim, tmp_path):
    path = lenet_mahalanobis.save(tmp_path / "maha")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "mahalanobis-detector"
    other = SimpleNamespace(model=baseline_victim.model, weights_sha256="0" * 64)
    with pytest.raises(ArtifactError, match="victim"):
        MahalanobisDetector.load(path, other)
    assert MahalanobisDetector.load(path, other, check_victim=False).is_fitted()
    data = bytearray((path / "gaussians.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "gaussians.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        MahalanobisDetector.load(path, baseline_victim)
