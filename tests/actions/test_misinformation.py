"""Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from sameguard.actions import Misinformation, misinformation_weight, reverse_probabilities


def test_actions_misinformation_leaves_benign_answers_identical(probs):
    p = probs(50, seed=1)
    scores = torch.linspace(-1.0, 0.3, 50)
    out = Misinformation().apply(None, p, scores, float(scores.max()))  # all <= tau, one equal to it
    assert torch.equal(out.probabilities, p)  # the documented contract: benign rows are passed through
    assert out.actions == ("allow",) * 50
    assert not (out.alpha > 0).any()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("action", [Misinformation(), Misinformation(switch="paper"),
                                    Misinformation(misleading="least_likely"), Misinformation(nu=3.0, temperature=4.0)],
                         ids=["default", "paper_switch", "least_likely", "soft"])
def test_actions_misinformation_stays_on_the_simplex(probs, seed, action):
    p = probs(64, k=7, seed=seed)
    scores = torch.rand(64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    out = action.apply(None, p, scores, 0.0).probabilities
    assert out.dtype == torch.float32
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_actions_misinformation_misleads_above_threshold(probs, seed):
    p = probs(64, k=7, seed=seed)
    scores = torch.rand(64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    out = Misinformation().apply(None, p, scores, 0.0).probabilities
    high = scores > 0.01  # alpha = tanh(1e4 * 0.01 / 2) = 1 in float
    assert (out[high].argmax(1) == p[high].argmin(1)).all()
    assert (out[high].argmax(1) != p[high].argmax(1)).all()
    assert torch.equal(out[scores <= 0], p[scores <= 0])  # benign rows are passed through


@pytest.mark.parametrize(("switch", "score", "expected"), [
    ("onesided", -1.0, 0.0),
    ("onesided", 0.0, 0.0),
    ("onesided", 1e-4, torch.tanh(torch.tensor(0.5)).item()),
    ("onesided", 1.0, 1.0),
    ("onesided", float("nan"), 1.0),  # fails closed
    ("paper", 0.0, 0.5),
    ("paper", 1.0, 1.0),
])
def test_actions_misinformation_switch_values_by_hand(switch, score, expected):
    weight = misinformation_weight(torch.tensor([score]), 0.0, nu=1e4, switch=switch)
    assert weight[0].item() == pytest.approx(expected, abs=1e-6)


def test_actions_misinformation_paper_switch_is_tiny_far_below():
    assert misinformation_weight(torch.tensor([-1.0]), 0.0, nu=1e4, switch="paper")[0] < 1e-30


def test_actions_misinformation_reverse_probabilities_by_hand():
    rev = reverse_probabilities(torch.tensor([[0.7, 0.2, 0.1]]))
    expected = torch.tensor([1 / 0.7, 1 / 0.2, 1 / 0.1])
    torch.testing.assert_close(rev[0], expected / expected.sum(), atol=1e-6, rtol=0)


def test_actions_misinformation_accepts_a_misinformation_model(probs):
    p = probs(3, k=4)

    def always_class_two(x, q):
        return torch.nn.functional.one_hot(torch.full((len(q),), 2), 4).float()

    out = Misinformation(misleading=always_class_two).apply(None, p, torch.tensor([1.0, 1.0, -1.0]), 0.0)
    assert out.probabilities[:2].argmax(1).tolist() == [2, 2]
    assert torch.equal(out.probabilities[2], p[2])  # the benign row is passed through


def test_actions_misinformation_validates_the_misinformation_model(probs):
    with pytest.raises(ValueError, match="must return"):
        Misinformation(misleading=lambda x, q: q[:, :2]).apply(None, probs(3, k=4), torch.ones(3), 0.0)


@pytest.mark.parametrize("bad", [{"nu": 0}, {"nu": float("inf")}, {"switch": "step"}, {"misleading": "random"},
                                 {"temperature": 0}], ids=str)
def test_actions_misinformation_refuses_bad_arguments(bad):
    with pytest.raises(ValueError):
        Misinformation(**bad)
