"""The stream exchangeability test: exact p-values, uniformity for i.i.d. streams, JBDA-like alarms, window."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sameguard.evidence import MixtureMartingale, StreamExchangeabilityTest, StreamState, stream_p_value, stream_test
from sameguard.evidence.store import StateFormatError
from sameguard.evidence.stream import DEFAULT_POOL_SIZE, DEFAULT_WINDOW

logger = logging.getLogger(__name__)


def _as_images(points: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors as (N, 1, 1, D) images."""
    return points.reshape(points.shape[0], 1, 1, -1)


def _theta(seed: int, n: int) -> torch.Tensor:
    return 1.0 - torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ks_to_uniform(p: torch.Tensor) -> float:
    p = p.sort().values
    n = p.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum((grid - p).abs(), (p - (grid - 1 / n)).abs()).max())


@pytest.mark.parametrize(("dists", "theta", "expected"), [
    ([1.0, 0.5, 2.0, 0.5], 0.5, (0 + 0.5 * 2) / 4),    # the newest ties with its neighbour
    ([1.0, 0.5, 2.0, 3.0], 0.5, (3 + 0.5 * 1) / 4),    # the newest is the farthest: benign
    ([math.inf], 0.3, 0.3),                            # a lone point
])
def test_stream_p_value_formula(dists, theta, expected):
    assert stream_p_value(torch.tensor(dists), theta) == pytest.approx(expected, abs=1e-12)


def test_hand_made_stream():
    """1-D points 0, 10, 11, 0.5, 20; NN distances after each arrival by hand."""
    test = StreamExchangeabilityTest(window=10)
    x = _as_images(torch.tensor([[0.0], [10.0], [11.0], [0.5], [20.0]]))
    state, p = test.update(test.initial_state(), x, torch.Generator().manual_seed(5))
    t = _theta(5, 5)
    expected = torch.stack([
        t[0],                  # {0}: d = [inf]
        t[1] * 2 / 2,          # d = [10, 10]
        t[2] * 2 / 3,          # d = [10, 1, 1]
        t[3] * 2 / 4,          # d = [0.5, 1, 1, 0.5]
        (4 + t[4]) / 5,        # d = [0.5, 1, 1, 0.5, 9]
    ])
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.nn_dist, torch.tensor([0.5, 1, 1, 0.5, 9], dtype=torch.float64))
    assert state.seen == 5


def test_incremental_matches_recomputing_every_bag():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(40, 6, generator=g)
    points[25] = points[3] + 1e-3  # a near-duplicate
    test = StreamExchangeabilityTest(window=100, metric="l1")
    _, p = test.update(test.initial_state(), _as_images(points), torch.Generator().manual_seed(9))
    theta = _theta(9, 40)
    for n in range(1, 41):
        bag = points[:n]
        dist = torch.stack([torch.linalg.vector_norm(bag - bag[i], ord=1, dim=1) for i in range(n)])
        dist.fill_diagonal_(math.inf)
        d = dist.min(dim=1).values
        expected = (float((d < d[-1]).sum()) + float(theta[n - 1]) * float((d == d[-1]).sum())) / n
        assert p[n - 1].item() == pytest.approx(expected, abs=1e-9), n


def test_batches_give_what_one_batch_gives():
    g = torch.Generator().manual_seed(1)
    x = _as_images(torch.randn(30, 5, generator=g))
    test = StreamExchangeabilityTest(window=12)
    _, whole = test.update(test.initial_state(), x, torch.Generator().manual_seed(2))
    theta_gen = torch.Generator().manual_seed(2)
    state, parts = test.initial_state(), []
    for chunk in (x[:7], x[7:19], x[19:]):
        state, p = test.update(state, chunk, theta_gen)
        parts.append(p)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


@pytest.mark.parametrize("window", [2000, 50])
def test_iid_stream_gives_uniform_p_values(window):
    g = torch.Generator().manual_seed(3)
    test = StreamExchangeabilityTest(window=window)
    _, p = test.update(test.initial_state(), _as_images(torch.randn(2000, 16, generator=g)), g)
    # the KS statistic's 0.1 % critical value for n = 2000 is 1.95 / sqrt(2000) = 0.044
    assert _ks_to_uniform(p) < 0.044
    assert float(p.min()) > 0 and float(p.max()) <= 1


def test_iid_clients_rarely_alarm():
    g = torch.Generator().manual_seed(4)
    test, martingale, delta = StreamExchangeabilityTest(), MixtureMartingale(), 0.05
    clients, alarms = 60, 0
    for _ in range(clients):
        _, p = test.update(test.initial_state(), _as_images(torch.randn(150, 8, generator=g)), g)
        _, path = martingale.update(martingale.initial_state(), p)
        alarms += bool((path >= math.log(1 / delta)).any())
    logger.info("i.i.d. clients alarmed by the stream test at delta=0.05: %d of %d", alarms, clients)
    assert alarms <= clients * delta + 3 * math.sqrt(clients * delta * (1 - delta))  # at most 3 expected


