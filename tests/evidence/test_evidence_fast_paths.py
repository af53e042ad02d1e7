"""The per-request fast paths (NumPy p-values and martingales, the compiled stream test) give the
reference paths' results: bit for bit where the same float operations run, to rounding where
``exp`` / ``log`` implementations or summation orders differ."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from sameguard.evidence import ConformalCalibrator, EvidenceMonitor, MixtureMartingale, StreamExchangeabilityTest
from sameguard.evidence.conformal import conformal_p_values, conformal_p_values_array
from sameguard.evidence.martingale import log_mean_exp


def _jbda_like(n: int, generator: torch.Generator, shape=(1, 28, 28)) -> torch.Tensor:
    """Seeds, then each query a small signed step from a random earlier one, with exact repeats."""
    out = [torch.rand(4, *shape, generator=generator) * 2 - 1]
    have = 4
    while have < n:
        parent = out[0] if len(out) == 1 else torch.cat(out)
        i = int(torch.randint(0, have, (1,), generator=generator))
        if float(torch.rand(1, generator=generator)) < 0.1:  # a retry of an earlier query: distance 0
            step = parent[i:i + 1].clone()
        else:
            sign = torch.sign(torch.randn(1, *shape, generator=generator))
            step = (parent[i:i + 1] + 0.1 * sign).clamp(-1, 1)
        out.append(step)
        have += 1
    return torch.cat(out)[:n]


def _smooth(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images with correlated neighbouring pixels, like natural ones: 7x7 noise upsampled to 28x28."""
    low = torch.rand(n, 1, 7, 7, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)


