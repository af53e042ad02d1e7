"""Mixture martingales: hand-computed values, the vectorised recursions, and the false-alarm guarantee."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch

from sameguard.evidence import MODES, MixtureMartingale, default_epsilons, log_power_bet

logger = logging.getLogger(__name__)

Update = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@pytest.mark.parametrize(("p", "eps", "expected"), [
    (0.25, 0.5, 0.0),                                     # 0.5 * 0.25^-0.5 = 1
    (1.0, 0.5, math.log(0.5)),
    (0.04, 0.5, math.log(2.5)),
    (0.0, 0.5, math.log(0.5) - 0.5 * math.log(1e-12)),   # clipped to 1e-12
    (0.1, 0.2, math.log(0.2) + 0.8 * math.log(10)),
])
def test_log_power_bet(p, eps, expected):
    value = log_power_bet(torch.tensor([p], dtype=torch.float64), torch.tensor([eps], dtype=torch.float64))
    assert value.shape == (1, 1)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_every_bet_integrates_to_at_most_one():
    """∫_0^1 g_ε(p) dp = ∫_{-inf}^0 g_ε(e^t) e^t dt, by the trapezoid rule in t (smooth, unlike in p).

    Unclipped it is 1; clipping p at 1e-12 makes it exactly ``1 - (1 - ε) 1e-12^ε`` (<= 1: the
    clipped bets make a supermartingale, still valid).
    """
    eps = default_epsilons()
    t = torch.linspace(-2500.0, 0.0, 250001, dtype=torch.float64)
    integrand = (log_power_bet(t.exp(), eps) + t.unsqueeze(1)).exp()
    integral = torch.trapezoid(integrand, t, dim=0)
    torch.testing.assert_close(integral, 1 - (1 - eps) * 1e-12 ** eps, rtol=0, atol=1e-4)
    assert bool((integral <= 1 + 1e-4).all())  # trapezoid error ~1e-5


def test_two_steps_by_hand():
    martingale = MixtureMartingale([0.5])
    state, path = martingale.update(martingale.initial_state(), torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(path, torch.tensor([0.0, -math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(state, torch.tensor([-math.log(2)], dtype=torch.float64))


@pytest.mark.parametrize(("mode", "expected"), [
    # bets g(p) with eps = 0.5 for p = 1, 0.01, 1: 0.5, 5, 0.5
    ("ville", [0.5, 2.5, 1.25]),                # product
    ("cusum", [0.5, 5.0, 2.5]),                 # max(1, R) * g, R_0 = 1
    ("shiryaev-roberts", [0.5, 7.5, 4.25]),     # (1 + R) * g, R_0 = 0
])
def test_modes_by_hand(mode, expected):
    martingale = MixtureMartingale([0.5], mode=mode)
    _, path = martingale.update(martingale.initial_state(), torch.tensor([1.0, 0.01, 1.0]))
    torch.testing.assert_close(path.exp(), torch.tensor(expected, dtype=torch.float64))


def test_mixture_averages_over_the_grid():
    martingale = MixtureMartingale([0.2, 0.5])
    _, path = martingale.update(martingale.initial_state(), torch.tensor([0.1], dtype=torch.float64))
    expected = (0.2 * 0.1 ** -0.8 + 0.5 * 0.1 ** -0.5) / 2
    assert path.exp().item() == pytest.approx(expected, rel=1e-12)


def _reference_path(mode: str, state: torch.Tensor, bets: torch.Tensor) -> torch.Tensor:
    """The recursions one step at a time, in plain log space: (N, G)."""
    rows, current = [], state
    for b in bets:
        if mode == "ville":
            current = current + b
        elif mode == "cusum":
            current = b + current.clamp(min=0.0)
        else:
            current = b + torch.logaddexp(current, torch.zeros_like(current))
        rows.append(current)
    return torch.stack(rows)


@pytest.mark.parametrize("mode", MODES)
def test_vectorised_recursions_match_step_by_step(mode):
    g = torch.Generator().manual_seed(1)
    martingale = MixtureMartingale(7, mode=mode)
    p = torch.rand(60, generator=g, dtype=torch.float64) ** 3   # mostly small: the statistics move
    start = torch.randn(7, generator=g, dtype=torch.float64) * 3
    start = start if mode != "shiryaev-roberts" else start.clone().index_fill_(0, torch.tensor([0]), -math.inf)
    state, path = martingale.update(start, p)
    expected = _reference_path(mode, start, log_power_bet(p, martingale.epsilons))
    torch.testing.assert_close(path, martingale.log_value(expected), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(state, expected[-1], rtol=1e-10, atol=1e-9)
    # two batches give what one batch gives
    middle, first = martingale.update(start, p[:25])
    end, second = martingale.update(middle, p[25:])
    torch.testing.assert_close(torch.cat([first, second]), path, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(end, state, rtol=1e-10, atol=1e-9)


def test_default_grid_is_the_midpoint_rule():
    martingale = MixtureMartingale()
    torch.testing.assert_close(martingale.epsilons, torch.linspace(0.025, 0.975, 20, dtype=torch.float64))
    assert martingale.initial_state().shape == (20,)
    assert MixtureMartingale(mode="shiryaev-roberts").initial_state().isneginf().all()


def ever_alarm_fraction(update: Update, initial: torch.Tensor, *, clients: int = 2000, steps: int = 300,
                        delta: float = 0.05, seed: int = 0) -> float:
    """Fraction of simulated benign clients (i.i.d. uniform p-values) whose evidence ever reaches 1/δ."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(clients, steps, generator=g, dtype=torch.float64)
    _, path = update(initial.expand(clients, -1).clone(), p)
    return float((path.max(dim=1).values >= math.log(1 / delta)).double().mean())


