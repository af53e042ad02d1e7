"""Promises the README makes about the library that no other test pins down.

* attacks against a prediction API that holds no model (the HTTP client) report the substitute's
  test accuracy when given ``test_data`` and its fidelity when given the victim (README, Attacks;
  docs/service.md);
* "any callable images -> probabilities works" as a victim for SAME, once ``aux_arch`` names the
  auxiliary classifier's architecture; without it ``fit`` says so (README, conventions).
"""

from __future__ import annotations

import pytest
import torch

from sameguard.attacks import JBDA
from sameguard.detectors import SAMEDetector
from sameguard.guard import Guard


class RemoteLike:
    """A PredictionAPI that, like ``SameguardClient``, exposes no victim or architecture."""

    def __init__(self, api: Guard) -> None:
        self._api = api
        self.output = api.output
        self.image_shape = api.image_shape
        self.num_classes = api.num_classes

    def query(self, x: torch.Tensor, client: str = "anonymous") -> torch.Tensor:
        return self._api.query(x, client)

    def queries_used(self, client: str) -> int:
        return self._api.queries_used(client)

    def remaining(self, client: str) -> int | None:
        return self._api.remaining(client)


def test_attack_metrics_against_an_api_without_a_model(tiny_victim, fmnist_small):
    train, test = fmnist_small
    api = RemoteLike(Guard(tiny_victim))
    assert not hasattr(api, "victim")
    small_test = test.take(200, seed=0)
    attack = JBDA(train, num_seeds=10, epochs=1, progress=False, seed=0)
    bare = attack.run(api, 30)
    assert bare.test_accuracy is None and bare.fidelity is None
    measured = JBDA(train, num_seeds=10, epochs=1, progress=False, seed=0).run(api, 30, victim=tiny_victim,
                                                                             test_data=small_test)
    assert 0.0 <= measured.test_accuracy <= 1.0 and 0.0 <= measured.fidelity <= 1.0
    only_accuracy = JBDA(train, num_seeds=10, epochs=1, progress=False, seed=0).run(api, 30, test_data=small_test)
    assert only_accuracy.test_accuracy is not None and only_accuracy.fidelity is None


def test_plain_callable_victim_needs_aux_arch(tiny_victim, fmnist_small):
    train, _ = fmnist_small
    data = train.take(300, seed=0)

    def plain(x: torch.Tensor) -> torch.Tensor:  # a function, not a Victim: no .arch
        return tiny_victim(x)

    with pytest.raises(ValueError, match="aux_arch"):
        SAMEDetector.from_preset("tiny", mae_epochs=1, aux_epochs=1, progress=False).fit(plain, data)
    fitted = SAMEDetector.from_preset("tiny", aux_arch="lenet5", mae_epochs=1, aux_epochs=1,
                                      progress=False).fit(plain, data)
    assert fitted.score(data.images[:4]).shape == (4,)
