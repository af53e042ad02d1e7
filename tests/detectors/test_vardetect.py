"""VarDetect: MMD and bandwidth by hand, window scores, per-client sliding windows, the VAE, persistence."""

from __future__ import annotations

import math

import pytest
import torch

from sameguard.bench.metrics import auroc
from sameguard.detectors.vardetect import VarDetectDetector, median_bandwidth, rbf_mmd2
from sameguard.models.autoencoder import ConvAEConfig
from sameguard.models.vae import ConvVAE, vae_loss


def test_mmd_by_hand():
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    # k(x,x) = k(y,y) = 1, k(x,y) = exp(-1/2): MMD^2 = 2 - 2 exp(-1/2)
    assert rbf_mmd2(x, y, 1.0) == pytest.approx(2 - 2 * math.exp(-0.5))
    # x = {0, 1} against y = {0}: mean k(x, x) = (2 + 2e^{-1/2})/4, k(y, y) = 1, mean k(x, y) = (1 + e^{-1/2})/2
    x2 = torch.tensor([[0.0], [1.0]])
    expected = (2 + 2 * math.exp(-0.5)) / 4 + 1 - 2 * (1 + math.exp(-0.5)) / 2
    assert rbf_mmd2(x2, torch.tensor([[0.0]]), 1.0) == pytest.approx(expected)


def test_mmd_identical_zero_and_shift_positive():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 4, generator=g)
    assert rbf_mmd2(z, z, 1.0) == pytest.approx(0.0, abs=1e-12)
    near = rbf_mmd2(z[:25], z[25:], 1.0)
    far = rbf_mmd2(z[:25], z[25:] + 3.0, 1.0)
    assert far > 4 * near > 0


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="bandwidth"):
        rbf_mmd2(torch.zeros(2, 2), torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="samples"):
        rbf_mmd2(torch.zeros(2, 2), torch.zeros(2, 3), 1.0)


def test_median_bandwidth_by_hand():
    assert median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)  # distances 1, 3, 2
    with pytest.raises(ValueError, match="identical"):
        median_bandwidth(torch.zeros(4, 2))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_vae_shapes_and_loss(shape):
    c, s, _ = shape
    vae = ConvVAE(ConvAEConfig(image_size=s, in_channels=c, width=8, latent_dim=5)).eval()
    x = torch.rand(3, *shape) * 2 - 1
    x_hat, mu, logvar = vae(x, torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (3, 5)
    assert x_hat.abs().max() <= 1.0
    torch.testing.assert_close(vae.latent_means(x), mu)
    # KL of N(0, 1) to N(0, 1) is 0: the loss is the summed squared error alone.
    zero = torch.zeros(3, 5)
    assert vae_loss(x, x_hat, zero, zero).item() == pytest.approx(((x_hat - x) ** 2).flatten(1).sum(1).mean().item())


def test_windows_of_noise_score_higher(fitted_baselines, fmnist_tiny, noise_queries):
    detector = fitted_baselines.get("vardetect")
    _, test = fmnist_tiny
    benign, attack = detector.window_scores(test.images), detector.window_scores(noise_queries)
    assert benign.shape == (15,)
    assert attack.shape == (10,)
    assert auroc(benign.numpy(), attack.numpy()) > 0.95
    scores = detector.score(noise_queries)
    assert torch.equal(scores[:20], attack[0].repeat(20))


def test_observe_sliding_window(fitted_baselines, fmnist_tiny, noise_queries):
    detector = fitted_baselines.get("vardetect")
    _, test = fmnist_tiny
    detector.reset()
    out_benign = detector.observe(test.images[:30], "alice")
    out_attack = detector.observe(noise_queries[:30], "mallory")
    assert out_benign.shape == (30,)
    assert out_attack.shape == (30,)
    assert out_attack[-1] > out_benign[-1]
    # after a full window the score is the window's MMD^2 against the reference
    codes = detector.encode(test.images[10:30])
    assert out_benign[-1].item() == pytest.approx(rbf_mmd2(codes, detector.reference_codes_, detector.bandwidth_),
                                                  rel=1e-5)
    assert len(detector.clients_["alice"]) == detector.window_size
    detector.reset("alice")
    assert "alice" not in detector.clients_
    assert "mallory" in detector.clients_
    detector.reset()


def test_fixed_bandwidth_and_seed(fmnist_tiny):
    train, test = fmnist_tiny

    def fit(seed: int) -> VarDetectDetector:
        return VarDetectDetector(epochs=1, bandwidth=2.5, reference_size=50, max_train_samples=200, seed=seed,
                                 progress=False).fit(None, train)

    detector = fit(0)
    assert detector.bandwidth_ == 2.5
    assert detector.reference_codes_.shape == (50, 16)
    x = test.images[:64]
    torch.testing.assert_close(fit(0).score(x), detector.score(x), rtol=1e-4, atol=1e-6)  # same seed
    assert not torch.allclose(fit(1).score(x), detector.score(x), rtol=1e-4, atol=1e-6)


def test_save_load_round_trip(fitted_baselines, baseline_victim, fmnist_tiny, noise_queries, tmp_path):
    detector = fitted_baselines.get("vardetect")
    _, test = fmnist_tiny
    x = torch.cat([test.images[:40], noise_queries[:20]])
    detector.save(tmp_path / "vd")
    loaded = VarDetectDetector.load(tmp_path / "vd", baseline_victim)
    assert torch.equal(loaded.score(x), detector.score(x))
    assert loaded.bandwidth_ == detector.bandwidth_
