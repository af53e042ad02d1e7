"""The adaptive attackers in the benchmark: a proxy+seeds attack as an [[attacks]] entry, and the
slow-and-wide key sweep through the guard, end to end on a tiny config (digits victim)."""

from __future__ import annotations

import json

import pytest

from sameguard.bench.adaptive_study import key_sweep_report
from sameguard.bench.config import load_config, parse_config
from sameguard.bench.runner import run_benchmark

RAW = {
    "name": "tiny-adaptive", "datasets": ["digits"], "seeds": [0], "scored_queries": 40,
    "victim": {"arch": "conv3", "epochs": 15},
    "attacks": [
        {"name": "knockoff", "label": "Knockoff", "budget": 40, "proxy": "fashion-mnist", "params": {"epochs": 2}},
        {"name": "knockoff-blend", "label": "blend", "budget": 40, "proxy": "fashion-mnist",
         "params": {"lam": 0.5, "num_seeds": 20, "epochs": 2}},
        {"name": "knockoff-filtered", "label": "filtered", "budget": 40, "proxy": "fashion-mnist", "output": "labels",
         "params": {"scorer": "energy", "pool_factor": 2.0, "rounds": 2, "round_epochs": 1, "epochs": 2}},
    ],
    "detectors": [{"name": "msp", "label": "MSP"}, {"name": "energy", "label": "Energy"}],
    "alarms": {"detectors": ["MSP", "Energy"], "combination": ["MSP", "Energy"], "stream": False,
               "benign_clients": 10, "client_queries": 20, "stream_queries": 40, "actions": []},
    "key_sweep": {"attacks": ["Knockoff"], "keys": [1, 4]},
}


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("adaptive")
    config = parse_config(RAW)
    records = run_benchmark(config, out, progress=False, echo=lambda _: None)
    return config, out, records


def test_adaptive_attacks_get_a_detection_row_per_detector(adaptive_run):
    _, _, records = adaptive_run
    cells = {(r["attack"], r["detector"]) for r in records}
    assert cells == {(a, d) for a in ("Knockoff", "blend", "filtered") for d in ("MSP", "Energy")}
    assert all(r["queries_used"] == 40 and r["substitute_accuracy"] is not None for r in records)


def test_key_sweep_measures_keys_through_the_guard(adaptive_run):
    _, out, _ = adaptive_run
    alarms = json.loads((out / "results.json").read_text())["alarms"]
    sweep = [r for r in alarms if r["kind"] == "key-sweep"]
    assert [(r["attack"], r["keys"], r["queries_per_key"]) for r in sweep] == [("Knockoff", 1, 40), ("Knockoff", 4, 10)]
    for r in sweep:
        assert len(r["alarm_queries"]) == r["keys"] and r["keys_alarmed"] == sum(q is not None for q in r["alarm_queries"])
        assert 0 <= r["answered_unnoticed"] <= r["budget"]
    report = (out / "report.md").read_text()
    assert "### Slow and wide" in report and "| Knockoff | 4 | 10 |" in report
    assert "queries until alarm" in report.lower() or "Per-client alarms" in report


def test_key_sweep_report_counts_unnoticed_answers():
    rows = [{"kind": "key-sweep", "attack": "A", "keys": 2, "budget": 10, "policy": "reject", "queries_per_key": 5,
             "keys_alarmed": 1, "alarm_queries": [3, None], "answered_unnoticed": 7, "substitute_accuracy": 0.5,
             "unguarded_accuracy": 0.6, "seed": 0}]
    table = "\n".join(key_sweep_report(rows))
    assert "| A | 2 | 5 | 1 / 2 | 3 | 7 / 10 (70 %) | 50.0 | 60.0 | 0 |" in table
    assert key_sweep_report([{"kind": "attack"}]) == []


def test_adaptive_profile_parses():
    config = load_config("adaptive")
    assert config.key_sweep is not None and config.alarms is not None
    assert {a.name for a in config.attacks} >= {"knockoff-blend", "knockoff-mixup", "knockoff-interleave",
                                                 "knockoff-filtered"}
    assert any(a.output == "labels" for a in config.attacks)  # a hard-label variant


@pytest.mark.parametrize("patch, message", [
    ({"attacks": ["nope"]}, "not the label"),
    ({"keys": []}, "non-empty list"),
    ({"keys": [0]}, "keys"),
    ({"policy": "pow"}, "policy"),
    ({"colour": 1}, "unknown key"),
])
def test_key_sweep_config_errors(patch, message):
    raw = json.loads(json.dumps(RAW))
    raw["key_sweep"].update(patch)
    with pytest.raises(ValueError, match=message):
        parse_config(raw)
    no_alarms = json.loads(json.dumps(RAW))
    del no_alarms["alarms"]
    with pytest.raises(ValueError, match="alarms"):
        parse_config(no_alarms)


def test_proxy_and_seeds_attack_needs_a_proxy():
    raw = json.loads(json.dumps(RAW))
    del raw["attacks"][1]["proxy"]
    with pytest.raises(ValueError, match="proxy"):
        parse_config(raw)
