"""Calibration-conditional p-values (``ConformalCalibrator(conditional=eta)``): the margin by hand, both
code paths, persistence, the property that makes them valid given the calibration set, and what they
change for a benign client's martingale on an unlucky calibration draw."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sameguard.bench.config import parse_config
from sameguard.evidence import ConformalCalibrator, MixtureMartingale


def _pooled(eta: float | None, reference=(3.0, 1.0, 4.0, 2.0)) -> ConformalCalibrator:
    return ConformalCalibrator(conditional=eta).fit(torch.tensor(reference, dtype=torch.float64), None, 1)


@pytest.mark.parametrize(("score", "conservative"), [(0.0, 1.0), (2.5, 3 / 5), (4.0, 2 / 5), (10.0, 1 / 5)])
def test_margin_added_to_the_conservative_p_value_by_hand(score, conservative):
    eps = math.sqrt(math.log(1 / 0.5) / (2 * 4))   # R = 1 reference, m = 4, eta = 0.5: 0.2944
    p = _pooled(0.5).p_values(torch.tensor([score]), generator=torch.Generator().manual_seed(0)).item()
    assert p == pytest.approx(min(1.0, conservative + eps), abs=1e-15)
    assert _pooled(0.5).margin(4) == pytest.approx(0.29435250562886867, abs=1e-15)


def test_without_conditional_nothing_changes():
    calibrator = _pooled(None)
    assert calibrator.margin(4) == 0.0
    theta = torch.tensor([0.25], dtype=torch.float64)
    assert calibrator.p_values(torch.tensor([2.5]), theta=theta).item() == pytest.approx((2 + 0.25) / 5, abs=1e-15)


def test_smoothing_is_ignored_with_conditional():
    calibrator = _pooled(0.1)
    a = calibrator.p_values(torch.tensor([2.0, 9.0]), theta=torch.tensor([0.1, 0.9], dtype=torch.float64))
    b = calibrator.p_values(torch.tensor([2.0, 9.0]), theta=torch.tensor([1.0, 0.2], dtype=torch.float64))
    assert torch.equal(a, b)


def test_union_bound_counts_own_references_plus_the_pooled_one():
    # class 0: 60 scores (its own reference), class 1: 10 (< min_class_size 50: uses the pooled 70)
    scores = torch.cat([torch.linspace(0, 1, 60), torch.linspace(0, 1, 10)]).double()
    labels = torch.cat([torch.zeros(60), torch.ones(10)]).long()
    calibrator = ConformalCalibrator(conditional=1e-2).fit(scores, labels, 2)
    assert calibrator.margin(60) == pytest.approx(math.sqrt(math.log(2 / 1e-2) / 120), abs=1e-15)
    p = calibrator.p_values(torch.tensor([2.0, 2.0]), torch.tensor([0, 1]))
    assert p[0].item() == pytest.approx(1 / 61 + math.sqrt(math.log(200) / 120), abs=1e-15)
    assert p[1].item() == pytest.approx(1 / 71 + math.sqrt(math.log(200) / 140), abs=1e-15)


def test_tensor_and_numpy_paths_give_the_same_bits():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(400, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (400,), generator=g)
    calibrator = ConformalCalibrator(conditional=1e-3).fit(scores, labels, 4)
    queries = torch.randn(64, generator=g, dtype=torch.float64) * 2
    query_labels = torch.randint(0, 4, (64,), generator=g)
    theta = torch.rand(64, generator=g, dtype=torch.float64) * 0.5 + 0.5
    expected = calibrator.checked_p_values(queries, query_labels, theta)
    got = calibrator.p_values_array(queries.numpy(), query_labels.numpy(), theta.numpy())
    assert np.array_equal(expected.numpy(), got)
    for i in range(4):  # single queries take the one-class path
        one = calibrator.p_values_array(queries[i:i + 1].numpy(), query_labels[i:i + 1].numpy(), theta[i:i + 1].numpy())
        assert one[0] == expected[i].item()


def test_saved_and_loaded_with_its_eta(tmp_path):
    calibrator = _pooled(0.05)
    calibrator.save(tmp_path / "cal", detector_sha256=None, victim_sha256=None)
    loaded = ConformalCalibrator.load(tmp_path / "cal")
    assert loaded.conditional == 0.05
    x = torch.tensor([0.5, 2.5, 7.0])
    assert torch.equal(loaded.p_values(x, theta=torch.ones(3, dtype=torch.float64)),
                       calibrator.p_values(x, theta=torch.ones(3, dtype=torch.float64)))


def test_calibration_saved_before_the_option_loads_as_marginal():
    calibrator = _pooled(None)
    config = {k: v for k, v in calibrator.config().items() if k != "conditional"}
    assert ConformalCalibrator.from_state(calibrator.state_dict(), config).conditional is None


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0, -0.1, 2.0, float("nan"), "0.1"])
def test_eta_must_be_in_zero_to_one_half(eta):
    with pytest.raises(ValueError, match="conditional"):
        ConformalCalibrator(conditional=eta)


def test_adjusted_p_values_dominate_the_true_survival_function_given_the_calibration():
    """The defining property: whenever the one-sided DKW event holds for a calibration draw, the adjusted
    p-value of every score s is at least S(s) = P(benign score >= s), so a benign query's p-value is
    super-uniform given that calibration. Uniform scores on [0, 1]: S(s) = 1 - s. Checked on many
    draws; a margin that is too small (or missing) fails on some of them."""
    eta, m = 0.05, 200
    grid = torch.linspace(-0.01, 1.01, 2001, dtype=torch.float64)
    truth = torch.clamp(1.0 - grid, 0.0, 1.0)
    events = dips = 0
    for seed in range(60):
        reference = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        calibrator = ConformalCalibrator(conditional=eta).fit(reference, None, 1)
        eps = calibrator.margin(m)
        empirical = (reference[None, :] >= grid[:, None]).double().mean(1)   # #{s_j >= s} / m
        if float((truth - empirical).max()) > eps:
            continue  # outside the DKW event (probability at most eta): no promise
        events += 1
        p = calibrator.p_values(grid)
        assert bool((p >= truth - 1e-12).all()), f"seed {seed}"
        marginal = ConformalCalibrator(smoothed=False).fit(reference, None, 1).p_values(grid)
        dips += float((truth - marginal).max()) > 0.01  # the plain p-value falls clearly below S
    assert events >= 50 and dips >= 10


def _alarmed_clients(calibrator: ConformalCalibrator, clients: int, length: int, delta: float, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(clients * length, generator=g, dtype=torch.float64)
    theta = 1.0 - torch.rand(clients * length, generator=g, dtype=torch.float64)
    p = calibrator.p_values(scores, theta=theta).numpy().reshape(clients, length)
    martingale = MixtureMartingale()
    state = np.repeat(martingale.initial_state().numpy()[None], clients, axis=0)
    _, log_evidence = martingale.update_array(state, p)
    return int((log_evidence.max(axis=1) >= math.log(1 / delta)).sum())


def test_unlucky_calibration_alarms_benign_clients_unless_conditional():
    """A calibration draw whose scores sit low (here: the benign N(0, 1) scores' draw shifted by -0.15,
    about what an unlucky draw of 300 gives one time in 200) makes every benign p-value a little too
    small; over 300 queries the marginal martingales drift up and alarm far more than delta x clients.
    The calibration-conditional p-values do not."""
    g = torch.Generator().manual_seed(11)
    reference = torch.randn(300, generator=g, dtype=torch.float64) - 0.15
    delta, clients = 1e-2, 400
    marginal = _alarmed_clients(ConformalCalibrator().fit(reference, None, 1), clients, 300, delta, 1)
    conditional = _alarmed_clients(ConformalCalibrator(conditional=1e-2).fit(reference, None, 1), clients, 300, delta, 1)
    assert marginal > 3 * delta * clients
    assert conditional == 0


def test_still_alarms_an_obvious_attacker_within_a_few_dozen_queries():
    g = torch.Generator().manual_seed(5)
    calibrator = ConformalCalibrator(conditional=1e-3).fit(torch.randn(500, generator=g, dtype=torch.float64), None, 1)
    p = calibrator.p_values(torch.randn(100, generator=g, dtype=torch.float64) + 6.0).numpy()[None]
    martingale = MixtureMartingale()
    _, log_evidence = martingale.update_array(martingale.initial_state().numpy()[None], p)
    first = int(np.argmax(log_evidence[0] >= math.log(1e3))) + 1
    assert log_evidence[0, -1] >= math.log(1e3) and 5 <= first <= 40


def test_bench_config_takes_the_option_and_the_saved_standard_seeds_are_the_profiles():
    """The standard profile sets the option, every file saved in docs/results/standard is one it reads
    back (a full seed, or a seed of its detection-only pass), and another value of the option is
    another key."""
    import dataclasses
    import tomllib
    from importlib import resources

    from sameguard.bench.config import load_config
    from sameguard.bench.runner import _seed_results_path

    standard = load_config("standard")
    assert standard.alarms.calibration_conditional == 1e-3
    path = lambda c, seed, detection=False: _seed_results_path(c, "fashion-mnist", seed, Path("cache"), detection).name
    saved = Path(__file__).resolve().parents[2] / "docs" / "results" / "standard"
    readable = {path(standard, s, d) for s in standard.seeds for d in (False, True)}
    files = {p.name for p in saved.glob("results-*.json")}
    assert files and files <= readable
    marginal = dataclasses.replace(standard, alarms=dataclasses.replace(standard.alarms, calibration_conditional=None))
    assert path(marginal, 0) != path(standard, 0)
    raw = tomllib.loads(resources.files("sameguard.bench.profiles").joinpath("standard.toml").read_text())
    raw["alarms"]["calibration_conditional"] = 1e-3
    assert parse_config(raw).alarms.calibration_conditional == 1e-3
    raw["alarms"]["calibration_conditional"] = 1.5
    with pytest.raises(ValueError, match="calibration_conditional"):
        parse_config(raw)
    raw["alarms"]["calibration_conditional"] = 1e-3
    raw["alarms"]["stream_pool_size"] = 14  # another stream test: another key; unset, the saved seeds' key
    pooled = parse_config(raw)
    assert pooled.alarms.stream_pool_size == 14 and standard.alarms.stream_pool_size is None
    assert path(pooled, 0) != path(standard, 0)
    raw["alarms"]["stream_pool_size"] = 0
    with pytest.raises(ValueError, match="stream_pool_size"):
        parse_config(raw)
