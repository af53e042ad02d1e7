"""The SAME scaling study: the rule that picks the default, and a tiny end-to-end run with its report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sameguard.bench.config import load_config
from sameguard.bench.same_study import (AUTHORS, CPU, MAX_FIT_SECONDS, SCALING_AXES, Candidate, choose_default,
                                        run_study)
from sameguard.bench.same_study_report import (PAPER_EPOCHS, compute_trends, paper_fit_seconds, plot_axes,
                                               trend_table, write_study_report)

TINY = Path(__file__).with_name("tiny.toml")


def record(candidate, scoring, worst, mean, fit=60.0, ms=1.0, attack=0.5):
    return {"candidate": candidate, "scoring": scoring, "validation_min": worst, "validation_mean": mean,
            "fit_seconds": fit, "score_ms": ms, "seed": 0, "attacks": {"a": attack}}


@pytest.mark.parametrize("extra, expected", [
    ([], ("big", "masked")),                                                     # best worst case wins
    ([record("big", "masked", 0.95, 0.97, fit=MAX_FIT_SECONDS + 1)], (CPU, "masked")),  # too slow to fit
    ([record("big", "masked", 0.95, 0.97, ms=1.6)], (CPU, "masked")),            # scoring too costly (1.5x cap)
    ([record("big", "masked", 0.901, 0.99)], ("big", "masked")),                 # tie on worst: higher mean
])
def test_choose_default_follows_the_rule(extra, expected):
    records = [record(CPU, AUTHORS, 0.40, 0.80), record(CPU, "masked", 0.90, 0.95),
               record("MSP", "msp", 0.99, 0.99, fit=0.0, ms=0.1)]   # MSP is a reference, never chosen
    records += extra or [record("big", "masked", 0.95, 0.97)]
    assert choose_default(records) == expected


def test_attack_columns_do_not_change_the_choice():
    a = [record(CPU, AUTHORS, 0.5, 0.6, attack=0.1), record(CPU, "masked", 0.7, 0.8, attack=0.2)]
    b = [dict(r, attacks={"a": 1.0 - r["attacks"]["a"]}) for r in a]
    assert choose_default(a) == choose_default(b) == (CPU, "masked")


def test_tiny_study_end_to_end(tmp_path, fmnist_small):
    config = load_config(TINY)
    tiny = {"mae": "tiny", "mae_epochs": 1, "mae_warmup_epochs": 0.1, "aux_epochs": 1, "max_train_samples": 300}
    candidates = (Candidate(CPU, tiny), Candidate("tiny, 2 epochs", {**tiny, "mae_epochs": 2}))
    scorings = {AUTHORS: {}, "s2 only": {"alpha": 0.0}}
    records = run_study(config, tmp_path / "bench", tmp_path / "study", candidates=candidates, scorings=scorings,
                        progress=False, echo=lambda _: None)
    assert {(r["candidate"], r["scoring"]) for r in records} == {
        ("MSP", "msp"), (CPU, AUTHORS), (CPU, "s2 only"), ("tiny, 2 epochs", AUTHORS), ("tiny, 2 epochs", "s2 only")}
    for r in records:
        assert set(r["attacks"]) == {a.label for a in config.attacks}
        assert 0.0 <= r["validation_min"] <= r["validation_mean"] <= 1.0
    # MSP on the digits victim: noise is far from digits in the victim's eyes
    assert next(r for r in records if r["candidate"] == "MSP")["validation"]["uniform noise"] > 0.8
    out = write_study_report(tmp_path / "study" / "study.json", tmp_path / "same-at-scale.md", command="test")
    text = out.read_text()
    assert "Chosen by the rule" in text and "| MSP | msp |" in text
    assert (tmp_path / "same-at-scale.png").is_file()


def _trend_records(aurocs_by_seconds, msp=0.8, attack="a"):
    recs = [record("MSP", "msp", 0.5, 0.5, fit=0.0, attack=msp)]
    recs += [record(f"fit {t}", AUTHORS, 0.5, 0.5, fit=t, attack=y) for t, y in aurocs_by_seconds]
    for r in recs:
        r["attacks"] = {attack: r["attacks"]["a"], "in-distribution (sanity)": 0.5}
    return recs


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_trend_is_a_log_odds_line_with_the_crossing():
    # log-odds 0, 1, 2 at 10, 100, 1000 s: +1 per tenfold; MSP at log-odds 3 is met at 10^4 s
    trends = compute_trends(_trend_records([(10.0, _sig(0)), (100.0, _sig(1)), (1000.0, _sig(2))], msp=_sig(3)),
                            AUTHORS)
    assert set(trends) == {"a"}  # the sanity row has no trend
    t = trends["a"]
    assert t["n"] == 3 and t["slope"] == pytest.approx(1.0) and t["r"] == pytest.approx(1.0)
    assert t["msp"] == pytest.approx(100 * _sig(3)) and t["best"] == pytest.approx(100 * _sig(2))
    assert t["reach_seconds"] == pytest.approx(1e4, rel=1e-9)
    assert math.isnan(t["paper"])  # no run of the authors' MAE


@pytest.mark.parametrize("points, reach", [
    ([(10.0, 0.7), (100.0, 0.6), (1000.0, 0.5)], math.inf),     # falling with compute: never
    ([(10.0, 0.9), (100.0, 0.85), (1000.0, 0.95)], 0.0),        # above MSP at the longest fit: reached
    ([(10.0, 0.9), (100.0, 0.8), (1000.0, 0.7)], math.inf),     # above MSP once, falling below it: never
])
def test_trend_never_and_reached(points, reach):
    assert compute_trends(_trend_records(points), AUTHORS)["a"]["reach_seconds"] == reach


def test_trend_stays_a_probability_far_out():
    name, image_epochs = SCALING_AXES["the authors' MAE: image-epochs"][-1]
    # steep and falling: a straight line in AUROC would go far below 0 at the authors' schedule
    recs = _trend_records([(10.0, 0.99), (100.0, 0.9)])
    recs.append({**record(name, AUTHORS, 0.5, 0.5, fit=1000.0), "defender_images": 1000})
    recs[-1]["attacks"] = {"a": 0.4, "in-distribution (sanity)": 0.5}
    assert 0.0 <= compute_trends(recs, AUTHORS)["a"]["paper"] < 5.0


def test_trend_target_is_the_goal_when_above_msp():
    points = [(10.0, _sig(0)), (100.0, _sig(1)), (1000.0, _sig(2))]
    t = compute_trends(_trend_records(points, msp=_sig(-1)), AUTHORS, {"a": _sig(4)})["a"]
    assert t["target"] == pytest.approx(100 * _sig(4)) and t["reach_seconds"] == pytest.approx(1e5, rel=1e-9)
    t = compute_trends(_trend_records(points, msp=_sig(3)), AUTHORS, {"a": _sig(-1)})["a"]
    assert t["target"] == pytest.approx(100 * _sig(3)) and t["reach_seconds"] == pytest.approx(1e4, rel=1e-9)


def test_trend_needs_three_fits_and_msp():
    assert compute_trends(_trend_records([(10.0, 0.5), (100.0, 0.6)]), AUTHORS) == {}
    assert compute_trends(_trend_records([(10.0, 0.5), (100.0, 0.6), (1e3, 0.7)])[1:], AUTHORS) == {}


def test_trend_extrapolates_to_the_authors_schedule():
    name, image_epochs = SCALING_AXES["the authors' MAE: image-epochs"][-1]
    recs = _trend_records([(10.0, _sig(0)), (100.0, _sig(0.5))])
    recs.append({**record(name, AUTHORS, 0.5, 0.5, fit=1000.0), "defender_images": 400})
    recs[-1]["attacks"] = {"a": _sig(1.0), "in-distribution (sanity)": 0.5}
    seconds = 1000.0 / image_epochs * PAPER_EPOCHS * 400
    assert paper_fit_seconds(recs) == pytest.approx(seconds)
    expected = 100 * _sig(0.5 * (math.log10(seconds) - 1))
    assert compute_trends(recs, AUTHORS)["a"]["paper"] == pytest.approx(expected)
    assert any("authors' schedule" in line for line in trend_table(recs, [AUTHORS]))


def test_axes_plot_needs_two_fits_on_an_axis(tmp_path):
    axis = next(iter(SCALING_AXES.values()))
    recs = [record("MSP", "msp", 0.5, 0.5, fit=0.0)]
    recs.append(record(axis[0][0], AUTHORS, 0.5, 0.6))
    assert plot_axes(recs, tmp_path / "one.png") is None
    recs.append(record(axis[1][0], AUTHORS, 0.6, 0.7))
    assert plot_axes(recs, tmp_path / "two.png") == tmp_path / "two.png" and (tmp_path / "two.png").stat().st_size > 0
