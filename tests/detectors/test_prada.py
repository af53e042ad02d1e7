"""PRADA: the growing-set update and W on hand-made streams, alarms, per-client state, windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sameguard.detectors.prada import (PRADADetector, PradaState, growing_set_threshold, min_l2_distance,
                                       shapiro_statistic)

STEP = 2.0 ** -10  # exact in float32


class _FakeVictim:
    """A black box for 1x4x4 'images' that always answers class 0 (labels are passed explicitly anyway)."""

    image_shape = (1, 4, 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.zeros(len(x), 3)
        p[:, 0] = 1.0
        return p


def _line_stream(steps: list[float]) -> torch.Tensor:
    """Points along the first pixel, starting at -1, with the given gaps: (N, 1, 4, 4)."""
    positions = -1.0 + np.concatenate([[0.0], np.cumsum(steps)])
    x = torch.zeros(len(positions), 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(positions, dtype=torch.float32)
    return x


def _point(*coords: float) -> torch.Tensor:
    return torch.tensor(coords, dtype=torch.float32)


def test_min_l2_distance_and_threshold_by_hand():
    g = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert min_l2_distance(_point(3.0, 0.0), g) == pytest.approx(3.0)
    assert min_l2_distance(_point(3.0, 5.0), g) == pytest.approx(1.0)
    # mean([0, 10, 10]) - std([0, 10, 10]) = 20/3 - sqrt(200/9)
    assert growing_set_threshold([0.0, 10.0, 10.0], 0.0) == pytest.approx(20 / 3 - math.sqrt(200 / 9))
    assert growing_set_threshold([0.0, 10.0], 1.5) == 1.5  # never decreases
    with pytest.raises(ValueError, match="growing set"):
        min_l2_distance(_point(1.0), torch.zeros(0, 1))


def test_state_update_by_hand():
    """The growing set admits a query only when its distance exceeds T_c."""
    s = PradaState()
    assert s.update(_point(0, 0), 0) is None  # first query of class 0
    assert s.update(_point(10, 0), 0) == pytest.approx(10.0)  # added; D_G = [0, 10], T = max(0, 5 - 5) = 0
    assert s.thresholds[0] == pytest.approx(0.0)
    assert s.update(_point(10, 0), 0) == 0.0  # a repeat: 0 > T is false, not added
    assert len(s.growing_sets[0]) == 2
    assert s.update(_point(20, 0), 0) == pytest.approx(10.0)  # added; D_G = [0, 10, 10]
    assert s.thresholds[0] == pytest.approx(20 / 3 - math.sqrt(200 / 9))  # 1.953
    assert s.update(_point(20, 1), 0) == pytest.approx(1.0)  # 1 < 1.953: recorded, not added
    assert len(s.growing_sets[0]) == 3
    assert s.update(_point(5, 5), 1) is None  # another class has its own set
    assert s.distances == {0: pytest.approx([10.0, 0.0, 10.0, 1.0])}
    assert (s.queries, s.num_distances) == (6, 4)


def test_shapiro_statistic_pools_filters_and_matches_scipy():
    rng = np.random.default_rng(0)
    a, b, small = rng.normal(5, 1, 80).tolist(), rng.normal(5, 1, 40).tolist(), [1.0] * 9
    by_class = {0: a, 1: b, 2: small}  # class 2 has fewer than 10 distances: left out
    pooled = np.array(a + b)
    kept = pooled[np.abs(pooled - pooled.mean()) < 3 * pooled.std()]
    assert shapiro_statistic(by_class) == pytest.approx(stats.shapiro(kept).statistic)
    assert shapiro_statistic({0: a}) is None  # 80 distances: not more than 100
    assert shapiro_statistic({}) is None
    assert shapiro_statistic({0: [2.0] * 200}) is None  # zero spread: every value is rejected


def test_two_spacings_raise_the_alarm_at_a_known_query():
    """Gaps of 1, 1, 3 steps: distances take two values (2:1), W ~ 0.6 < 0.95.

    With one class, the k-th query gives the (k-1)-th distance; W is first computed at query 110
    (109 > 100 distances, none beyond 3 sigma), and it alarms there.
    """
    x = _line_stream([STEP, STEP, 3 * STEP] * 50)
    detector = PRADADetector().fit(_FakeVictim())
    labels = torch.zeros(len(x), dtype=torch.int64)
    assert detector.queries_until_alarm(x, labels) == 110
    state = PradaState()
    for xi in x:
        state.update(xi, 0)
    assert set(np.round(np.array(state.distances[0]) / STEP, 6)) == {1.0, 3.0}
    w = shapiro_statistic(state.distances)
    assert w < 0.7
    assert detector.window_scores(x, labels)[0] == pytest.approx(1 - w, abs=1e-6)


def test_gaussian_queries_raise_no_alarm():
    """Independent Gaussian points: nearest-neighbour distances are close to normal, W ~ 0.99."""
    g = torch.Generator().manual_seed(0)
    x = (0.2 * torch.randn(400, 1, 4, 4, generator=g)).clamp(-1, 1)
    labels = torch.randint(0, 3, (400,), generator=g)
    detector = PRADADetector(window_size=400).fit(_FakeVictim())
    assert detector.queries_until_alarm(x, labels) is None
    assert detector.window_scores(x, labels)[0] < 0.05


def test_observe_keeps_clients_apart():
    detector = PRADADetector().fit(_FakeVictim())
    attack = _line_stream([STEP, STEP, 3 * STEP] * 50)
    g = torch.Generator().manual_seed(1)
    benign = (0.2 * torch.randn(151, 1, 4, 4, generator=g)).clamp(-1, 1)
    zeros = torch.zeros(151, dtype=torch.int64)
    out_a = detector.observe(attack[:100], "mallory", zeros[:100])
    assert (out_a == 0).all() and not detector.is_flagged("mallory")  # no W before 100 distances
    detector.observe(benign, "alice", torch.randint(0, 3, (151,), generator=g))
    out_a = detector.observe(attack[100:], "mallory", zeros[100:])
    assert out_a.shape == (51,)
    assert out_a[-1] > 1 - detector.delta
    assert detector.is_flagged("mallory")
    assert not detector.is_flagged("alice")
    assert detector.client_state("mallory").alarm_at == 110
    assert set(detector.clients) == {"mallory", "alice"}
    detector.reset("mallory")
    assert not detector.is_flagged("mallory")
    assert detector.client_state("mallory") is None
    assert not detector.is_flagged("nobody")


def test_labels_come_from_the_victim_when_not_given():
    detector = PRADADetector().fit(_FakeVictim())
    x = _line_stream([STEP, STEP, 3 * STEP] * 50)
    assert detector.queries_until_alarm(x) == 110  # the fake victim says class 0 for all
    with pytest.raises(ValueError, match="labels must have shape"):
        detector.score(x, labels=torch.zeros(3, dtype=torch.int64))


def test_windowed_scores_on_real_queries(fitted_baselines, fmnist_tiny):
    """Benign Fashion-MNIST windows versus a JBDA-like stream (10 small sign perturbations around each seed)."""
    detector = fitted_baselines.get("prada")
    _, test = fmnist_tiny
    g = torch.Generator().manual_seed(3)
    seeds = test.images[:30]
    synthetic = (seeds.repeat_interleave(10, 0)
                 + 0.1 * torch.sign(torch.randn(300, 1, 28, 28, generator=g))).clamp(-1, 1)
    benign_windows = detector.window_scores(test.images)
    attack_windows = detector.window_scores(synthetic)
    assert benign_windows.shape == (2,)
    assert attack_windows.shape == (2,)
    assert attack_windows.min() > benign_windows.max()
    scores = detector.score(synthetic)
    assert torch.equal(scores[:150], attack_windows[0].repeat(150))
    # The alarm with the paper's counts (W only beyond 100 distances). Benign Fashion-MNIST
    # streams reach W of about 0.95-0.98 in L2 pixel space, so delta is set below them, as the
    # paper sets delta from benign clients.
    paper_counts = PRADADetector(delta=0.9).fit(fitted_baselines.victim_for("prada"))
    assert paper_counts.queries_until_alarm(synthetic) is not None
    assert paper_counts.queries_until_alarm(test.images) is None
