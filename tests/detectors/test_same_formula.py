"""The SAME score formula on hand-computed tensors, and its sign."""

import math

import pytest
import torch

from sameguard.detectors import same_score


def test_score_matches_hand_computation():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, -1.0]]]])
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    out = same_score(x, x_hat, p, q, alpha=0.99)
    # s1: mean squared error over the 4 pixels.
    assert out.s1.tolist() == pytest.approx([0.0, 0.5])
    # s2: KL(p || q) / K with K = 2; 0 * log 0 counts 0.
    assert out.s2.tolist() == pytest.approx([0.0, math.log(1 / 0.25) / 2])
    expected = [0.0, 0.99 * 0.5 + 0.01 * math.log(4) / 2]
    assert out.score.tolist() == pytest.approx(expected, rel=1e-6)


def test_alpha_extremes_select_one_term():
    x = torch.zeros(1, 1, 2, 2)
    x_hat = torch.full((1, 1, 2, 2), 0.5)
    p = torch.tensor([[0.9, 0.1]])
    q = torch.tensor([[0.1, 0.9]])
    only_rec = same_score(x, x_hat, p, q, alpha=1.0)
    only_kl = same_score(x, x_hat, p, q, alpha=0.0)
    assert only_rec.score.item() == pytest.approx(0.25)
    kl = (0.9 * math.log(9) + 0.1 * math.log(1 / 9)) / 2
    assert only_kl.score.item() == pytest.approx(kl, rel=1e-6)


def test_kl_direction_is_victim_first():
    x = torch.zeros(1, 1, 1, 1)
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.2, 0.3, 0.5]])
    forward = same_score(x, x, p, q, alpha=0.0).s2.item()
    reverse = same_score(x, x, q, p, alpha=0.0).s2.item()
    expected = sum(pk * math.log(pk / qk) for pk, qk in zip(p[0].tolist(), q[0].tolist())) / 3
    assert forward == pytest.approx(expected, rel=1e-6)
    assert forward != pytest.approx(reverse)


def test_sign_worse_reconstruction_and_disagreement_score_higher():
    x = torch.zeros(2, 1, 4, 4)
    x_hat = torch.stack([torch.full((1, 4, 4), 0.01), torch.full((1, 4, 4), 0.8)])
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    q = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    s = same_score(x, x_hat, p, q, alpha=0.99).score
    assert s[1] > s[0]


def test_bad_alpha_raises():
    x = torch.zeros(1, 1, 1, 1)
    p = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="alpha"):
        same_score(x, x, p, p, alpha=1.5)
