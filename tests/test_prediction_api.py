"""The prediction path: answers, per-client counting, whole-batch budget refusal, the guard's records."""

from __future__ import annotations

import pytest
import torch

from sameguard.api import NotCalibratedError, SameguardError
from sameguard.guard import Guard
from sameguard.prediction_api import BoundClient, BudgetExceededError, PredictionAPI, fresh_client_id


SHAPE = (1, 8, 8)
K = 4


def toy_victim(x: torch.Tensor) -> torch.Tensor:
    """Probabilities from fixed linear logits of the mean of each image quadrant."""
    q = torch.stack([x[:, :, :4, :4].mean((1, 2, 3)), x[:, :, :4, 4:].mean((1, 2, 3)),
                     x[:, :, 4:, :4].mean((1, 2, 3)), x[:, :, 4:, 4:].mean((1, 2, 3))], dim=1)
    return torch.softmax(5 * q, dim=1)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class MeanDetector:
    """A fake detector: score = mean pixel value (so every image has its own, known score)."""

    threshold_: float | None = None

    def __init__(self) -> None:
        self.calls = 0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mean(dim=(1, 2, 3))


def make_api(**kw) -> Guard:
    return Guard(toy_victim, image_shape=SHAPE, num_classes=K, **kw)


def test_attacks_victim_api_answers_probabilities_or_labels():
    x = images(5)
    probs = make_api().query(x)
    assert probs.shape == (5, K) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    torch.testing.assert_close(probs, toy_victim(x))
    labels = make_api(output="labels").query(x)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert torch.equal(labels, toy_victim(x).argmax(1))
    assert isinstance(make_api(), PredictionAPI)


def test_attacks_victim_api_counts_per_client():
    api = make_api()
    api.query(images(3), "alice")
    api.query(images(2), "bob")
    api.query(images(4), "alice")
    assert api.queries_used("alice") == 7 and api.queries_used("bob") == 2
    assert api.queries_used("carol") == 0
    assert api.remaining("alice") is None
    assert api.total_queries == 9 and api.clients() == ["alice", "bob"]
    api.reset("alice")
    assert api.queries_used("alice") == 0 and api.queries_used("bob") == 2


def test_attacks_over_budget_batch_is_refused_whole():
    api = make_api(budget=10)
    api.query(images(6), "eve")
    with pytest.raises(BudgetExceededError) as info:
        api.query(images(5), "eve")  # 6 + 5 > 10: nothing answered, nothing counted
    err = info.value
    assert isinstance(err, SameguardError)
    assert (err.budget, err.used, err.requested) == (10, 6, 5)
    assert "10" in str(err) and "6" in str(err) and "5" in str(err)
    assert api.queries_used("eve") == 6 and api.remaining("eve") == 4
    api.query(images(4), "eve")  # exactly up to the budget is fine
    assert api.remaining("eve") == 0
    with pytest.raises(BudgetExceededError):
        api.query(images(1), "eve")
    assert api.remaining("mallory") == 10  # budgets are per client


def test_attacks_invalid_inputs_are_refused_and_not_counted():
    api = make_api(budget=10)
    with pytest.raises(ValueError, match="shape"):
        api.query(torch.zeros(2, 1, 9, 9), "a")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        api.query(torch.full((2, *SHAPE), 3.0), "a")
    with pytest.raises(ValueError, match="client"):
        api.query(images(1), "")
    assert api.queries_used("a") == 0
    with pytest.raises(ValueError, match="image_shape"):
        Guard(toy_victim, num_classes=K)
    with pytest.raises(ValueError, match="output"):
        make_api(output="logits")
    with pytest.raises(ValueError, match="budget"):
        make_api(budget=-1)


def test_attacks_guarded_api_records_each_clients_scores_in_order():
    detector = MeanDetector()
    api = Guard(toy_victim, detector, image_shape=SHAPE, num_classes=K, budget=8)
    xa1, xb1, xa2, xb2 = images(3, 1), images(2, 2), images(4, 3), images(1, 4)
    api.query(xa1, "a")
    api.query(xb1, "b")
    api.query(xa2, "a")
    api.query(xb2, "b")
    with pytest.raises(BudgetExceededError):
        api.query(images(2, 5), "a")  # refused: not scored, not recorded
    torch.testing.assert_close(api.scores("a"), detector.score(torch.cat([xa1, xa2])))
    torch.testing.assert_close(api.scores("b"), detector.score(torch.cat([xb1, xb2])))
    assert api.scores("a").shape == (7,) and api.scores("nobody").shape == (0,)
    assert detector.calls == 4 + 2  # four accepted batches + the two comparisons above
    with pytest.raises(NotCalibratedError):
        api.flags("a")  # scored without a threshold
    api.reset("a")
    assert api.scores("a").numel() == 0 and api.queries_used("a") == 0
    detector.threshold_ = 0.0
    x = images(6, 6)
    api.query(x, "a")
    assert torch.equal(api.flags("a"), x.mean((1, 2, 3)) > 0.0)


def test_attacks_guarded_api_passes_client_to_stateful_detectors():
    seen = []

    class Stateful:
        threshold_ = None

        def score(self, x):
            raise AssertionError("a stateful detector is scored through observe(x, client)")

        def observe(self, x, client):
            seen.append((client, len(x)))
            return torch.zeros(len(x))

        def reset(self, client):
            seen.append(("reset", client))

    api = Guard(toy_victim, Stateful(), image_shape=SHAPE, num_classes=K)
    api.query(images(2), "u1")
    api.query(images(3), "u2")
    api.reset("u1")
    assert seen == [("u1", 2), ("u2", 3), ("reset", "u1")]


def test_attacks_record_inputs_and_bound_client():
    api = make_api(record_inputs=True)
    x = images(3)
    bound = BoundClient(api, "mallory", budget=5)
    bound.query(x)
    assert torch.equal(api.inputs("mallory"), x) and bound.used == 3 and bound.remaining == 2
    with pytest.raises(BudgetExceededError):
        bound.query(images(3))  # refused locally, before the API sees it
    with pytest.raises(BudgetExceededError):
        bound.query(images(3).numpy())  # numpy batches are counted too
    assert api.queries_used("mallory") == 3
    assert fresh_client_id(api, "mallory") == "mallory-2"
    assert fresh_client_id(api, "knockoff") == "knockoff"
    with pytest.raises(RuntimeError, match="record_inputs"):
        make_api().inputs("x")
