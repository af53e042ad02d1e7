"""The adaptive attackers (issue 13): each one's defining behaviour on hand-made inputs and a tiny victim,
budgets spent exactly, seeds, hard labels."""

from __future__ import annotations

import pytest
import torch

from sameguard.attacks import (
    BlendKnockoff,
    FilteredKnockoff,
    InterleaveKnockoff,
    KeyRing,
    MixupKnockoff,
    SlowAndWideKnockoff,
    attack_data,
    attack_data_role,
    blend,
    build_attack,
    interleave_schedule,
    key_names,
    least_suspicious,
)
from sameguard.data import ImageDataset
from sameguard.guard import Guard
from sameguard.prediction_api import BoundClient, BudgetExceededError

FAST = {"epochs": 1, "batch_size": 32}
ADAPTIVE = {
    "knockoff-blend": {"lam": 0.3, "num_seeds": 10},
    "knockoff-mixup": {},
    "knockoff-interleave": {"rho": 0.25},
    "knockoff-filtered": {"scorer": "msp", "pool_factor": 2.0, "rounds": 2, "round_epochs": 1},
    "knockoff-wide": {"keys": 3},
}


@pytest.fixture(scope="module")
def pools(fmnist_small):
    train, _ = fmnist_small
    rest, seeds = train.split_off(0.1, seed=3)
    return rest.take(200, seed=4), seeds.take(60, seed=5)


def make(name, pools, seed=0, **overrides):
    proxy, seeds = pools
    return build_attack(name, *attack_data(name, proxy, seeds), seed=seed, progress=False,
                        **{**FAST, **ADAPTIVE[name], **overrides})


def _dataset(images: torch.Tensor, name: str = "const") -> ImageDataset:
    return ImageDataset(name=name, split="train", images=images.float().contiguous(),
                        labels=torch.zeros(len(images), dtype=torch.long), classes=tuple(str(i) for i in range(10)),
                        hflip=False)


def _constant(value: float, n: int, name: str = "const") -> ImageDataset:
    return _dataset(torch.full((n, 1, 28, 28), value), name)


