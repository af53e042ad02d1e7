"""The contract every baseline shares with SAME: NEEDS, life cycle, sign, shapes, errors, parameters."""

from __future__ import annotations

import inspect

import pytest
import torch

from sameguard.api import Detector, NotCalibratedError, NotFittedError
from sameguard.bench.metrics import auroc

BASELINES = ["msp", "energy", "mahalanobis", "prada", "vardetect", "outlier_exposure", "same_conv_ae"]
NEEDS_VOCABULARY = {"outlier-data", "query-history", "white-box", "training-change", "defender-data"}
EXPECTED_NEEDS = {
    "msp": set(),
    "energy": {"white-box"},
    "mahalanobis": {"white-box", "defender-data"},
    "prada": {"query-history"},
    "vardetect": {"query-history", "defender-data"},
    "outlier_exposure": {"outlier-data", "training-change", "white-box", "defender-data"},
    "same_conv_ae": {"defender-data"},
}
#: Per-query (stateless) detectors; PRADA and VarDetect score windows of a stream.
PER_QUERY = ["msp", "energy", "mahalanobis", "outlier_exposure", "same_conv_ae"]


@pytest.mark.parametrize("name", BASELINES)
def test_needs_and_docstring(name, baseline_classes):
    cls = baseline_classes[name]
    assert issubclass(cls, Detector)
    assert isinstance(cls.NEEDS, frozenset) and cls.NEEDS <= NEEDS_VOCABULARY
    assert set(cls.NEEDS) == EXPECTED_NEEDS[name]
    module_doc = inspect.getmodule(cls).__doc__
    assert "Paper:" in module_doc and "Reference implementation" in module_doc
    assert "Needs" in cls.__doc__ or "needs" in cls.__doc__


@pytest.mark.parametrize("name", BASELINES)
def test_errors_before_fit(name, baseline_classes):
    detector = baseline_classes[name]()
    assert not detector.is_fitted()
    x = torch.zeros(2, 1, 28, 28)
    calls = [lambda: detector.score(x), lambda: detector.calibrate(x, 0.1), lambda: detector.predict(x)]
    if hasattr(detector, "save"):
        calls.append(lambda: detector.save("never-written"))
    if hasattr(detector, "observe"):
        calls.append(lambda: detector.observe(x, "client"))
    for method in ("window_scores", "queries_until_alarm", "score_components", "reconstruct", "probabilities", "encode"):
        if hasattr(detector, method):
            calls.append(lambda method=method: getattr(detector, method)(x))
    for call in calls:
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


@pytest.mark.parametrize("name", BASELINES)
def test_params_and_repr(name, baseline_classes):
    cls = baseline_classes[name]
    detector = cls()
    params = detector.get_params()
    assert "device" not in params and "progress" not in params
    assert repr(detector) == f"{cls.__name__}()"
    key, value = next((k, v) for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    assert f"{key}={value + 1}" in repr(cls(**{key: value + 1}))


@pytest.mark.parametrize(
    "name, bad",
    [("msp", dict(batch_size=0)), ("energy", dict(temperature=0.0)), ("energy", dict(temperature=float("nan"))),
     ("mahalanobis", dict(noise_magnitude=-0.1)), ("mahalanobis", dict(max_train_samples=0)),
     ("prada", dict(delta=1.5)), ("prada", dict(delta=0.0)), ("prada", dict(window_size=2)),
     ("prada", dict(outlier_sigma=0)), ("vardetect", dict(bandwidth=-1.0)), ("vardetect", dict(reference_size=1)),
     ("vardetect", dict(lr=0)), ("outlier_exposure", dict(oe_weight=-1.0)), ("outlier_exposure", dict(epochs=0)),
     ("outlier_exposure", dict(augment="yes")), ("same_conv_ae", dict(alpha=1.5)), ("same_conv_ae", dict(latent_dim=0))],
)
def test_bad_hyper_parameters(name, bad, baseline_classes):
    with pytest.raises(ValueError, match="must be"):
        baseline_classes[name](**bad)


@pytest.mark.parametrize("name", BASELINES)
def test_scores_shape_dtype_and_calibration(name, fitted_baselines, fmnist_tiny):
    detector = fitted_baselines.get(name)
    _, test = fmnist_tiny
    scores = detector.score(test.images[:160])
    assert scores.shape == (160,)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert torch.equal(detector.score(test.images[:160]), scores)  # deterministic, no hidden state
    fresh = type(detector)()
    fresh.__dict__.update(detector.__dict__)
    fresh.threshold_ = None
    with pytest.raises(NotCalibratedError, match="calibrate"):
        fresh.predict(test.images[:4])
    assert fresh.calibrate(test.images[:160], 0.1) is fresh
    flagged = fresh.predict(test.images[:160])
    assert flagged.dtype == torch.bool
    assert flagged.float().mean() <= 0.1


@pytest.mark.parametrize("name", PER_QUERY)
def test_sign_fashion_mnist_versus_noise(name, fitted_baselines, fmnist_tiny, noise_queries):
    """Larger = more suspicious: uniform noise out-scores real Fashion-MNIST test images."""
    detector = fitted_baselines.get(name)
    _, test = fmnist_tiny
    benign, attack = detector.score(test.images), detector.score(noise_queries)
    assert attack.mean() > benign.mean()
    assert auroc(benign.numpy(), attack.numpy()) > 0.75


@pytest.mark.parametrize("name", PER_QUERY)
def test_score_is_per_query(name, fitted_baselines, fmnist_tiny):
    """Stateless detectors score each query on its own: batching does not change a score."""
    detector = fitted_baselines.get(name)
    _, test = fmnist_tiny
    x = test.images[:12]
    together = detector.score(x)
    alone = torch.cat([detector.score(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(2, 3, 28, 28), r"\(N, 1, 28, 28\)"),
        (torch.zeros(2, 28, 28), "3-D tensor"),
        (torch.zeros(0, 1, 28, 28), "empty"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
        (torch.full((2, 1, 28, 28), 3.0), r"\[-1, 1\]"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "floating-point"),
        ("not images", "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("name", BASELINES)
def test_bad_input(name, x, message, fitted_baselines):
    detector = fitted_baselines.get(name)
    with pytest.raises(ValueError, match=message):
        detector.score(x)
