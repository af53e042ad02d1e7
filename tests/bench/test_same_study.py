"""The SAME scaling study: the rule that picks the default, and a tiny end-to-end run with its report."""

from __future__ import annotations

from pathlib import Path

import pytest

from sameguard.bench.config import load_config
from sameguard.bench.same_study import AUTHORS, CPU, MAX_FIT_SECONDS, Candidate, choose_default, run_study
from sameguard.bench.same_study_report import write_study_report

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
