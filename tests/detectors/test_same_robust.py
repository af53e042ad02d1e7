"""SAME's robust score options (issue 10) on a tiny fitted detector: the default untouched, masked
scoring, standardisation and complexity fitted on benign calibration data only, persistence, sign."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sameguard.api import NotCalibratedError
from sameguard.bench.metrics import auroc
from sameguard.detectors import ConvAESAMEDetector, SAMEDetector, same_score
from sameguard.detectors.complexity import compressed_bits_per_pixel
from sameguard.detectors.robust_score import LOG_EPS, MAD_TO_STD
from sameguard.detectors.same import scoring_mask_noise
from sameguard.forward_memo import shared_forward

ROBUST_DEFAULTS = dict(standardize=False, log_terms=False, complexity=None, score_mask_ratio=0.0, score_masks=1,
                       score_seed=0)

#: Every variant, each pinned to "larger = more suspicious" on uniform noise vs Fashion-MNIST.
VARIANTS = {
    "standardize": dict(standardize=True),
    "log_terms": dict(log_terms=True),
    "log_standardize": dict(standardize=True, log_terms=True),
    "complexity_png": dict(complexity="png"),
    "complexity_zlib_standardize": dict(complexity="zlib", standardize=True),
    "masked": dict(score_mask_ratio=0.75, score_masks=4),
    "masked_log_standardize": dict(score_mask_ratio=0.75, score_masks=2, standardize=True, log_terms=True),
}


def variant(fitted, **overrides):
    """A new detector with ``fitted``'s hyper-parameters and ``overrides`` that shares its fitted
    networks (not its calibration): the session fixture is never changed."""
    cls = type(fitted)
    detector = cls(**(cls._params_from_manifest(fitted.get_params()) | overrides))
    for name in ("reconstructor_", "aux_", "victim_", "victim_sha256_", "image_shape_", "num_classes_", "aux_arch_"):
        setattr(detector, name, getattr(fitted, name))
    return detector


@pytest.fixture(scope="module")
def benign_sets(fmnist_small):
    """Two disjoint benign calibration sets (held-out training images) and benign test queries."""
    train, test = fmnist_small
    _, held_out = train.split_off(500 / len(train), seed=0)
    return held_out.images[:250], held_out.images[250:], test.images[:300]


# ---------------------------------------------------------------------- parameters
def test_defaults_are_the_authors_score():
    params = SAMEDetector().get_params()
    assert {k: params[k] for k in ROBUST_DEFAULTS} == ROBUST_DEFAULTS
    conv = ConvAESAMEDetector().get_params()
    assert {k: conv[k] for k in ("standardize", "log_terms", "complexity")} == dict(standardize=False, log_terms=False,
                                                                                    complexity=None)


def test_robust_params_are_scoring_only():
    for name in ROBUST_DEFAULTS:
        assert name in SAMEDetector.SCORING_ONLY_PARAMS
    assert {"standardize", "log_terms", "complexity"} <= set(ConvAESAMEDetector.SCORING_ONLY_PARAMS)
    assert "score_mask_ratio" not in ConvAESAMEDetector.SCORING_ONLY_PARAMS  # MAE only


@pytest.mark.parametrize("cls", [SAMEDetector, ConvAESAMEDetector])
def test_from_preset_and_params_round_trip(cls):
    extra = dict(score_mask_ratio=0.5, score_masks=3, score_seed=9) if cls is SAMEDetector else {}
    detector = cls.from_preset("tiny", standardize=True, log_terms=True, complexity="zlib", **extra)
    params = json.loads(json.dumps(detector.get_params()))
    assert params == detector.get_params()
    assert params["complexity"] == "zlib" and params["standardize"] is True
    assert cls(**cls._params_from_manifest(params)).get_params() == params
    assert repr(cls(standardize=True)) == f"{cls.__name__}(standardize=True)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(standardize=1), "standardize must be True or False"),
    (dict(log_terms="yes"), "log_terms must be True or False"),
    (dict(complexity="gzip"), "complexity must be one of None, 'png', 'zlib'"),
    (dict(score_mask_ratio=1.0), r"score_mask_ratio must be a number in \[0, 1\)"),
    (dict(score_mask_ratio=-0.1), "score_mask_ratio"),
    (dict(score_masks=0), "score_masks must be an integer of at least 1"),
    (dict(score_seed=-1), "score_seed must be an integer of at least 0"),
    (dict(score_masks=4), "needs score_mask_ratio > 0"),
])
def test_bad_robust_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAMEDetector(**kwargs)


def test_conv_ae_has_no_masked_scoring():
    with pytest.raises(TypeError):
        ConvAESAMEDetector(score_mask_ratio=0.5)
    with pytest.raises(ValueError, match="complexity"):
        ConvAESAMEDetector(complexity="jpeg")


# ---------------------------------------------------------------------- the default path
def test_default_scores_are_the_authors_formula(tiny_same, tiny_victim, fmnist_small, noise):
    _, test = fmnist_small
    x = torch.cat([test.images[:30], noise[:10]])
    parts = tiny_same.score_components(x)
    x_hat = tiny_same.reconstruct(x)
    with torch.no_grad():
        p_aux = torch.softmax(tiny_same.aux_(x_hat), 1)
    expected = same_score(x, x_hat, tiny_victim.predict_proba(x), p_aux, tiny_same.alpha)
    torch.testing.assert_close(parts.score, expected.score, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.s1, expected.s1, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.s2, expected.s2, rtol=0, atol=1e-6)
    assert parts.t1 is None and parts.t2 is None
    assert tiny_same.term_stats_ is None  # calibrate on the default path fits no term statistics
    # The robust parameters at their defaults, spelled out: the very same scores.
    explicit = variant(tiny_same, **ROBUST_DEFAULTS)
    assert torch.equal(explicit.score(x), tiny_same.score(x))


# ---------------------------------------------------------------------- masked scoring
def test_masked_scores_by_hand(tiny_same, tiny_victim, fmnist_small):
    _, test = fmnist_small
    x = test.images[:12]
    detector = variant(tiny_same, score_mask_ratio=0.5, score_masks=3, score_seed=4)
    parts = detector.score_components(x)
    noise = scoring_mask_noise(tiny_same.mae_.config.num_patches, 3, 4)
    s1, p_aux = [], []
    with torch.no_grad():
        for row in noise:
            x_hat, mask = tiny_same.mae_(x, mask_ratio=0.5, noise=row)
            s1.append((((x_hat - x) ** 2) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1))
            p_aux.append(torch.softmax(tiny_same.aux_(x_hat), 1))
    expected_s1 = torch.stack(s1).mean(0)
    p = tiny_victim.predict_proba(x).double()
    q = torch.stack(p_aux).double().mean(0)
    expected_s2 = (p * (p.clamp_min(1e-300).log() - q.log())).sum(1) / q.shape[1]
    torch.testing.assert_close(parts.s1, expected_s1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.s2, expected_s2.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts.score, 0.99 * parts.s1 + 0.01 * parts.s2)
    assert not torch.allclose(parts.s1, tiny_same.score_components(x).s1)


def test_masked_scores_do_not_depend_on_the_batch(tiny_same, fmnist_small, noise):
    _, test = fmnist_small
    x = torch.cat([test.images[:5], noise[:4]])
    detector = variant(tiny_same, score_mask_ratio=0.75, score_masks=2, batch_size=4)
    together = detector.score(x)
    alone = torch.cat([detector.score(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(variant(tiny_same, score_mask_ratio=0.75, score_masks=2).score(x), together,
                               rtol=1e-5, atol=1e-6)


def test_a_score_mask_ratio_that_hides_no_patch_is_refused(tiny_same):
    with pytest.raises(ValueError, match="hides no patch"):
        variant(tiny_same, score_mask_ratio=1e-17).score(torch.zeros(1, 1, 28, 28))


# ---------------------------------------------------------------------- fitted on benign data only
def test_score_before_calibrate_raises(tiny_same, noise):
    for options in (dict(standardize=True), dict(complexity="png")):
        with pytest.raises(NotCalibratedError, match=r"call calibrate\(benign_x, target_fpr\) first"):
            variant(tiny_same, **options).score(noise[:2])
    # No calibration needed for the options without fitted statistics.
    assert variant(tiny_same, log_terms=True, score_mask_ratio=0.5).score(noise[:2]).shape == (2,)


def test_stats_for_another_configuration_are_refused(tiny_same, benign_sets, noise):
    detector = variant(tiny_same, standardize=True).calibrate(benign_sets[0], 0.05)
    detector.log_terms = True  # as the benchmark sets scoring-only parameters on a loaded detector
    with pytest.raises(NotCalibratedError, match="again"):
        detector.score(noise[:2])
    detector.calibrate(benign_sets[0], 0.05)
    assert detector.score(noise[:2]).shape == (2,)


def _stats_by_hand(raw_s1: np.ndarray, raw_s2: np.ndarray, bits: np.ndarray) -> dict[str, float]:
    """The fitted statistics computed with numpy from benign terms: beta, then median and MAD."""
    log_s1 = np.log(raw_s1.astype(np.float64) + LOG_EPS)
    beta, intercept = np.polyfit(bits.astype(np.float64), log_s1, 1)
    t1, t2 = log_s1 - beta * bits, np.log(raw_s2.astype(np.float64) + LOG_EPS)
    out = {"complexity_beta": beta, "complexity_intercept": intercept}
    for name, t in (("t1", t1), ("t2", t2)):
        out[f"{name}_center"] = float(np.median(t))
        out[f"{name}_scale"] = MAD_TO_STD * float(np.median(np.abs(t - np.median(t))))
    return out


def test_stats_are_fitted_on_the_calibration_data_only(tiny_same, benign_sets, noise):
    benign_a, benign_b, _ = benign_sets
    options = dict(standardize=True, log_terms=True, complexity="png")
    detector = variant(tiny_same, **options).calibrate(benign_a, 0.05)
    raw = tiny_same.score_components(benign_a)  # the raw terms of the calibration images alone
    bits = compressed_bits_per_pixel(benign_a, "png").numpy()
    expected = _stats_by_hand(raw.s1.numpy(), raw.s2.numpy(), bits)
    stats = detector.term_stats_
    assert stats["n"] == len(benign_a)
    assert stats["config"] == detector._term_config()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # Scoring attack queries leaves the statistics alone.
    before = json.dumps(stats, sort_keys=True)
    detector.score(noise)
    assert json.dumps(detector.term_stats_, sort_keys=True) == before
    # Calibrating on another benign set changes them; attack data mixed in would change them too.
    other = variant(tiny_same, **options).calibrate(benign_b, 0.05).term_stats_
    leaked = variant(tiny_same, **options).calibrate(torch.cat([benign_a, noise[:25]]), 0.05).term_stats_
    for changed in (other, leaked):
        assert changed["t1_center"] != pytest.approx(stats["t1_center"], rel=1e-6)
        assert changed["complexity_beta"] != pytest.approx(stats["complexity_beta"], rel=1e-6)


def test_standardized_score_is_alpha_weighted_z_terms(tiny_same, benign_sets, noise):
    detector = variant(tiny_same, standardize=True, alpha=0.7).calibrate(benign_sets[0], 0.05)
    parts = detector.score_components(noise[:20])
    st = detector.term_stats_
    z1 = (parts.s1.double() - st["t1_center"]) / st["t1_scale"]
    z2 = (parts.s2.double() - st["t2_center"]) / st["t2_scale"]
    torch.testing.assert_close(parts.t1, z1.float())
    torch.testing.assert_close(parts.score, (0.7 * z1 + 0.3 * z2).float())
    # On its own calibration data each z-term has median 0 (up to float32 rounding).
    calibrated = detector.score_components(benign_sets[0])
    assert abs(float(calibrated.t1.median())) < 0.02 and abs(float(calibrated.t2.median())) < 0.02


def test_threshold_meets_the_target_fpr_on_its_data(tiny_same, benign_sets):
    detector = variant(tiny_same, standardize=True, complexity="zlib").calibrate(benign_sets[1], 0.05)
    assert detector.predict(benign_sets[1]).float().mean() <= 0.05


# ---------------------------------------------------------------------- persistence
def test_save_load_keeps_the_calibration_state(tiny_same, tiny_victim, benign_sets, noise, tmp_path):
    options = dict(standardize=True, log_terms=True, complexity="png", score_mask_ratio=0.5, score_masks=2)
    detector = variant(tiny_same, **options).calibrate(benign_sets[0], 0.05)
    detector.save(tmp_path / "det")
    loaded = SAMEDetector.load(tmp_path / "det", tiny_victim)
    assert loaded.get_params() == detector.get_params()
    assert loaded.term_stats_ == detector.term_stats_
    assert loaded.threshold_ == detector.threshold_
    x = torch.cat([benign_sets[2][:20], noise[:20]])
    torch.testing.assert_close(loaded.score(x), detector.score(x))


def test_artifacts_saved_before_the_robust_options_still_load(tiny_same, tiny_victim, noise, tmp_path):
    path = tiny_same.save(tmp_path / "old")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["config"]["term_stats"]
    for name in ROBUST_DEFAULTS:
        del manifest["config"]["params"][name]
    manifest_path.write_text(json.dumps(manifest))
    loaded = SAMEDetector.load(path, tiny_victim)
    assert loaded.term_stats_ is None
    assert loaded.get_params() == tiny_same.get_params()
    assert torch.equal(loaded.score(noise[:10]), tiny_same.score(noise[:10]))


def test_conv_ae_standardized(fitted_baselines, fmnist_tiny, noise_queries, tmp_path):
    fitted = fitted_baselines.get("same_conv_ae")
    _, test = fmnist_tiny
    detector = variant(fitted, standardize=True, log_terms=True).calibrate(test.images[:150], 0.05)
    benign, attack = detector.score(test.images[150:]), detector.score(noise_queries)
    assert auroc(benign.numpy(), attack.numpy()) > 0.85
    detector.save(tmp_path / "cae")
    loaded = ConvAESAMEDetector.load(tmp_path / "cae", fitted_baselines.victim_for("same_conv_ae"))
    assert loaded.term_stats_ == detector.term_stats_


# ---------------------------------------------------------------------- sign
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sign_noise_scores_higher_than_fashion_mnist(name, tiny_same, benign_sets, noise):
    detector = variant(tiny_same, **VARIANTS[name]).calibrate(benign_sets[0], 0.05)
    benign, attack = detector.score(benign_sets[2]), detector.score(noise)
    assert torch.isfinite(benign).all() and torch.isfinite(attack).all()
    assert attack.median() > benign.median()
    assert auroc(benign.numpy(), attack.numpy()) > 0.85


# ---------------------------------------------------------------------- sharing within a request
def test_detectors_sharing_networks_and_statistics_share_terms_within_a_request(tiny_same, benign_sets, noise):
    """SAME and its s2 variant (alpha apart, the same fitted statistics) compute the standardised terms
    once per guarded request; a detector with other statistics gets its own; scores equal unshared ones."""
    calib, _, queries = benign_sets
    same = variant(tiny_same, standardize=True, log_terms=True, alpha=0.5).calibrate(calib, 0.05)
    s2 = copy.copy(same)
    s2.alpha = 0.0
    other = copy.copy(same)
    other.term_stats_ = dict(same.term_stats_, t2_center=same.term_stats_["t2_center"] + 1.0)
    x = torch.cat([queries[:20], noise[:5]])
    expected = {name: d.score(x) for name, d in (("same", same), ("s2", s2), ("other", other))}
    calls = []
    original = type(same)._terms

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    type(same)._terms = counting
    try:
        with torch.no_grad(), shared_forward():
            got = {name: d.score(x) for name, d in (("same", same), ("s2", s2), ("other", other))}
    finally:
        type(same)._terms = original
    assert calls == [same, other]  # s2 reused same's terms; other's statistics differ
    for name, scores in expected.items():
        assert torch.equal(got[name], scores), name
    assert not torch.equal(got["other"], got["s2"])