def jbda_like_stream(seeds: int, total: int, *, dim: int = 64, step: float = 0.05, seed: int = 0) -> torch.Tensor:
    """JBDA's shape: ``seeds`` natural-looking points, then rounds in which every earlier point gets
    a child one signed step away (``x + step * sign(noise)``), until ``total`` points: (total, 1, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    points = list(torch.randn(seeds, dim, generator=g))
    while len(points) < total:
        for parent in list(points)[: total - len(points)]:
            points.append(parent + step * torch.sign(torch.randn(dim, generator=g)))
    return torch.stack(points).reshape(total, 1, 8, 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jbda_like_stream_alarms_soon_after_its_seeds(seed):
    """100 seed points, then augmentation: alarmed at δ = 1e-3 within 100 queries after the seeds."""
    test, martingale = StreamExchangeabilityTest(), MixtureMartingale()
    _, p = test.update(test.initial_state(), jbda_like_stream(100, 300, seed=seed), torch.Generator().manual_seed(seed))
    _, path = martingale.update(martingale.initial_state(), p)
    crossed = torch.nonzero(path >= math.log(1000)).flatten()
    assert crossed.numel() > 0
    logger.info("JBDA-like stream (100 seeds), seed %d: alarm at query %d", seed, int(crossed[0]) + 1)
    assert int(crossed[0]) + 1 <= 200


def test_state_is_bounded_by_the_window_and_restarts():
    test = StreamExchangeabilityTest(window=50)
    g = torch.Generator().manual_seed(6)
    state, p = test.update(test.initial_state(), _as_images(torch.randn(130, 4, generator=g)),
                           torch.Generator().manual_seed(7))
    assert state.points.shape == (30, 4)
    assert state.nn_dist.shape == (30,)
    assert state.seen == 130
    t = _theta(7, 130)
    for first_of_block in (0, 50, 100):  # a new bag: its first p-value is theta (a lone point)
        assert p[first_of_block].item() == pytest.approx(t[first_of_block].item(), abs=1e-12)


def test_a_p_value_depends_on_its_own_block_only():
    """The first ``w`` p-values of a client are the same for every window of at least ``w`` (bit for bit):
    what the default window's docs rely on to say the benchmark's alarms do not move with it."""
    x = _as_images(torch.randn(90, 5, generator=torch.Generator().manual_seed(8)))
    theta = _theta(9, 90)
    p = {w: StreamExchangeabilityTest(window=w).update(StreamExchangeabilityTest().initial_state(), x, theta=theta)[1]
         for w in (30, 60, 90, 1000)}
    assert torch.equal(p[1000], p[90]) and torch.equal(p[90][:60], p[60][:60]) and torch.equal(p[60][:30], p[30][:30])
    assert not torch.equal(p[60][60:], p[90][60:])  # a new block: other p-values from there on
    assert torch.equal(p[60][60:], p[30][60:])  # blocks of 30 and of 60 both restart at query 61


def test_pooling_reduces_features():
    test = StreamExchangeabilityTest(pool_size=7)
    state, _ = test.update(test.initial_state(), torch.rand(3, 1, 28, 28) * 2 - 1)
    assert state.points.shape == (3, 49)
    assert StreamExchangeabilityTest(pool_size=32).features(torch.zeros(2, 3, 8, 8)).shape == (2, 192)


def test_state_bytes_round_trip():
    test = StreamExchangeabilityTest(window=20)
    state, _ = test.update(test.initial_state(), _as_images(torch.randn(25, 3)))
    restored = StreamState.from_bytes(state.to_bytes())
    torch.testing.assert_close(restored.points, state.points, rtol=0, atol=0)
    torch.testing.assert_close(restored.nn_dist, state.nn_dist, rtol=0, atol=0)
    assert restored.seen == 25
    empty = StreamState.from_bytes(test.initial_state().to_bytes())
    assert empty.seen == 0 and empty.points.numel() == 0
    with pytest.raises(StateFormatError):
        StreamState.from_bytes(b"not a state")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": 1}, "window"),
    ({"metric": "cosine"}, "metric"),
    ({"pool_size": 0}, "pool_size"),
])
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamExchangeabilityTest(**kwargs)


def test_update_validation():
    test = StreamExchangeabilityTest()
    state, _ = test.update(test.initial_state(), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="one image shape"):
        test.update(state, torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="NaN"):
        test.update(state, torch.full((1, 1, 2, 2), math.nan))
    with pytest.raises(ValueError, match="StreamState"):
        test.update(None, torch.zeros(1, 1, 2, 2))


def test_stream_test_builds_what_a_setting_asks_for():
    given = StreamExchangeabilityTest(window=10)
    assert stream_test(given, pool_size=7) is given  # a test is used as given
    assert stream_test(False, pool_size=7) is None
    built = stream_test(True, pool_size=7)
    assert isinstance(built, StreamExchangeabilityTest) and built.pool_size == 7
    assert stream_test(True).pool_size == DEFAULT_POOL_SIZE == StreamExchangeabilityTest().pool_size == 14
    assert stream_test(True, None).pool_size is None  # every pixel, asked for
    assert stream_test(True).window == DEFAULT_WINDOW == StreamExchangeabilityTest().window == 1000
    assert stream_test(True, 7, window=300).window == 300


@pytest.mark.parametrize(("shape", "size"), [((2, 1, 28, 28), 7), ((3, 3, 10, 9), 7), ((1, 2, 28, 28), 14), ((2, 1, 5, 30), 4)])
def test_pooled_features_are_torchs_adaptive_average(shape, size):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 2 - 1
    out = (min(size, shape[2]), min(size, shape[3]))
    expected = torch.nn.functional.adaptive_avg_pool2d(x, out).flatten(1)
    torch.testing.assert_close(StreamExchangeabilityTest(pool_size=size).features(x), expected, rtol=1e-6, atol=1e-6)
