"""SAME's robust score variants (issue 10) as pure functions, on hand-computed tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sameguard.detectors import same_score
from sameguard.detectors.complexity import compressed_bits_per_pixel, to_uint8
from sameguard.detectors.robust_score import (
    LOG_EPS,
    MAD_TO_STD,
    combine_terms,
    fit_complexity_beta,
    kl_per_class,
    masked_same_score,
    robust_location_scale,
    score_terms,
    standardize_term,
)
from sameguard.detectors.same import scoring_mask_noise
from sameguard.models import MaskedAutoencoder, mae_config


# ---------------------------------------------------------------------- masked scoring
def test_masked_s1_is_the_error_on_hidden_pixels_averaged_over_masks():
    x = torch.zeros(1, 1, 2, 2)
    # Two masks; reconstruction errors 1 on the top-left pixel, 3 on the bottom-right.
    x_hat = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])
    x_hats = torch.stack([x_hat, x_hat])                     # (k=2, N=1, 1, 2, 2)
    masks = torch.tensor([[[[[1.0, 0.0], [0.0, 0.0]]]],      # hides the top-left pixel only
                          [[[[0.0, 0.0], [1.0, 1.0]]]]])     # hides the bottom row
    p = torch.tensor([[0.5, 0.5]])
    p_aux = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    s1, s2 = masked_same_score(x, x_hats, masks, p, p_aux)
    # mask 1: 1^2 / 1 = 1; mask 2: (0 + 3^2) / 2 = 4.5; mean 2.75 (visible errors never count).
    assert s1.tolist() == pytest.approx([2.75])
    assert s2.tolist() == pytest.approx([0.0])


def test_masked_s2_is_the_kl_to_the_mean_auxiliary_probabilities():
    x = torch.zeros(1, 1, 1, 1)
    x_hats = torch.zeros(2, 1, 1, 1, 1)
    masks = torch.ones(2, 1, 1, 1, 1)
    p = torch.tensor([[0.5, 0.5]])
    p_aux = torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]])       # mean (0.6, 0.4)
    _, s2 = masked_same_score(x, x_hats, masks, p, p_aux)
    expected = (0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)) / 2
    assert s2.item() == pytest.approx(expected, rel=1e-6)
    # ... which is at most the mean of the per-mask KLs (convexity): one bad mask is damped.
    per_mask = [(0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / b)) / 2 for a, b in ((0.9, 0.1), (0.3, 0.7))]
    assert s2.item() < sum(per_mask) / 2


def test_one_full_mask_gives_sames_terms():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    p = torch.softmax(torch.randn(3, 5, generator=g), 1)
    q = torch.softmax(torch.randn(3, 5, generator=g), 1)
    s1, s2 = masked_same_score(x, x_hat[None], torch.ones(1, 3, 1, 4, 4), p, q[None])
    reference = same_score(x, x_hat, p, q, alpha=0.5)
    torch.testing.assert_close(s1, reference.s1)
    torch.testing.assert_close(s2, reference.s2)


def test_a_mask_that_hides_nothing_is_refused():
    with pytest.raises(ValueError, match="at least one pixel"):
        masked_same_score(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 2, 2),
                          torch.tensor([[1.0]]), torch.tensor([[[1.0]]]))


def test_kl_per_class_matches_same_score():
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]])
    expected = [sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist())) / 3, math.log(2) / 3]
    assert kl_per_class(p, q).tolist() == pytest.approx(expected, rel=1e-9)


def test_scoring_masks_are_fixed_by_the_seed():
    a, b, c = scoring_mask_noise(16, 4, 0), scoring_mask_noise(16, 4, 0), scoring_mask_noise(16, 4, 1)
    assert a.shape == (4, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.argsort().tolist()) for row in a}) == 4  # four different masks


def test_mae_noise_hook_hides_the_same_patches_in_every_image():
    model = MaskedAutoencoder(mae_config("tiny", 28, 1)).eval()  # 16 patches of 7x7
    noise = torch.arange(16, dtype=torch.float32).flip(0)         # patch 15 smallest ... patch 0 largest
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        _, mask = model(x, mask_ratio=0.75, noise=noise)
    keep = int(16 * 0.25)                                         # 4 visible: patches 12..15 (bottom row)
    assert torch.equal(mask[0], mask[2])
    assert mask[0, 0, 21:, :].sum() == 0                          # the bottom row is visible
    assert mask[0, 0, :21, :].mean() == 1.0                       # every other patch is hidden
    assert mask[0].sum() == (16 - keep) * 49
    with pytest.raises(ValueError, match="one value per patch"):
        model(x, mask_ratio=0.75, noise=torch.zeros(5))


# ---------------------------------------------------------------------- log, complexity, standardisation
def test_score_terms_by_hand():
    s1 = torch.tensor([0.01, 0.1])
    s2 = torch.tensor([0.0, 0.5])
    t1, t2 = score_terms(s1, s2)
    assert t1.tolist() == pytest.approx([0.01, 0.1]) and t2.tolist() == pytest.approx([0.0, 0.5])
    t1, t2 = score_terms(s1, s2, log_terms=True)
    assert t1.tolist() == pytest.approx([math.log(0.01 + LOG_EPS), math.log(0.1 + LOG_EPS)])
    assert t2.tolist() == pytest.approx([math.log(LOG_EPS), math.log(0.5 + LOG_EPS)])
    bits = torch.tensor([2.0, 6.0])
    t1, t2 = score_terms(s1, s2, complexity_bits=bits, beta=0.5)
    assert t1.tolist() == pytest.approx([math.log(0.01 + LOG_EPS) - 1.0, math.log(0.1 + LOG_EPS) - 3.0])
    assert t2.tolist() == pytest.approx([0.0, 0.5])  # s2 stays raw unless log_terms


def test_complexity_sign_a_simple_image_that_reconstructs_badly_is_more_suspicious():
    # The same reconstruction error on a simple image (few bits) and on a complex one: with a
    # positive beta (complex benign images reconstruct worse), the simple one scores higher.
    t1, _ = score_terms(torch.tensor([0.05, 0.05]), torch.zeros(2), complexity_bits=torch.tensor([1.0, 6.0]), beta=0.4)
    assert t1[0] > t1[1]
    # ... and at equal complexity, a larger error is more suspicious (the sign of s1 is kept).
    t1, _ = score_terms(torch.tensor([0.01, 0.2]), torch.zeros(2), complexity_bits=torch.tensor([3.0, 3.0]), beta=0.4)
    assert t1[1] > t1[0]


def test_robust_location_scale_is_median_and_mad():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    center, scale = robust_location_scale(values)
    assert center == 3.0                                  # the outlier 100 does not move it
    assert scale == pytest.approx(MAD_TO_STD * 1.0)       # |v - 3| = 2, 1, 0, 1, 97 -> median 1
    even = robust_location_scale(torch.tensor([1.0, 2.0, 4.0, 10.0]))
    assert even[0] == pytest.approx(3.0)                  # mean of the two middle values
    assert even[1] == pytest.approx(MAD_TO_STD * 1.5)     # |v - 3| = 2, 1, 1, 7 -> median 1.5


def test_robust_scale_falls_back_when_the_mad_is_zero():
    center, scale = robust_location_scale(torch.tensor([0.0, 0.0, 0.0, 4.0]))
    assert center == 0.0
    assert scale == pytest.approx(float(np.std([0.0, 0.0, 0.0, 4.0])))
    assert robust_location_scale(torch.tensor([2.0, 2.0])) == (2.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        robust_location_scale(torch.tensor([1.0, float("nan")]))


def test_standardize_and_combine_by_hand():
    z = standardize_term(torch.tensor([3.0, 5.0]), center=3.0, scale=2.0)
    assert z.tolist() == [0.0, 1.0]
    out = combine_terms(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), alpha=0.25)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.25, 1.5])
    with pytest.raises(ValueError, match="alpha"):
        combine_terms(z, z, alpha=1.5)


def test_fit_complexity_beta_recovers_an_exact_line():
    bits = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    s1 = torch.exp(-3.0 + 0.5 * bits) - LOG_EPS            # log(s1 + eps) = -3 + 0.5 L exactly
    beta, intercept = fit_complexity_beta(s1, bits)
    assert beta == pytest.approx(0.5, rel=1e-9)
    assert intercept == pytest.approx(-3.0, rel=1e-9)
    assert fit_complexity_beta(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 3.0]))[0] == 0.0  # no spread in L


# ---------------------------------------------------------------------- compressed length
@pytest.mark.parametrize("method", ["png", "zlib"])
def test_constant_image_compresses_far_better_than_noise(method):
    constant = torch.zeros(2, 1, 28, 28)
    noise = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c, n = compressed_bits_per_pixel(constant, method), compressed_bits_per_pixel(noise, method)
    assert c.shape == n.shape == (2,) and c.dtype == torch.float32
    assert (c < 1.0).all()              # a constant image: well under 1 bit per pixel
    assert (n > 7.5).all()              # noise is incompressible: about 8 bits per pixel
    assert torch.equal(c, compressed_bits_per_pixel(constant, method))  # deterministic


def test_zlib_length_by_hand():
    import zlib

    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = 8 * len(zlib.compress(to_uint8(x)[0].tobytes(), 9)) / (3 * 8 * 8)
    assert compressed_bits_per_pixel(x, "zlib").item() == pytest.approx(expected)


def test_png_handles_colour_and_odd_channels():
    assert compressed_bits_per_pixel(torch.zeros(1, 3, 32, 32)).item() < 1.0
    assert compressed_bits_per_pixel(torch.zeros(1, 2, 8, 8)).shape == (1,)
    with pytest.raises(ValueError, match="method must be one of"):
        compressed_bits_per_pixel(torch.zeros(1, 1, 8, 8), "gzip")


def test_to_uint8_quantises_like_the_data_pipeline():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0 * 200 / 255 - 1]).reshape(1, 1, 1, 4)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 200]