def passes_false_alarm_check(fraction: float, *, clients: int = 2000, delta: float = 0.05) -> bool:
    """Ville's bound with simulation noise: fraction <= δ + 3 standard errors."""
    return fraction <= delta + 3 * math.sqrt(delta * (1 - delta) / clients)


def _broken_update(martingale: MixtureMartingale) -> Update:
    """The power bet without its ε factor: ``p^(ε-1)`` integrates to ``1/ε > 1``, not a martingale."""
    def update(state: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bets = log_power_bet(p, martingale.epsilons) - martingale.epsilons.log()
        path = state.unsqueeze(-2) + bets.cumsum(dim=-2)
        return path[..., -1, :], martingale.log_value(path)
    return update


def test_false_alarm_rate_within_villes_bound():
    martingale = MixtureMartingale()
    fraction = ever_alarm_fraction(martingale.update, martingale.initial_state())
    logger.info("Simulated ever-alarm fraction, 2000 clients x 300 uniform p-values, delta=0.05: %.4f", fraction)
    assert passes_false_alarm_check(fraction)


def test_the_false_alarm_check_catches_a_broken_bet():
    martingale = MixtureMartingale()
    fraction = ever_alarm_fraction(_broken_update(martingale), martingale.initial_state())
    logger.info("Ever-alarm fraction of the broken bet (no epsilon factor): %.4f", fraction)
    assert not passes_false_alarm_check(fraction)


def test_shiryaev_roberts_average_run_length_at_least_one_over_delta():
    """For SR the guarantee is E[time to false alarm] >= 1/δ (here 20); runs are cut at 300 steps,
    which can only make the estimate smaller."""
    martingale = MixtureMartingale(mode="shiryaev-roberts")
    g = torch.Generator().manual_seed(2)
    p = torch.rand(2000, 300, generator=g, dtype=torch.float64)
    _, path = martingale.update(martingale.initial_state().expand(2000, -1).clone(), p)
    crossed = path >= math.log(20)
    first = torch.where(crossed.any(1), crossed.double().argmax(1) + 1.0, torch.full((2000,), 300.0))
    assert float(first.mean()) >= 20


@pytest.mark.parametrize("mode", MODES)
def test_tiny_p_values_alarm_at_the_computed_query(mode):
    """p = 0.01 every query, δ = 1e-3: the first n with log mean_ε (ε 100^(1-ε))^n >= log 1000."""
    eps = [(i + 0.5) / 20 for i in range(20)]
    log_mixture = [math.log(sum((e * 100 ** (1 - e)) ** n for e in eps) / 20) for n in range(1, 30)]
    expected = next(n for n, value in enumerate(log_mixture, start=1) if value >= math.log(1000))
    assert expected == 4
    martingale = MixtureMartingale(mode=mode)
    _, path = martingale.update(martingale.initial_state(), torch.full((30,), 0.01, dtype=torch.float64))
    assert int(torch.nonzero(path >= math.log(1000))[0]) + 1 == expected  # never below 1: modes agree
    if mode == "ville":
        torch.testing.assert_close(path, torch.tensor(log_mixture + [path[-1].item()], dtype=torch.float64),
                                   rtol=1e-10, atol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epsilons": [0.0, 0.5]}, "epsilon"),
    ({"epsilons": [0.5, 1.0]}, "epsilon"),
    ({"epsilons": []}, "epsilons"),
    ({"epsilons": 0}, "epsilons"),
    ({"epsilons": "0.5"}, "epsilons"),
    ({"mode": "sr"}, "mode"),
])
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtureMartingale(**kwargs)


@pytest.mark.parametrize(("state", "p", "message"), [
    (torch.zeros(3), torch.tensor([0.5]), r"\(\.\.\., 20\)"),
    (torch.zeros(20), torch.tensor([1.5]), r"\[0, 1\]"),
    (torch.zeros(20), torch.tensor([-0.1]), r"\[0, 1\]"),
    (torch.zeros(20), torch.tensor([math.nan]), "NaN"),
    (torch.zeros(20), torch.tensor(0.5), r"\(\.\.\., N\)"),
])
def test_update_validation(state, p, message):
    with pytest.raises(ValueError, match=message):
        MixtureMartingale().update(state, p)


def test_empty_batch_keeps_the_state():
    martingale = MixtureMartingale()
    state, path = martingale.update(martingale.initial_state() + 1.0, torch.empty(0))
    assert path.shape == (0,)
    torch.testing.assert_close(state, martingale.initial_state() + 1.0)
