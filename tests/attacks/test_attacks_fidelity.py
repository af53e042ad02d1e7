"""End to end on a tiny real victim: Knockoff (in-distribution proxy) and JBDA really copy it."""

from __future__ import annotations

import pytest
import torch

from sameguard.attacks import JBDA, KnockoffNets
from sameguard.guard import Guard
from sameguard.victim import train_victim


@pytest.fixture(scope="module")
def setting(fmnist_small):
    """A LeNet-5 victim trained on 1500 Fashion-MNIST images (about 60 % accuracy, a few seconds),
    600 other training images for the attacker, and 1000 test images."""
    train, test = fmnist_small
    victim = train_victim(train.take(1500, seed=0), arch="lenet5", epochs=4, lr=0.05, batch_size=32, seed=0,
                          progress=False)
    attacker = train.take(2400, seed=0).take(600, seed=7)  # the attacker's own in-distribution images
    victim_preds = victim.predict(test.images)
    # What a substitute that learnt nothing could reach: always the victim's most frequent class.
    chance = max(1 / victim.num_classes, torch.bincount(victim_preds, minlength=10).max().item() / len(test))
    return victim, attacker, test, chance


@pytest.mark.parametrize("output", ["probabilities", "labels"])
def test_attacks_knockoff_in_distribution_copies_the_victim(setting, output):
    victim, attacker, test, chance = setting
    attack = KnockoffNets(attacker, epochs=20, lr=0.05, momentum=0.9, batch_size=32, seed=0, progress=False)
    result = attack.run(Guard(victim, output=output), 300, test_data=test)
    assert result.queries == 300
    assert result.fidelity > chance + 0.45, (result.fidelity, chance)
    assert result.test_accuracy > 0.45


@pytest.mark.parametrize("output", ["probabilities", "labels"])
def test_attacks_jbda_copies_the_victim(setting, output):
    victim, attacker, test, chance = setting
    attack = JBDA(attacker, num_seeds=50, epochs=20, lr=0.05, batch_size=32, seed=0, progress=False)
    result = attack.run(Guard(victim, output=output), 200, test_data=test)
    assert result.queries == 200 and result.details["added_per_round"] == [50, 50, 100]
    assert result.fidelity > chance + 0.35, (result.fidelity, chance)
