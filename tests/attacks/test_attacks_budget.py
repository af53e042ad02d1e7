"""Every attack spends its budget exactly, never more, is reproducible, and handles label-only APIs."""

from __future__ import annotations

import pytest
import torch

from sameguard.attacks import (
    ATTACKS,
    DFME,
    JBDA,
    AttackResult,
    KnockoffNets,
    NormalUser,
    UnsupportedOutputError,
    attack_data_role,
    build_attack,
)
from sameguard.guard import Guard
from sameguard.prediction_api import BudgetExceededError

# Small settings so that each run takes well under a second.
FAST = {
    "knockoff": {"epochs": 1, "batch_size": 32},
    "knockoff-adaptive": {"epochs": 1, "batch_size": 32},
    "jbda": {"epochs": 1, "num_seeds": 20, "batch_size": 32},
    "jbda-tr": {"epochs": 1, "num_seeds": 20, "batch_size": 32},
    "dfme": {"batch_size": 8, "nz": 16, "ngf": 8},
}
#: The adaptive attackers have their own tests (test_attacks_adaptive.py).
ADAPTIVE = {"knockoff-blend", "knockoff-mixup", "knockoff-interleave", "knockoff-filtered", "knockoff-wide"}
CLASSIC = sorted(FAST)


@pytest.fixture(scope="module")
def attacker_data(fmnist_small):
    train, _ = fmnist_small
    return train.take(300, seed=5)


def make(name: str, data, seed: int = 0, **overrides):
    role = attack_data_role(name)
    args = (data,) if role in ("proxy", "seeds") else ()
    return build_attack(name, *args, seed=seed, progress=False, **{**FAST[name], **overrides})


def test_attacks_registry_names(attacker_data):
    assert set(ATTACKS) == {"knockoff", "knockoff-adaptive", "jbda", "jbda-tr", "dfme"} | ADAPTIVE
    for name in CLASSIC:
        assert make(name, attacker_data).name == name
    with pytest.raises(ValueError, match="Unknown attack"):
        build_attack("copycat")


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("budget", [37, 130])
def test_attacks_spend_exactly_their_budget(name, budget, random_victim, attacker_data):
    # The API itself refuses anything beyond the budget, so overshooting would raise.
    api = Guard(random_victim, budget=budget)
    result = make(name, attacker_data).run(api, budget)
    assert isinstance(result, AttackResult)
    assert result.queries == budget == api.queries_used(result.client) == api.total_queries
    assert result.client == name and result.attack == name
    assert result.test_accuracy is None and result.fidelity is None  # no test data given


@pytest.mark.parametrize("name", CLASSIC)
def test_attacks_same_seed_same_substitute(name, random_victim, attacker_data, fmnist_small):
    _, test = fmnist_small
    x = test.images[:64]
    outs = []
    for seed in (3, 3, 4):
        sub = make(name, attacker_data, seed=seed).run(Guard(random_victim), 60).substitute
        outs.append((sub.state_dict(), sub(x).detach()))
    (w1, y1), (w2, y2), (_, y3) = outs
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)  # another seed, another substitute


def test_attacks_refuse_a_budget_larger_than_the_api_allows(random_victim, attacker_data):
    api = Guard(random_victim, budget=50)
    with pytest.raises(BudgetExceededError, match="50"):
        make("knockoff", attacker_data).run(api, 51, client="thief")
    assert api.queries_used("thief") == 0  # checked before anything was sent
    api.query(attacker_data.images[:10], "thief")
    result = make("jbda", attacker_data).run(api, 40, client="thief")
    assert result.queries == 40 and api.remaining("thief") == 0


@pytest.mark.parametrize("name", ["knockoff", "jbda", "jbda-tr"])
def test_attacks_label_only_api_works_for_label_capable_attacks(name, random_victim, attacker_data):
    api = Guard(random_victim, output="labels")
    result = make(name, attacker_data).run(api, 50)
    assert result.queries == 50 and result.output == "labels"


@pytest.mark.parametrize("name", ["dfme", "knockoff-adaptive"])
def test_attacks_label_only_api_refused_by_probability_attacks(name, random_victim, attacker_data):
    api = Guard(random_victim, output="labels")
    with pytest.raises(UnsupportedOutputError, match="probabilit"):
        make(name, attacker_data).run(api, 50)
    assert api.total_queries == 0


def test_attacks_adaptive_knockoff_with_label_rewards_runs_on_labels(random_victim, attacker_data):
    attack = make("knockoff-adaptive", attacker_data, reward="loss")
    assert not attack.requires_probabilities()
    assert attack.run(Guard(random_victim, output="labels"), 40).queries == 40


def test_attacks_evaluate_offline_without_counting(random_victim, attacker_data, fmnist_small):
    _, test = fmnist_small
    api = Guard(random_victim)
    result = make("knockoff", attacker_data).run(api, 40, test_data=test.take(100, seed=0))
    assert api.total_queries == 40  # evaluation used the victim offline
    assert 0.0 <= result.test_accuracy <= 1.0 and 0.0 <= result.fidelity <= 1.0


def test_attacks_guarded_api_scores_one_attackers_queries(random_victim, attacker_data, fmnist_small):
    """An attack and a normal user through a Guard: each client's scores are its own queries'."""
    _, test = fmnist_small

    class MeanDetector:
        threshold_ = None

        def score(self, x):
            return x.mean(dim=(1, 2, 3))

    api = Guard(random_victim, MeanDetector(), record_inputs=True)
    attack = make("jbda", attacker_data).run(api, 45)
    user = NormalUser(test, seed=0, query_batch_size=16).run(api, 30)
    for client, n in ((attack.client, 45), (user.client, 30)):
        torch.testing.assert_close(api.scores(client), api.inputs(client).mean(dim=(1, 2, 3)))
        assert api.scores(client).shape == (n,)
    torch.testing.assert_close(api.inputs(user.client), test.images[user.indices])


def test_attacks_constructor_validation(attacker_data):
    with pytest.raises(ValueError, match="strategy"):
        KnockoffNets(attacker_data, strategy="greedy")
    with pytest.raises(ValueError, match="reward"):
        KnockoffNets(attacker_data, reward="fun")
    with pytest.raises(ValueError, match="num_seeds"):
        JBDA(attacker_data, num_seeds=10_000)
    with pytest.raises(ValueError, match="step_size"):
        JBDA(attacker_data, step_size=0)
    with pytest.raises(ValueError, match="epochs"):
        KnockoffNets(attacker_data, epochs=0)
    with pytest.raises(ValueError, match="grad_m"):
        DFME(grad_m=0)
    with pytest.raises(ValueError, match="budget"):
        make("knockoff", attacker_data).run(Guard(lambda x: x, image_shape=(1, 28, 28), num_classes=10), 0)
