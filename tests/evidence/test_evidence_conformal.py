"""Conformal p-values: exact values on hand-made calibration sets, Mondrian classes, NaN, errors, artifacts."""

from __future__ import annotations

import logging

import pytest
import torch

from sameguard.api import ArtifactError, NotFittedError
from sameguard.evidence import ConformalCalibrator, conformal_p_values

NAN = float("nan")


def _theta(seed: int, n: int) -> torch.Tensor:
    """The smoothing uniforms a calibrator draws from ``torch.Generator().manual_seed(seed)``."""
    return 1.0 - torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("score", "expected"), [
    (0.0, 5 / 5),    # every calibration score >= 0
    (2.0, 4 / 5),    # 1 + #{2, 3, 4}
    (2.5, 3 / 5),
    (4.0, 2 / 5),
    (10.0, 1 / 5),   # above all: the smallest p-value 1/(m+1)
])
def test_conservative_p_values_exact(score, expected):
    calibrator = ConformalCalibrator(smoothed=False).fit(torch.tensor([3.0, 1.0, 4.0, 2.0]), None, 1)
    assert calibrator.p_values(torch.tensor([score])).item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("score", "theta", "expected"), [
    (2.0, 0.5, (1 + 0.5 * (1 + 2)) / 5),   # one above, two equal
    (5.0, 0.25, 0.25 / 5),                 # above all
    (0.0, 0.5, (4 + 0.5) / 5),             # below all
    (2.5, 1.0, (1 + 1.0) / 5),             # theta = 1 is the conservative value
])
def test_smoothed_formula_exact(score, theta, expected):
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    p = conformal_p_values(reference, torch.tensor([score], dtype=torch.float64),
                           torch.tensor([theta], dtype=torch.float64))
    assert p.item() == pytest.approx(expected, abs=1e-15)


def test_smoothed_calibrator_draws_theta_from_the_generator():
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0])
    scores = torch.tensor([2.0, 5.0, 0.0, 2.0])
    p = ConformalCalibrator(smoothed=True).fit(reference, None, 1).p_values(
        scores, generator=torch.Generator().manual_seed(7))
    theta = _theta(7, 4)
    expected = torch.stack([(1 + 3 * theta[0]) / 5, theta[1] / 5, (4 + theta[2]) / 5, (1 + 3 * theta[3]) / 5])
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-15)