def _brute_force_stream(x: torch.Tensor, theta: torch.Tensor, window: int,
                        metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream test by its definition, every bag recomputed from scratch in float64: p-values and the
    last bag's nearest-neighbour distances."""
    feats = x.flatten(1).double()
    p = torch.empty(len(x), dtype=torch.float64)
    for n in range(len(x)):
        start = n - n % window
        bag = feats[start:n + 1]
        dist = (torch.cdist(bag, bag, p=2.0 if metric == "l2" else 1.0, compute_mode="donot_use_mm_for_euclid_dist")
                if len(bag) > 1 else torch.zeros(1, 1))
        dist.fill_diagonal_(math.inf)
        d = dist.min(dim=1).values
        p[n] = (float((d < d[-1]).sum()) + float(theta[n]) * float((d == d[-1]).sum())) / len(bag)
    return p, d


@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("window", [2000, 37])
def test_compiled_stream_equals_the_definition_on_exact_data(metric, window):
    """Few grey levels: every distance is exact in float32 whatever the summation order, and many
    pairs tie, so the compiled loop must give the definition's p-values bit for bit."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{metric}-{window}".encode()))
    n = 200
    x = torch.randint(0, 3, (n, 1, 4, 4), generator=g).float() - 1
    theta = 1.0 - torch.rand(n, generator=g, dtype=torch.float64)
    expected_p, expected_d = _brute_force_stream(x, theta, window, metric)
    test = StreamExchangeabilityTest(window=window, metric=metric)
    state, start, parts = test.initial_state(), 0, []
    for size in [1, 5, 1, 1, 64, 3] * 20:  # batches of mixed sizes, across block boundaries
        stop = min(n, start + size)
        if start == stop:
            break
        state, p = test.update(state, x[start:stop], theta=theta[start:stop])
        parts.append(p)
        start = stop
    assert torch.equal(torch.cat(parts), expected_p)
    assert torch.equal(state.nn_dist, expected_d)


@pytest.mark.parametrize("kind", ["random", "jbda", "smooth", "huge"])
def test_compiled_stream_is_within_rounding_of_the_definition(kind):
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    n = 120
    if kind == "random":
        x = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    elif kind == "jbda":
        x = _jbda_like(n, g)
    elif kind == "smooth":
        x = _smooth(n, g)
    else:  # large values: squares near float32's range
        x = torch.randn(n, 1, 4, 4, generator=g) * 1e16
    theta = 1.0 - torch.rand(n, generator=g, dtype=torch.float64)
    test = StreamExchangeabilityTest(pool_size=None)  # the definition compares every pixel
    state, p = test.update(test.initial_state(), x, theta=theta)
    expected_p, expected_d = _brute_force_stream(x, theta, 2000, "l2")
    torch.testing.assert_close(state.nn_dist, expected_d, rtol=1e-12, atol=0)
    # p-values can move only where two distances are within rounding of each other
    assert (p - expected_p).abs().max() <= 3.0 / n


def test_a_pair_has_one_distance_wherever_its_rows_lie():
    """The compiled sum's order depends on the length only: the same pair at other offsets (other
    alignments) and in the other order gives the same bits, so a stream continued from a loaded
    state, or split into other batches, has the same evidence."""
    from sameguard.evidence.stream_kernel import distance

    g = torch.Generator().manual_seed(5)
    for dim in (7, 49, 784):
        a, b = (torch.rand(dim, generator=g) * 2 - 1).numpy(), (torch.rand(dim, generator=g) * 2 - 1).numpy()
        values = set()
        for offset in range(9):
            buffer = np.zeros(offset + 2 * dim, dtype=np.float32)
            buffer[offset:offset + dim], buffer[offset + dim:] = a, b
            first, second = buffer[offset:offset + dim], buffer[offset + dim:]
            values |= {float(distance(first, second, True)), float(distance(second, first, True))}
        assert len(values) == 1
        assert values.pop() == pytest.approx(float(np.linalg.norm(a.astype(np.float64) - b)), rel=1e-12)


def test_stream_from_a_loaded_state_and_an_older_state():
    g = torch.Generator().manual_seed(3)
    x = _jbda_like(120, g)
    theta = 1.0 - torch.rand(120, generator=g, dtype=torch.float64)
    test = StreamExchangeabilityTest()
    middle, _ = test.update(test.initial_state(), x[:60], theta=theta[:60])
    _, expected = test.update(*test.update(test.initial_state(), x[:60], theta=theta[:60])[:1], x[60:],
                              theta=theta[60:])
    loaded = type(middle).from_bytes(middle.to_bytes())  # rows in a new storage
    for state in (loaded, middle, middle):  # the second time from `middle`, its storage is no longer the newest
        _, p = test.update(state, x[60:], theta=theta[60:])
        assert torch.equal(p, expected)


def test_conformal_p_values_array_equals_the_tensor_formula():
    g = torch.Generator().manual_seed(0)
    reference = torch.sort(torch.randint(0, 20, (200,), generator=g).double()).values  # many ties
    scores = torch.cat([torch.randint(-2, 23, (500,), generator=g).double(), torch.tensor([float("nan"), 1e9])])
    theta = 1.0 - torch.rand(scores.numel(), generator=g, dtype=torch.float64)
    for t in (theta, None):
        expected = conformal_p_values(reference, scores, t)
        got = conformal_p_values_array(reference.numpy(), scores.numpy(), None if t is None else t.numpy())
        assert np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("smoothed", [True, False])
@pytest.mark.parametrize("labelled", [True, False])
def test_calibrator_p_values_array_equals_checked_p_values(smoothed, labelled):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (400,), generator=g)
    labels[labels == 4] = 3  # class 4 empty: it falls back to the pooled scores
    calibrator = ConformalCalibrator(smoothed=smoothed, min_class_size=20).fit(
        torch.randn(400, generator=g, dtype=torch.float64), labels if labelled else None, 5)
    for n in (1, 7, 300):
        scores = torch.randn(n, generator=g, dtype=torch.float64)
        query_labels = torch.randint(0, 5, (n,), generator=g)
        theta = 1.0 - torch.rand(n, generator=g, dtype=torch.float64)
        expected = calibrator.checked_p_values(scores, query_labels if labelled else None, theta)
        got = calibrator.p_values_array(scores.numpy(), query_labels.numpy() if labelled else None, theta.numpy())
        assert np.array_equal(got, expected.numpy())
    one = torch.full((5,), 2, dtype=torch.int64)  # one class for the whole batch
    s, t = torch.randn(5, generator=g, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    assert np.array_equal(calibrator.p_values_array(s.numpy(), one.numpy(), t.numpy()),
                          calibrator.checked_p_values(s, one, t).numpy())


@pytest.mark.parametrize("conditional", [None, 1e-3])
@pytest.mark.parametrize("labelled", [True, False])
def test_one_query_p_values_equal_the_batch_path_bit_for_bit(conditional, labelled):
    """The single-query path (Python lists and bisect) against the tensor formula, query by query:
    ties with the reference, below and above all of it, NaN, +-inf, a class that falls back."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (300,), generator=g)
    labels[labels == 3] = 2  # class 3 empty: pooled
    reference = torch.randint(0, 15, (300,), generator=g).double()  # many ties
    calibrator = ConformalCalibrator(min_class_size=20, conditional=conditional).fit(
        reference, labels if labelled else None, 4)
    scores = torch.cat([torch.arange(-2, 18).double(), torch.tensor([float("nan"), float("inf"), -float("inf"), 7.5])])
    for i in range(scores.numel()):
        s, label, t = scores[i:i + 1], torch.tensor([i % 4]), torch.tensor([0.25 + 0.5 * (i % 2)], dtype=torch.float64)
        expected = calibrator.checked_p_values(s, label if labelled else None, t)
        got = calibrator.p_values_array(s.numpy(), label.numpy() if labelled else None, t.numpy())
        assert got.shape == (1,) and got.dtype == np.float64 and np.array_equal(got, expected.numpy()), i