# -- the pure functions ------------------------------------------------------------------------
def test_blend_is_the_convex_mix():
    a, b = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), -1.0)
    assert torch.allclose(blend(a, b, 0.25), torch.full((2, 1, 2, 2), 0.25 - 0.75))
    per_pair = blend(a, b, torch.tensor([0.0, 1.0]))
    assert torch.equal(per_pair[0], b[0]) and torch.equal(per_pair[1], a[1])
    with pytest.raises(ValueError, match="lam"):
        blend(a, b, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        blend(a, b[:1], 0.5)


def test_interleave_schedule_spreads_exactly_round_rho_b():
    s = interleave_schedule(10, 0.3)
    assert int(s.sum()) == 3 and s.tolist() == [False, False, False, True, False, False, True, False, False, True]
    assert int(interleave_schedule(1000, 0.1).sum()) == 100
    assert not interleave_schedule(50, 0.0).any()
    gaps = torch.diff(torch.nonzero(interleave_schedule(1000, 0.25)).flatten())
    assert set(gaps.tolist()) == {4}


def test_least_suspicious_keeps_the_lowest_scores_ties_in_order():
    scores = torch.tensor([0.5, -1.0, 3.0, -1.0, 0.0])
    assert least_suspicious(scores, 3).tolist() == [1, 3, 4]
    with pytest.raises(ValueError):
        least_suspicious(scores, 6)


def test_key_names():
    assert key_names("wide", 3) == ["wide", "wide-key1", "wide-key2"]


# -- the attacks on hand-made data -------------------------------------------------------------
def test_blend_sends_lam_in_plus_one_minus_lam_proxy(random_victim):
    proxy, seeds = _constant(-1.0, 20), _constant(1.0, 5, "in")
    api = Guard(random_victim, record_inputs=True, keep_decisions=0)
    res = BlendKnockoff(proxy, seeds, lam=0.3, num_seeds=5, **FAST, progress=False).run(api, 17)
    sent = api.inputs(res.client)
    assert sent.shape == (17, 1, 28, 28)
    assert torch.allclose(sent, torch.full_like(sent, 0.3 * 1.0 + 0.7 * -1.0))
    assert res.details["lam"] == 0.3


def test_mixup_fixed_lam_and_beta_draws(random_victim):
    proxy = _dataset(torch.cat([torch.full((10, 1, 28, 28), 1.0), torch.full((10, 1, 28, 28), -1.0)]), "two")
    api = Guard(random_victim, record_inputs=True, keep_decisions=0)
    res = MixupKnockoff(proxy, lam=1.0, **FAST, progress=False).run(api, 20)
    firsts = api.inputs(res.client)[:, 0, 0, 0]
    assert sorted(firsts.tolist()) == [-1.0] * 10 + [1.0] * 10  # lam = 1 sends the first image of each pair
    api2 = Guard(random_victim, record_inputs=True, keep_decisions=0)
    res2 = MixupKnockoff(proxy, alpha=1.0, **FAST, progress=False).run(api2, 64)
    values = api2.inputs(res2.client)[:, 0, 0, 0]
    assert bool(((values >= -1) & (values <= 1)).all()) and len(torch.unique(values)) > 20
    assert 0.3 < res2.details["mean_lam"] < 0.7


def test_interleave_sends_rho_cover_queries_at_the_scheduled_positions(random_victim):
    proxy, seeds = _constant(-1.0, 30), _constant(1.0, 7, "in")
    api = Guard(random_victim, record_inputs=True, keep_decisions=0)
    res = InterleaveKnockoff(proxy, seeds, rho=0.2, **FAST, progress=False).run(api, 40)
    sent = api.inputs(res.client)[:, 0, 0, 0]
    assert torch.equal(sent == 1.0, interleave_schedule(40, 0.2))
    assert res.details["cover_queries"] == 8 and res.details["proxy_queries"] == 32


def test_filtered_sends_the_lowest_scored_candidates(random_victim, monkeypatch):
    # Candidates are constant images of value v; a scorer that calls brighter images more suspicious
    # must make the attack send the darkest ones of its pool.
    values = torch.linspace(-1, 1, 40)
    proxy = _dataset(values.view(-1, 1, 1, 1).expand(40, 1, 28, 28).clone(), "ramp")
    monkeypatch.setattr(FilteredKnockoff, "_score", lambda self, x, model, same: x.mean((1, 2, 3)).double())
    api = Guard(random_victim, record_inputs=True, keep_decisions=0)
    attack = FilteredKnockoff(proxy, scorer="msp", pool_factor=4.0, rounds=3, round_epochs=1, **FAST, progress=False)
    res = attack.run(api, 10)
    sent = api.inputs(res.client)[:, 0, 0, 0]
    # round 1 is a random warm-up (no substitute yet); rounds 2-3 take the darkest candidates left
    warm = sent[:3]
    left = sorted(set(values.tolist()) - set(warm.tolist()))
    assert sorted(sent[3:].tolist()) == pytest.approx(left[:7])
    assert res.details["pool_size"] == 40 and res.details["copy_score_sent_mean"] < res.details["copy_score_pool_mean"]


def test_filtered_with_a_same_copy_runs_and_prefers_low_copy_scores(random_victim, pools):
    proxy, seeds = pools
    attack = FilteredKnockoff(proxy, seeds, scorer="same", pool_factor=3.0, rounds=2, round_epochs=1,
                              num_seeds=60, copy_preset="tiny", copy_params={"mae_epochs": 1, "aux_epochs": 1},
                              **FAST, progress=False)
    res = attack.run(Guard(random_victim), 30)
    assert res.queries == 30
    assert res.details["copy_score_sent_mean"] < res.details["copy_score_pool_mean"]
    with pytest.raises(ValueError, match="seed_data"):
        FilteredKnockoff(proxy, scorer="same")


def test_keyring_round_robin_and_blocks_split_one_budget(random_victim):
    api = Guard(random_victim)
    oracle = BoundClient(api, "w", 10)
    ring = KeyRing(oracle, 3)
    x = torch.zeros(4, 1, 28, 28)
    assert ring.query(x).shape == (4, 10)
    ring.query(torch.zeros(6, 1, 28, 28))
    assert ring.sent == {"w": 4, "w-key1": 3, "w-key2": 3} and oracle.used == 10
    assert [api.queries_used(k) for k in ring.keys] == [4, 3, 3]
    with pytest.raises(BudgetExceededError):
        ring.query(torch.zeros(1, 1, 28, 28))
    api2 = Guard(random_victim)
    blocks = KeyRing(BoundClient(api2, "b", 10), 3, "blocks")
    blocks.query(torch.zeros(10, 1, 28, 28))
    assert blocks.sent == {"b": 4, "b-key1": 3, "b-key2": 3}
    assert blocks.key_of(torch.arange(10)).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_wide_spreads_its_budget_over_keys(random_victim, pools):
    api = Guard(random_victim)
    res = SlowAndWideKnockoff(pools[0], keys=4, **FAST, progress=False).run(api, 50)
    assert res.queries == 50 and res.details["per_key"] == {"knockoff-wide": 13, "knockoff-wide-key1": 13,
                                                             "knockoff-wide-key2": 12, "knockoff-wide-key3": 12}
    assert sum(api.queries_used(k) for k in res.details["keys"]) == 50 == api.total_queries


# -- the shared contract ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_attacks_are_registered_and_spend_exactly_their_budget(name, random_victim, pools):
    assert attack_data_role(name) in ("proxy", "proxy+seeds")
    api = Guard(random_victim, budget=None if name == "knockoff-wide" else 45)
    res = make(name, pools).run(api, 45)
    assert res.attack == name and res.queries == 45 == api.total_queries


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_attacks_same_seed_same_queries_and_substitute(name, random_victim, pools, fmnist_small):
    x = fmnist_small[1].images[:32]
    runs = []
    for seed in (0, 0, 1):
        api = Guard(random_victim, record_inputs=True, keep_decisions=0)
        res = make(name, pools, seed=seed).run(api, 40)
        runs.append((api.inputs(res.client), res.substitute(x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_attacks_hard_label(name, tiny_victim, pools, fmnist_small):
    api = Guard(tiny_victim, output="labels")
    res = make(name, pools).run(api, 40, test_data=fmnist_small[1])
    assert res.output == "labels" and res.queries == 40
    assert 0.0 <= res.test_accuracy <= 1.0 and 0.0 <= res.fidelity <= 1.0


def test_adaptive_attacks_refuse_bad_parameters(pools):
    proxy, seeds = pools
    with pytest.raises(ValueError, match="lam"):
        BlendKnockoff(proxy, seeds, lam=-0.1)
    with pytest.raises(ValueError, match="seed_data"):
        BlendKnockoff(proxy, None)
    with pytest.raises(ValueError, match="rho"):
        InterleaveKnockoff(proxy, seeds, rho=1.0)
    with pytest.raises(ValueError, match="pool_factor"):
        FilteredKnockoff(proxy, pool_factor=0.5)
    with pytest.raises(ValueError, match="scorer"):
        FilteredKnockoff(proxy, scorer="odin")
    with pytest.raises(ValueError, match="rotation"):
        SlowAndWideKnockoff(proxy, rotation="random")


# -- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, params", [("knockoff-blend", ["lam=0.4", "num_seeds=20"]),
                                          ("knockoff-wide", ["keys=3"])])
def test_cli_runs_adaptive_attacks_with_params(name, params, tiny_victim, tmp_path, capsys):
    from sameguard.cli import main

    tiny_victim.save(tmp_path / "victim")
    argv = ["attack", name, "--victim", str(tmp_path / "victim"), "--budget", "30", "--epochs", "1", "--no-progress",
            "--output", "labels"]
    for p in params:
        argv += ["--param", p]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{name}: 30/30 queries" in out


def test_over_keys_spreads_any_attack_and_keeps_its_queries(random_victim, pools):
    from sameguard.attacks import over_keys

    proxy, seeds = pools
    plain_api, wide_api = Guard(random_victim, record_inputs=True, keep_decisions=0), Guard(random_victim,
                                                                                           record_inputs=True,
                                                                                           keep_decisions=0)
    attack = BlendKnockoff(proxy, seeds, lam=0.5, num_seeds=10, **FAST, progress=False)
    plain = attack.run(plain_api, 20)
    wide = over_keys(attack, 2).run(wide_api, 20)
    assert wide.details["per_key"] == {"knockoff-blend": 10, "knockoff-blend-key1": 10}
    assert torch.equal(wide_api.inputs("knockoff-blend"), plain_api.inputs(plain.client)[0::2])
    assert torch.equal(wide_api.inputs("knockoff-blend-key1"), plain_api.inputs(plain.client)[1::2])
    assert "keys" not in plain.details  # the original attack is unchanged
