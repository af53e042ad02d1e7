"""SAME with a plain convolutional auto-encoder: the auto-encoder, SAME's formula reused, persistence."""

from __future__ import annotations

import pytest
import torch

from sameguard.api import ArtifactError
from sameguard.detectors.same_base import same_score
from sameguard.detectors.same_conv_ae import CONV_AE_SAME_PRESETS, ConvAESAMEDetector
from sameguard.models.autoencoder import ConvAEConfig, ConvAutoencoder


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_autoencoder_shapes(shape):
    c, s, _ = shape
    ae = ConvAutoencoder(ConvAEConfig(image_size=s, in_channels=c, width=8, latent_dim=7)).eval()
    x = torch.rand(2, *shape) * 2 - 1
    assert ae.encode(x).shape == (2, 7)
    out = ae.reconstruct(x)
    assert out.shape == x.shape
    assert out.abs().max() <= 1.0
    assert not out.requires_grad


@pytest.mark.parametrize("bad", [dict(image_size=30), dict(image_size=4), dict(latent_dim=0), dict(width=1.5)])
def test_autoencoder_config_errors(bad):
    with pytest.raises(ValueError, match="ConvAEConfig"):
        ConvAEConfig(**bad)


def test_scores_are_sames_formula(fitted_baselines, baseline_victim, fmnist_tiny):
    detector = fitted_baselines.get("same_conv_ae")
    _, test = fmnist_tiny
    x = test.images[:20]
    parts = detector.score_components(x)
    x_hat = detector.reconstruct(x)
    p_aux = torch.softmax(detector.aux_(x_hat), 1).detach()
    expected = same_score(x, x_hat, baseline_victim.predict_proba(x), p_aux, detector.alpha)
    assert torch.allclose(parts.score, expected.score, atol=1e-6)
    assert torch.allclose(parts.s1, ((x_hat - x) ** 2).flatten(1).mean(1), atol=1e-6)
    assert (parts.s2 >= 0).all()


def test_reconstruction_term_separates_noise(fitted_baselines, fmnist_tiny, noise_queries):
    detector = fitted_baselines.get("same_conv_ae")
    _, test = fmnist_tiny
    assert detector.score_components(noise_queries).s1.min() > detector.score_components(test.images).s1.median()


def test_presets():
    assert set(CONV_AE_SAME_PRESETS) == {"paper", "cpu", "tiny"}
    assert ConvAESAMEDetector.from_preset("paper").get_params() == ConvAESAMEDetector().get_params()
    with pytest.raises(ValueError, match="Unknown preset .huge. for ConvAESAMEDetector"):
        ConvAESAMEDetector.from_preset("huge")


def test_aux_arch_needed_for_plain_functions(fmnist_tiny):
    train, _ = fmnist_tiny
    with pytest.raises(ValueError, match="aux_arch"):
        ConvAESAMEDetector.from_preset("tiny").fit(lambda x: torch.ones(len(x), 10) / 10, train)


def test_save_load_round_trip(fitted_baselines, baseline_victim, fmnist_tiny, noise_queries, tmp_path):
    detector = fitted_baselines.get("same_conv_ae")
    _, test = fmnist_tiny
    x = torch.cat([test.images[:30], noise_queries[:10]])
    detector.save(tmp_path / "cae")
    loaded = ConvAESAMEDetector.load(tmp_path / "cae", baseline_victim)
    torch.testing.assert_close(loaded.score(x), detector.score(x))
    assert loaded.get_params() == detector.get_params()
    (tmp_path / "cae" / "aux.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        ConvAESAMEDetector.load(tmp_path / "cae", baseline_victim)
