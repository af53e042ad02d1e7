"""sameguard's default SAME (issue 10): the rule's pick is the ``cpu`` preset, and it is what the
demo, ``fit`` and the benchmark load; the authors' score stays one dictionary away."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sameguard.api import NotCalibratedError
from sameguard.bench.config import load_config
from sameguard.bench.same_study import CANDIDATES, SCORINGS
from sameguard.cache import cached_detector
from sameguard.detectors import AUTHORS_SCORING, DEFAULT_SCORING, SAME_PRESETS, SAMEDetector
from sameguard.models import MAEConfig, mae_config

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "src" / "sameguard" / "bench" / "profiles"
DEFAULT_LABEL = "SAME (sameguard default)"


def test_the_cpu_preset_is_the_choice_written_in_the_study_report():
    """The preset equals the (fit, scoring) pair that the rule chose in its latest adopted application
    (docs/same-at-scale-sweep.md, all 14 fits in one run, confirmed by a second run on another
    machine; the notes say so)."""
    report = (ROOT / "docs" / "same-at-scale-sweep.md").read_text()
    match = re.search(r"\*\*Chosen by the rule:\*\* (.+?), scoring (.+?)\.\n", report)
    assert match, "the study report names no choice"
    fit, scoring = match.groups()
    assert "confirm" in (ROOT / "docs" / "same-at-scale-sweep-notes.md").read_text().lower()
    candidate = next(c for c in CANDIDATES if c.name == fit)
    cpu = SAME_PRESETS["cpu"]
    chosen = {**AUTHORS_SCORING, **candidate.params, **SCORINGS[scoring]}  # as the study builds it
    for key, value in chosen.items():
        if key == "mae" and isinstance(value, MAEConfig):  # the preset names it, sized at fit time
            assert mae_config(cpu["mae"], value.image_size, value.in_channels) == value
        else:
            assert cpu.get(key) == value, key
    assert {k: cpu[k] for k in DEFAULT_SCORING} == DEFAULT_SCORING


def test_authors_scoring_restores_the_published_score():
    authors = SAMEDetector.from_preset("cpu", **AUTHORS_SCORING)
    constructor = SAMEDetector()  # the constructor's defaults are the authors' values
    for key, value in AUTHORS_SCORING.items():
        assert getattr(authors, key) == value == getattr(constructor, key), key
    assert not authors.needs_calibration
    default = SAMEDetector.from_preset("cpu")
    assert (default.alpha, default.standardize, default.max_train_samples, default.mae) == (0.99, False, 20000, "shallow")
    assert not default.needs_calibration  # the authors' formula needs no benign statistics
    standardised = SAMEDetector.from_preset("cpu", alpha=0.5, standardize=True)  # 0.2.0's score, an ablation
    assert standardised.needs_calibration


@pytest.mark.parametrize("profile", ["quick", "standard", "paper"])
def test_benchmark_profiles_report_the_default_beside_the_authors_row(profile):
    config = load_config(PROFILES / f"{profile}.toml")
    rows = {d.label: d for d in config.detectors}
    default, authors = rows[DEFAULT_LABEL], rows["SAME"]
    built = SAMEDetector.from_preset(default.preset, **default.params)
    assert default.name == "same" and (built.alpha, built.standardize) == (0.99, False)
    if profile != "paper":  # the CPU profiles: exactly the cpu preset
        assert (default.preset, default.params) == ("cpu", {})
    assert authors.name == "same" and authors.preset == default.preset
    assert SAMEDetector.from_preset(authors.preset, **authors.params).standardize is False
    assert SAMEDetector.from_preset(authors.preset, **authors.params).alpha == 0.99
    assert config.alarms is not None and config.alarms.combination[0] == DEFAULT_LABEL  # the guard's detector


def test_the_demo_and_fit_default_fit_calibrate_and_score_the_default(tmp_path, tiny_victim, fmnist_small):
    """``cached_detector`` (the demo's path, preset ``cpu`` by default) fits the default score; with
    standardised terms (0.2.0's default, an ablation row now) it standardises on the held-out images
    it is given, saves that, and loads it back scoring alike; unfitted terms are refused."""
    from sameguard.cli import build_parser

    assert build_parser().parse_args(["demo"]).preset == "cpu"
    assert build_parser().parse_args(["fit", "--victim", "v", "--out", "o"]).preset in (None, "cpu")
    train, test = fmnist_small
    fit_part, held = train.take(600, seed=0).split_off(0.5, seed=0)
    small = dict(mae="tiny", mae_epochs=1, mae_warmup_epochs=0.5, aux_epochs=1)
    default = cached_detector(tmp_path / "default", tiny_victim, fit_part, held, preset="cpu", seed=0, device="cpu",
                              progress=False, **small)
    assert (default.alpha, default.standardize, default.term_stats_) == (0.99, False, None)
    assert torch.isfinite(default.score(test.images[:50])).all()
    standardised = dict(small, alpha=0.5, standardize=True)
    detector = cached_detector(tmp_path, tiny_victim, fit_part, held, preset="cpu", seed=0, device="cpu",
                               progress=False, **standardised)
    assert detector.standardize and detector.alpha == 0.5
    stats = detector.term_stats_
    assert stats is not None and stats["n"] == len(held)
    scores = detector.score(test.images[:50])
    assert torch.isfinite(scores).all()
    again = cached_detector(tmp_path, tiny_victim, fit_part, held, preset="cpu", seed=0, device="cpu",
                            progress=False, **standardised)  # from the cache: the statistics were saved
    torch.testing.assert_close(again.score(test.images[:50]), scores, rtol=1e-4, atol=1e-5)
    fresh = SAMEDetector.from_preset("cpu", seed=0, progress=False, **standardised).fit(tiny_victim, fit_part)
    with pytest.raises(NotCalibratedError):
        fresh.score(test.images[:5])
