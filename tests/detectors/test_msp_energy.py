"""MSP and energy baselines: the formulas on hand-computed values, the black-box/white-box split."""

from __future__ import annotations

import math

import pytest
import torch

from sameguard.detectors.energy import EnergyDetector, energy_score
from sameguard.detectors.msp import MSPDetector, msp_score


def test_msp_score_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]])
    assert torch.allclose(msp_score(p), torch.tensor([-0.7, -1 / 3, -1.0]))
    assert msp_score(p).dtype == torch.float32


def test_msp_score_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        msp_score(torch.ones(3))


def test_energy_score_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, -10.0]])
    expected = torch.tensor([-math.log(2), -(2 + math.log(2)), -(10 + math.log1p(math.exp(-20)))])
    assert torch.allclose(energy_score(logits), expected)
    # T = 2: -2 * logsumexp([1, 1]) = -2 * (1 + log 2)
    assert torch.allclose(energy_score(logits[1:2], temperature=2.0), torch.tensor([-2 * (1 + math.log(2))]))


def test_energy_at_temperature_one_is_the_general_formula_bit_for_bit():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(1)) * 7
    general = (-1.0 * torch.logsumexp(logits.double() / 1.0, dim=1)).float()
    assert torch.equal(energy_score(logits), general)
    assert not torch.equal(energy_score(logits, temperature=1.5), general)


def test_energy_of_one_row_on_python_floats_equals_the_batch_formula():
    logits = torch.randn(300, 10, generator=torch.Generator().manual_seed(2)) * 7
    special = torch.tensor([[1.0, math.inf, 2.0], [-math.inf] * 3, [math.nan, 1.0, 0.0], [1e30, -1e30, 5.0]])
    for t in (1.0, 0.3):
        batch = energy_score(logits, temperature=t)  # several rows: torch.logsumexp
        rows = torch.cat([energy_score(logits[i:i + 1], temperature=t) for i in range(len(logits))])
        assert rows.dtype == torch.float32 and rows.shape == (300,)
        torch.testing.assert_close(rows, batch, rtol=1e-6, atol=0)  # float64 sums in another order
        for row in special:
            one = energy_score(row[None], temperature=t)
            general = (-t * torch.logsumexp(row[None].double() / t, 1)).float()
            assert torch.equal(one, general) or (one.isnan().all() and general.isnan().all())
    grad = logits[:1].clone().requires_grad_(True)  # a gradient wanted: the tensor path
    energy_score(grad).sum().backward()
    torch.testing.assert_close(grad.grad, -torch.softmax(logits[:1], 1))


def test_energy_sign_confident_logits_are_lower():
    """Large, peaked logits (in-distribution) give lower energy than flat, small ones."""
    confident, unsure = torch.tensor([[12.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.1]])
    assert energy_score(confident) < energy_score(unsure)


def test_energy_of_log_probabilities_is_constant():
    """Why the energy needs logits: with log-probabilities every query has energy 0."""
    p = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), 1)
    assert torch.allclose(energy_score(torch.log(p)), torch.zeros(5), atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_energy_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        energy_score(torch.zeros(1, 2), temperature=bad)


def test_energy_needs_logits():
    probabilities_only = lambda x: torch.full((len(x), 10), 0.1)  # noqa: E731
    with pytest.raises(ValueError, match="logits"):
        EnergyDetector().fit(probabilities_only)


def test_msp_uses_only_probabilities(baseline_victim, fmnist_tiny):
    """A plain probability function gives the same scores as the Victim object."""
    _, test = fmnist_tiny
    x = test.images[:40]
    from_victim = MSPDetector().fit(baseline_victim).score(x)
    from_function = MSPDetector().fit(lambda b: baseline_victim.predict_proba(b)).score(x)
    torch.testing.assert_close(from_victim, from_function)
    assert torch.allclose(from_victim, -baseline_victim.predict_proba(x).max(1).values)


def test_energy_matches_victim_logits(baseline_victim, fmnist_tiny):
    _, test = fmnist_tiny
    x = test.images[:40]
    scores = EnergyDetector(temperature=2.0).fit(baseline_victim).score(x)
    assert torch.allclose(scores, -2.0 * torch.logsumexp(baseline_victim.logits(x) / 2.0, 1), atol=1e-5)


def test_scores_from_the_victims_outputs_equal_score_and_only_for_that_victim(baseline_victim, fmnist_tiny):
    """The alarms' shortcut: scores from outputs the guard already has are score(x) exactly, and a
    detector that reads another victim (or a wrapper of this one) declines with None."""
    import copy

    _, test = fmnist_tiny
    x = test.images[:40]
    probs = baseline_victim.predict_proba(x)
    other = copy.copy(baseline_victim)
    msp, energy = MSPDetector().fit(baseline_victim), EnergyDetector(temperature=2.0).fit(baseline_victim)
    assert msp.score_victim_outputs(baseline_victim, x, probs) == msp.score(x).tolist()
    assert energy.score_victim_outputs(baseline_victim, x, probs) == energy.score(x).tolist()
    for i in range(3):  # a single image: Python floats computed without tensors, the same float32 values
        one, p_one = x[i:i + 1], probs[i:i + 1]
        assert msp.score_victim_outputs(baseline_victim, one, p_one) == [float(msp.score(x)[i])]
        got = energy.score_victim_outputs(baseline_victim, one, p_one)
        assert len(got) == 1 and got[0] == pytest.approx(float(energy.score(x)[i]), rel=1e-6, abs=1e-6)
    nan_row = torch.full((1, probs.shape[1]), float("nan"))
    assert math.isnan(msp.score_victim_outputs(baseline_victim, x[:1], nan_row)[0])  # fail closed
    for detector in (msp, energy):
        assert detector.score_victim_outputs(other, x, probs) is None
    wrapped = MSPDetector().fit(lambda b: baseline_victim.predict_proba(b))
    assert wrapped.score_victim_outputs(baseline_victim, x, probs) is None
    assert MSPDetector().score_victim_outputs(baseline_victim, x, probs) is None  # not fitted


def test_msp_checks_victim_output():
    wrong = lambda x: torch.ones(len(x) + 1, 3)  # noqa: E731
    with pytest.raises(ValueError, match="victim returned shape"):
        MSPDetector().fit(wrong).score(torch.zeros(2, 1, 28, 28))


def test_msp_single_row_path_equals_the_batch_formula():
    """One row (the guard's single-image request) goes through Python floats: the same float32 values
    as the tensor reduction, NaN included."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 10, generator=g, dtype=torch.float64), dim=1)
    probs[7, 3] = float("nan")
    batch = msp_score(probs)
    for i in range(50):
        one = msp_score(probs[i:i + 1])
        assert one.dtype == torch.float32 and one.shape == (1,)
        assert torch.equal(one, batch[i:i + 1]) or (bool(one.isnan()) and bool(batch[i].isnan()))
