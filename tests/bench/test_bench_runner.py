"""The benchmark runner end to end on a tiny config (digits victim), its outputs and its cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sameguard.bench.config import load_config, parse_config
from sameguard.bench.runner import run_benchmark

TINY = Path(__file__).with_name("tiny.toml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("bench")
    config = load_config(TINY)
    records = run_benchmark(config, out, progress=False, echo=lambda _: None)
    return config, out, records


def test_every_output_file_is_written(tiny_run):
    config, out, records = tiny_run
    for name in ("results.json", "results.csv", "report.md"):
        assert (out / name).is_file()
    assert len(records) == len(config.attacks) * len(config.detectors) * len(config.seeds)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(records)
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["name"] == "tiny" and len(data["records"]) == len(records)
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert sum(p.startswith("roc-") for p in pngs) == len(config.attacks)
    assert sum(p.startswith("hist-") for p in pngs) == len(config.attacks)
    report = (out / "report.md").read_text()
    assert "## Victim: digits" in report and "| SAME |" in report and "nothing (black box)" in report
    assert "### prada: queries until the per-client alarm" in report


def test_protocol_and_metrics(tiny_run):
    config, _, records = tiny_run
    for rec in records:
        assert rec["scored_queries"] == config.scored_queries
        budget = next(a.budget for a in config.attacks if a.label == rec["attack"])
        assert rec["queries_used"] == budget  # every attack spends its budget exactly
        for key in ("auroc", "aupr", "fpr95", "tpr_at_1fpr", "fidelity", "substitute_accuracy"):
            assert 0.0 <= rec[key] <= 1.0
    same = {r["attack"]: r for r in records if r["detector"] == "SAME"}
    # DFME's generator images are noise-like: SAME must catch them almost perfectly.
    assert same["dfme"]["auroc"] > 0.9
    # The victim is a real classifier, and the alpha=1 row shares the SAME fit.
    assert records[0]["victim_accuracy"] > 0.5
    prada = [r for r in records if r["detector"] == "prada"]
    assert all("alarm_after_attack" in r and "alarm_after_benign" in r for r in prada)
    s1 = {r["attack"]: r for r in records if r["detector"] == "SAME s1"}
    assert s1["dfme"]["fit_seconds"] == same["dfme"]["fit_seconds"]


def test_rerun_uses_the_cache_and_gives_identical_numbers(tiny_run):
    config, out, records = tiny_run
    again = run_benchmark(config, out, progress=False, echo=lambda _: None)
    keys = ("auroc", "aupr", "fpr95", "substitute_accuracy", "fidelity")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in records]


@pytest.mark.parametrize("profile", ["quick", "standard", "paper"])
def test_profiles_parse(profile):
    assert load_config(profile).name == profile


@pytest.mark.parametrize("patch, message", [
    ({"datasets": ["imagenet"]}, "unknown dataset"),
    ({"attacks": [{"name": "steal-all", "budget": 100}]}, "unknown attack"),
    ({"attacks": [{"name": "jbda", "budget": 5}]}, "below scored_queries"),
    ({"detectors": [{"name": "oracle"}]}, "unknown detector"),
    ({"colour": "red"}, "unknown key"),
    ({"scored_queries": 1}, "at least 10"),
])
def test_config_errors(patch, message):
    raw = {"name": "x", "datasets": ["digits"], "scored_queries": 50,
           "attacks": [{"name": "jbda", "budget": 50}], "detectors": [{"name": "msp"}]}
    raw.update(patch)
    with pytest.raises(ValueError, match=message):
        parse_config(raw)