def test_smoothed_p_values_are_uniform_for_exchangeable_scores():
    g = torch.Generator().manual_seed(0)
    calibrator = ConformalCalibrator().fit(torch.randn(300, generator=g), None, 1)
    p = calibrator.p_values(torch.randn(20000, generator=g), generator=g).sort().values
    ks = (p - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max().item()
    # one fixed calibration set: uniform only on average over calibration sets, so allow its spread
    assert ks < 0.1
    assert float(p.min()) > 0 and float(p.max()) <= 1


def _two_class_calibrator(**kwargs) -> ConformalCalibrator:
    scores = torch.cat([torch.arange(100.0), 1000 + torch.arange(100.0), torch.tensor([5.0, 6.0, 7.0])])
    labels = torch.cat([torch.zeros(100), torch.ones(100), torch.full((3,), 2)]).long()
    return ConformalCalibrator(smoothed=False, **kwargs).fit(scores, labels, num_classes=4)


@pytest.mark.parametrize(("score", "label", "expected"), [
    (1050.0, 1, (1 + 50) / 101),   # high for the pool, ordinary within class 1: benign-looking
    (1050.0, 0, 1 / 101),          # far above every class-0 score
    (50.0, 0, (1 + 50) / 101),
    (50.0, 1, 1.0),
    (1050.0, 2, (1 + 50) / 204),   # class 2 has 3 scores < 50: pooled (203 scores)
    (1050.0, 3, (1 + 50) / 204),   # class 3 has none: pooled
])
def test_class_conditional_p_values(score, label, expected):
    p = _two_class_calibrator().p_values(torch.tensor([score]), torch.tensor([label]))
    assert p.item() == pytest.approx(expected, abs=1e-15)


def test_small_classes_fall_back_to_pooled_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sameguard.evidence.conformal"):
        calibrator = _two_class_calibrator()
    assert calibrator.fallback_classes() == [2, 3]
    assert "fewer than 50" in caplog.text
    torch.testing.assert_close(calibrator.reference(2), calibrator.pooled_)
    assert calibrator.reference(1).numel() == 100
    assert _two_class_calibrator(min_class_size=3).fallback_classes() == [3]


def test_batch_of_mixed_classes_matches_one_by_one():
    calibrator = _two_class_calibrator()
    scores, labels = torch.tensor([1050.0, 50.0, 7.0, 1099.5, -3.0]), torch.tensor([1, 0, 2, 1, 3])
    batch = calibrator.p_values(scores, labels)
    single = torch.cat([calibrator.p_values(scores[i:i + 1], labels[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, rtol=0, atol=0)


@pytest.mark.parametrize("smoothed", [False, True])
def test_nan_score_gets_the_smallest_p_value(smoothed):
    calibrator = ConformalCalibrator(smoothed=smoothed).fit(torch.arange(99.0), None, 1)
    p_nan = calibrator.p_values(torch.tensor([NAN]), generator=torch.Generator().manual_seed(3)).item()
    p_inf = calibrator.p_values(torch.tensor([float("inf")]), generator=torch.Generator().manual_seed(3)).item()
    assert p_nan == p_inf
    assert 0 < p_nan <= 1 / 100
    if not smoothed:
        assert p_nan == pytest.approx(1 / 100, abs=1e-15)


@pytest.mark.parametrize(("scores", "labels", "num_classes", "message"), [
    (torch.tensor([1.0, NAN]), None, 1, "finite"),
    (torch.tensor([1.0, float("inf")]), None, 1, "finite"),
    (torch.tensor([]), None, 1, "empty"),
    (torch.ones(2, 2), None, 1, "1-D"),
    ([1.0, 2.0], None, 1, "torch.Tensor"),
    (torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), 2, r"\[0, 2\)"),
    (torch.tensor([1.0, 2.0]), torch.tensor([0, -1]), 2, r"\[0, 2\)"),
    (torch.tensor([1.0, 2.0]), torch.tensor([0]), 2, "one label per score"),
    (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), 2, "integer"),
    (torch.tensor([1.0, 2.0]), None, 0, "num_classes"),
])
def test_fit_validation(scores, labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        ConformalCalibrator().fit(scores, labels, num_classes)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_class_size": 0}, "min_class_size"),
    ({"min_class_size": 2.5}, "min_class_size"),
    ({"smoothed": "yes"}, "smoothed"),
])
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConformalCalibrator(**kwargs)


def test_p_values_errors():
    with pytest.raises(NotFittedError):
        ConformalCalibrator().p_values(torch.tensor([1.0]))
    calibrator = _two_class_calibrator()
    with pytest.raises(ValueError, match="pass labels"):
        calibrator.p_values(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        calibrator.p_values(torch.tensor([1.0]), torch.tensor([4]))


def test_state_round_trip_gives_identical_p_values():
    calibrator = _two_class_calibrator()
    clone = ConformalCalibrator.from_state(calibrator.state_dict(), calibrator.config())
    scores, labels = torch.tensor([1050.0, 50.0, 7.0, NAN]), torch.tensor([1, 0, 2, 3])
    torch.testing.assert_close(clone.p_values(scores, labels), calibrator.p_values(scores, labels), rtol=0, atol=0)
    broken = calibrator.state_dict()
    broken["class_offsets"] = broken["class_offsets"].flip(0)
    with pytest.raises(ArtifactError, match="inconsistent"):
        ConformalCalibrator.from_state(broken, calibrator.config())


def test_save_and_load(tmp_path):
    calibrator = _two_class_calibrator()
    calibrator.save(tmp_path / "cal", detector_sha256="d" * 64, victim_sha256="v" * 64)
    loaded = ConformalCalibrator.load(tmp_path / "cal", detector_sha256="d" * 64, victim_sha256="v" * 64)
    scores, labels = torch.tensor([1050.0, 50.0]), torch.tensor([1, 0])
    torch.testing.assert_close(loaded.p_values(scores, labels), calibrator.p_values(scores, labels))
    assert loaded.config() == calibrator.config()
    assert ConformalCalibrator.load(tmp_path / "cal").fallback_classes() == [2, 3]  # no expectation: no check


@pytest.mark.parametrize(("saved", "expected", "message"), [
    ({"detector_sha256": "a" * 64, "victim_sha256": "v" * 64}, {"detector_sha256": "b" * 64}, "detector"),
    ({"detector_sha256": "a" * 64, "victim_sha256": "v" * 64}, {"victim_sha256": "w" * 64}, "victim"),
    ({"detector_sha256": None, "victim_sha256": None}, {"detector_sha256": "a" * 64}, "detector"),
])
def test_load_refuses_another_detector_or_victim(tmp_path, saved, expected, message):
    _two_class_calibrator().save(tmp_path / "cal", **saved)
    with pytest.raises(ArtifactError, match=f"made for the {message}"):
        ConformalCalibrator.load(tmp_path / "cal", **expected)
