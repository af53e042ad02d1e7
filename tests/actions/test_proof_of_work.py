"""Calibrated proof-of-work (Dziedzic et al., ICLR 2022): the score -> bits map and its calibration."""

from __future__ import annotations

import pytest
import torch

from sameguard.actions import ProofOfWork
from sameguard.api import NotCalibratedError


@pytest.fixture(scope="module")
def calibrated():
    g = torch.Generator().manual_seed(0)
    benign = torch.randn(2000, generator=g).abs() * 0.01 + 0.02
    return ProofOfWork(benign_bits=8, bits_per_spread=4, max_bits=20).calibrate(benign), benign


def test_actions_pow_calibration_keeps_benign_p99_within_budget(calibrated):
    pow_, benign = calibrated
    assert torch.quantile(pow_.bits_for(benign).double(), 0.99) <= 8
    assert pow_.calibration_["benign_fraction_within_budget"] >= 0.99


@pytest.mark.parametrize(("spreads", "bits"), [
    (0, 8),  # the anchor pays exactly benign_bits
    (1, 12),  # +4 bits per spread
    (2, 16),
    (1e12, 20),  # capped
    (float("nan"), 20),  # NaN pays the cap (fails closed)
])
def test_actions_pow_bits_by_hand(calibrated, spreads, bits):
    pow_, _ = calibrated
    score = torch.tensor([pow_.anchor_ + spreads * pow_.spread_], dtype=torch.float64)
    assert pow_.bits_for(score).item() == bits


def test_actions_pow_bits_grow_with_the_score(calibrated):
    pow_, _ = calibrated
    assert (pow_.bits_for(torch.linspace(-1, 1, 200)).diff() >= 0).all()


def test_actions_pow_leaves_answers_and_prices_each_query(calibrated):
    pow_, _ = calibrated
    p = torch.softmax(torch.randn(2, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    scores = torch.tensor([pow_.anchor_, pow_.anchor_ + pow_.spread_], dtype=torch.float64)
    out = pow_.apply(None, p, scores, 0.0)
    assert torch.equal(out.probabilities, p)  # the same tensor passed through
    assert out.work_bits.tolist() == [8, 12]
    assert out.actions == ("pow", "pow")


def test_actions_pow_needs_calibration():
    with pytest.raises(NotCalibratedError):
        ProofOfWork().bits_for(torch.zeros(1))


@pytest.mark.parametrize("bad", [{"benign_bits": 30, "max_bits": 20}, {"max_bits": 65}, {"min_bits": -1},
                                 {"bits_per_spread": 0}, {"quantile": 0.5}, {"quantile": 1.0}], ids=str)
def test_actions_pow_refuses_bad_arguments(bad):
    with pytest.raises(ValueError):
        ProofOfWork(**bad)