@pytest.mark.parametrize("mode", ["ville", "cusum", "shiryaev-roberts"])
def test_martingale_advance_one_query_at_a_time_equals_update(mode):
    """The compiled per-request step, one p-value at a time from the start state (-inf for
    Shiryaev-Roberts), through a clipped p = 0, p = 1 and a long run of small p-values; its combination
    is the log mean of the sources' mixtures."""
    g = torch.Generator().manual_seed(5)
    martingale = MixtureMartingale(mode=mode)
    state = martingale.initial_state().expand(2, -1).clone()
    array = state.numpy().copy()
    for p in [0.0, 1.0, 0.5] + (torch.rand(60, generator=g, dtype=torch.float64) ** 4).tolist():
        pair = torch.tensor([[p], [min(1.0, 2 * p)]], dtype=torch.float64)
        state, path = martingale.update(state, pair)
        array, log_paths, combined = martingale.advance(array, pair.numpy())
        np.testing.assert_allclose(array, state.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(log_paths, path.numpy(), rtol=1e-12, atol=1e-12)
        assert combined[0] == pytest.approx(log_mean_exp(path[:, 0].tolist()), rel=1e-12, abs=1e-12)
    assert combined[0] > math.log(1e3)  # the small p-values built evidence


def test_log_mean_exp_edge_cases():
    assert log_mean_exp([0.0, 0.0]) == 0.0
    assert log_mean_exp([math.log(3.0), math.log(1.0)]) == pytest.approx(math.log(2.0), rel=1e-15)
    assert log_mean_exp([-math.inf, -math.inf]) == -math.inf
    assert log_mean_exp([-math.inf, math.inf]) == math.inf
    assert log_mean_exp([1000.0, 1000.0 - math.log(3.0)]) == pytest.approx(1000.0 + math.log(2.0 / 3.0), rel=1e-15)


@pytest.mark.parametrize("mode", ["ville", "cusum", "shiryaev-roberts"])
def test_martingale_update_array_equals_update(mode):
    g = torch.Generator().manual_seed(2)
    martingale = MixtureMartingale(mode=mode)
    state = martingale.initial_state().expand(5, -1).clone()
    for n in (1, 1, 40, 3):
        p = torch.rand(5, n, generator=g, dtype=torch.float64) ** 3  # mostly small: evidence grows
        p[0, 0] = 0.0  # clipped to P_FLOOR
        expected_state, expected_path = martingale.update(state, p)
        got_state, got_path = martingale.update_array(state.numpy(), p.numpy())
        np.testing.assert_allclose(got_state, expected_state.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_path, expected_path.numpy(), rtol=1e-12, atol=1e-12)
        state = expected_state


@pytest.mark.parametrize("mode", ["ville", "cusum", "shiryaev-roberts"])
def test_monitor_fast_path_equals_the_reference_path(mode):
    g = torch.Generator().manual_seed(4)
    calibrators = {name: ConformalCalibrator(min_class_size=10).fit(torch.randn(300, generator=g), torch.randint(
        0, 3, (300,), generator=g), 3) for name in ("a", "b")}
    monitors = [EvidenceMonitor(calibrators, delta=1e-3, martingale=MixtureMartingale(mode=mode),
                                stream=StreamExchangeabilityTest(window=100), seed=7) for _ in range(2)]
    monitors[1]._reference = True
    for client, attack in (("benign", False), ("mallory", True)):
        x = _jbda_like(250, g) if attack else torch.rand(250, 1, 28, 28, generator=g) * 2 - 1
        shift = 1.5 if attack else 0.0
        start = 0
        for size in [1, 3, 1, 50, 1, 20] * 20:
            stop = min(250, start + size)
            if start == stop:
                break
            n = stop - start
            scores = {"a": torch.randn(n, generator=g) + shift, "b": torch.randn(n, generator=g)}
            labels = torch.randint(0, 3, (n,), generator=g)
            fast, ref = (m.update(client, scores, labels, x[start:stop]) for m in monitors)
            np.testing.assert_allclose(fast.log_evidence_path.numpy(), ref.log_evidence_path.numpy(),
                                       rtol=1e-12, atol=1e-12)
            assert fast.log_evidence == pytest.approx(ref.log_evidence, rel=1e-12, abs=1e-12)
            assert fast.per_detector == pytest.approx(ref.per_detector, rel=1e-12, abs=1e-12)
            assert (fast.queries, fast.alarm_query) == (ref.queries, ref.alarm_query)
            start = stop
        states = [m.store.get(client) for m in monitors]
        assert torch.equal(states[0].stream.nn_dist, states[1].stream.nn_dist)
        for name in ("a", "b"):
            torch.testing.assert_close(states[0].martingales[name], states[1].martingales[name], rtol=1e-12, atol=1e-12)
        assert states[0].to_bytes()  # one storage per tensor: serialisable
    assert monitors[0].evidence("mallory").alarmed  # the JBDA-like stream with shifted scores is caught


def test_compiled_smoothing_uniforms_equal_the_vectorised_ones():
    from sameguard.evidence.monitor import _client_base
    from sameguard.evidence.monitor_kernel import p_values

    calibrators = {"a": ConformalCalibrator().fit(torch.randn(50), None, 2)}
    monitor = EvidenceMonitor(calibrators, stream=StreamExchangeabilityTest(), seed=3)
    batch = monitor._theta_array("carol", 10, 40)
    for first, n in ((10, 40), (10, 1), (25, 3), (2**62, 2)):  # counters wrap around 2^64 alike
        thetas, p = np.empty((2, n)), np.empty((2, n))
        p_values(np.zeros((1, n)), np.zeros(n, dtype=np.int64), np.uint64(_client_base(3, "carol")), first, thetas, p,
                 *monitor._packed_references())
        assert np.array_equal(thetas, monitor._theta_array("carol", first, n))
    for i in range(40):
        assert np.array_equal(monitor._theta_array("carol", 10 + i, 1), batch[:, i:i + 1])
    huge = monitor._theta_array("carol", 2**62, 2)  # counters wrap around 2^64 alike
    assert np.array_equal(monitor._theta_array("carol", 2**62 + 1, 1), huge[:, 1:])


@pytest.mark.parametrize("config", [
    {"smoothed": True}, {"smoothed": False}, {"conditional": 1e-3}, {"smoothed": True, "min_class_size": 120},
    {"smoothed": True, "labels": False}])
def test_compiled_p_values_equal_the_calibrators(config):
    """Class-conditional or pooled, smoothed, conservative or calibration-conditional, with classes that
    fall back to the pooled scores, ties and NaN: the compiled p-values are the calibrator's bits."""
    from sameguard.evidence.monitor_kernel import p_values, pack_references

    config = dict(config)
    labelled = config.pop("labels", True)
    g = torch.Generator().manual_seed(zlib.crc32(repr(config).encode()))
    labels = torch.randint(0, 4, (400,), generator=g)
    labels[labels == 3] = torch.randint(0, 3, (int((labels == 3).sum()),), generator=g)[0]  # class 3: empty
    scores = torch.randint(0, 30, (400,), generator=g).double()  # many ties
    calibrators = [ConformalCalibrator(**config).fit(scores + shift, labels if labelled else None, 4)
                   for shift in (0.0, 0.5)]
    queries = torch.cat([torch.randint(-3, 35, (200,), generator=g).double(), torch.tensor([math.nan, 1e9])])
    query_labels = torch.randint(0, 4, (queries.numel(),), generator=g)
    n = queries.numel()
    thetas, p = np.empty((3, n)), np.empty((3, n))  # a third source (a stream test) gets a uniform only
    rows = np.stack([queries.numpy(), queries.numpy() * 1.5])
    p_values(rows, query_labels.numpy(), np.uint64(12345), 7, thetas, p, *pack_references(calibrators, 4))
    for j, calibrator in enumerate(calibrators):
        expected = calibrator.p_values_array(rows[j], query_labels.numpy() if labelled else None, thetas[j])
        assert np.array_equal(p[j], expected)
