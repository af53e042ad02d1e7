"""The benchmark runner end to end on a tiny config (digits victim), its outputs and its cache."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from sameguard.bench.config import load_config, parse_config
from sameguard.bench.runner import run_benchmark
from sameguard.steps import STEP_LOGGER

TINY = Path(__file__).with_name("tiny.toml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("bench")
    config = load_config(TINY)
    records = run_benchmark(config, out, progress=False, echo=lambda _: None)
    return config, out, records


@pytest.mark.parametrize("name", ["results.json", "results.csv", "report.md"])
def test_every_output_file_is_written(tiny_run, name):
    _, out, _ = tiny_run
    assert (out / name).is_file()


def test_one_record_per_cell_in_every_output(tiny_run):
    config, out, records = tiny_run
    assert len(records) == len(config.attacks) * len(config.detectors) * len(config.seeds)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records)
    data = json.loads((out / "results.json").read_text())
    assert (data["config"]["name"], len(data["records"])) == ("tiny", len(records))
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert sum(p.startswith("roc-") for p in pngs) == len(config.attacks)
    assert sum(p.startswith("hist-") for p in pngs) == len(config.attacks)


@pytest.mark.parametrize("needle", ["## Victim: digits", "| SAME |", "nothing (black box)",
                                    "### prada: queries until the per-client alarm"])
def test_report_sections(tiny_run, needle):
    _, out, _ = tiny_run
    assert needle in (out / "report.md").read_text()


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
    assert [sorted(k for k in r if k.startswith("alarm_after")) for r in prada] == \
        [["alarm_after_attack", "alarm_after_benign"]] * len(prada)
    s1 = {r["attack"]: r for r in records if r["detector"] == "SAME s1"}
    assert s1["dfme"]["fit_seconds"] == same["dfme"]["fit_seconds"]


def test_rerun_uses_the_cache_and_gives_the_same_numbers(tiny_run):
    """A second run loads victim, detectors and attack queries from the cache and scores alike."""
    config, out, records = tiny_run
    again = run_benchmark(config, out, progress=False, echo=lambda _: None, reuse_results=False)
    keys = ("auroc", "aupr", "fpr95", "substitute_accuracy", "fidelity")
    got = torch.tensor([[r[k] for k in keys] for r in again], dtype=torch.float64)
    want = torch.tensor([[r[k] for k in keys] for r in records], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_later_run_reuses_each_seeds_saved_results(tiny_run, monkeypatch):
    """Finished seeds are read back (an interrupted run resumes); nothing is scored again."""
    import sameguard.bench.runner as runner

    config, out, records = tiny_run
    saved = sorted((out / "cache").glob("results-*-seed*.json"))
    assert len(saved) == len(config.datasets) * len(config.seeds)

    def fail(*args, **kwargs):
        raise AssertionError("a finished seed was trained or scored again")

    want = [r for path in saved for r in json.loads(path.read_text())["records"]]  # one seed in tiny.toml
    monkeypatch.setattr(runner, "_run_seed", fail)
    monkeypatch.setattr(runner, "_start_run", fail)  # not even the victim is trained again
    again = run_benchmark(config, out, progress=False, echo=lambda _: None)
    assert again == want and len(again) == len(records)
    assert json.loads((out / "results.json").read_text())["records"] == want


def test_saved_seed_results_carry_to_another_output_folder(tiny_run, tmp_path, monkeypatch):
    """The per-seed files alone, copied into another run's cache, give the same report (how finished
    seeds of a long profile move to another machine); a corrupt file is ignored and recomputed."""
    import shutil

    import sameguard.bench.runner as runner

    config, out, records = tiny_run
    other = tmp_path / "elsewhere"
    (other / "cache").mkdir(parents=True)
    saved = sorted((out / "cache").glob("results-*-seed*.json"))
    for path in saved:
        shutil.copy(path, other / "cache" / path.name)
    want = [r for path in saved for r in json.loads(path.read_text())["records"]]
    monkeypatch.setattr(runner, "_start_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = run_benchmark(config, other, progress=False, echo=lambda _: None)
    assert again == want and len(again) == len(records)
    for path in (other / "cache").glob("results-*-seed*.json"):
        path.write_text("{not json")
    with pytest.raises(AssertionError, match="retrained"):  # the corrupt file is not trusted
        run_benchmark(config, other, progress=False, echo=lambda _: None)


def test_detection_only_reuses_the_full_runs_cache_and_gives_its_detection_rows(tiny_run, tmp_path, monkeypatch):
    """--detection-only: the same victim, detector and attack cache entries as a full run (nothing is
    trained again from a full run's cache), the same detection rows, no alarm rows, results kept apart."""
    import shutil

    import sameguard.bench.runner as runner

    config, out, records = tiny_run
    other = tmp_path / "detection"
    shutil.copytree(out / "cache", other / "cache")
    for path in (other / "cache").glob("results-*.json"):
        path.unlink()  # the full seed's records are gone: the detection rows must be scored again
    monkeypatch.setattr(runner, "_build_attack", lambda *a, **k: (_ for _ in ()).throw(AssertionError("attacked")))
    monkeypatch.setattr(runner, "_alarm_records", lambda *a, **k: (_ for _ in ()).throw(AssertionError("alarms")))
    again = run_benchmark(config, other, progress=False, echo=lambda _: None, detection_only=True)
    assert [(r["attack"], r["detector"]) for r in again] == [(r["attack"], r["detector"]) for r in records]
    keys = ("auroc", "aupr", "fpr95", "substitute_accuracy")
    got = torch.tensor([[r[k] for k in keys] for r in again], dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor([[r[k] for k in keys] for r in records], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    saved = json.loads((other / "results.json").read_text())
    assert saved["alarms"] == [] and "Detection only" in (other / "report.md").read_text()
    assert [p.name.startswith("results-detection-") for p in (other / "cache").glob("results-*.json")] == [True]
    # A full seed saved in the cache serves a detection-only run as it is (its detection rows).
    full = sorted((out / "cache").glob("results-digits-seed*.json"))
    for path in full:
        shutil.copy(path, other / "cache" / path.name)
    for path in (other / "cache").glob("results-detection-*.json"):
        path.unlink()
    monkeypatch.setattr(runner, "_start_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    want = [r for path in full for r in json.loads(path.read_text())["records"]]
    assert run_benchmark(config, other, progress=False, echo=lambda _: None, detection_only=True) == want


def test_steps_are_logged_with_elapsed_time(tiny_run, caplog):
    """Without ``echo``, each step is one ``sameguard.steps`` line: ``[  12.3 s] ...``."""
    config, out, _ = tiny_run
    with caplog.at_level(logging.INFO, logger=STEP_LOGGER):
        run_benchmark(config, out, progress=False, reuse_results=False)
    lines = [r.getMessage() for r in caplog.records if r.name == STEP_LOGGER]
    assert all(re.match(r"\[ *\d+\.\d s\] ", line) for line in lines), lines
    # data, victim, detectors, attacks, alarms per attack stream, alarms on benign clients,
    # the alarms' cost, each attack through the guard per action, report
    expected = 2 + len(config.detectors) + 2 * len(config.attacks) + 1 + 1 + len(config.attacks) + 1
    assert len(lines) == expected, lines
    assert [line.split("] ", 1)[1].split(":")[0] for line in lines[-1:]] == ["report"]


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


def test_alarm_study_rows_and_report(tiny_run):
    config, out, _ = tiny_run
    alarms = json.loads((out / "results.json").read_text())["alarms"]
    sets = ["SAME", "msp", "combination", "stream test", "combination + stream test"]
    attack_rows = [r for r in alarms if r["kind"] == "attack"]
    assert len(attack_rows) == len(config.attacks) * len(sets)
    for r in attack_rows:
        assert r["alarm_query"] is None or 1 <= r["alarm_query"] <= r["stream_length"]
    benign = {r["alarm_set"]: r for r in alarms if r["kind"] == "benign"}
    assert sorted(benign) == sorted(sets)
    assert all(r["clients"] == 20 and r["skewed_clients"] == 55 for r in benign.values())  # 10 classes + 45 pairs
    # DFME's noise-like queries: SAME's own martingale alarms within the 80-query stream
    dfme = {r["alarm_set"]: r["alarm_query"] for r in attack_rows if r["attack"] == "dfme"}
    assert dfme["SAME"] is not None
    extraction = [r for r in alarms if r["kind"] == "extraction"]
    assert [(r["policy"], r["attack"]) for r in extraction] == [("reject", a.label) for a in config.attacks]
    for r in extraction:
        assert 0.0 <= r["substitute_accuracy"] <= 1.0 and 0.0 <= r["unguarded_accuracy"] <= 1.0
    dfme_guarded = next(r for r in extraction if r["attack"] == "dfme")
    assert dfme_guarded["alarm_query"] is not None  # noise-like queries: alarmed, then refused
    (cost,) = [r for r in alarms if r["kind"] == "cost"]
    assert cost["ms_guard"] > 0 and cost["ms_guard_with_alarms"] > 0
    (benign_acc,) = [r for r in alarms if r["kind"] == "benign-accuracy"]
    assert benign_acc["guarded_accuracy"] <= benign_acc["bare_accuracy"]
    report = (out / "report.md").read_text()
    assert "### Per-client alarms (delta = 0.001)" in report
    assert "| combination + stream test |" in report


@pytest.mark.parametrize("alarms, message", [
    ({"detectors": ["nope"]}, "not the label"),
    ({"detectors": ["SAME"], "delta": 2.0}, "delta"),
    ({"detectors": ["SAME"], "extra": 1}, "unknown key"),
])
def test_alarm_config_errors(alarms, message):
    import tomllib

    raw = tomllib.loads(TINY.read_text())
    raw["alarms"] = alarms
    with pytest.raises(ValueError, match=message):
        parse_config(raw, "tiny")


def test_alarm_recheck_repeats_the_alarm_study_on_the_cache(tiny_run, capsys, tmp_path):
    """``python -m sameguard.bench.alarm_recheck``: with marginal p-values it reproduces the run's own alarm
    rows from the cache, without training anything; calibration-conditional p-values are never smaller,
    so every alarm comes no earlier and no more benign clients are alarmed; the stream test is untouched."""
    from sameguard.bench.alarm_recheck import main, recheck_alarms

    config, out, _ = tiny_run
    cached = sorted((p, p.stat().st_mtime_ns) for p in (out / "cache").rglob("*") if p.is_file())
    records = recheck_alarms(config, out, conditional=[None, 0.01], stream_pool_size=[None, 7], echo=lambda _: None)
    pooled = [r for r in records if r["stream_pool_size"] == 7]
    records = [r for r in records if r["stream_pool_size"] is None]
    assert sorted((p, p.stat().st_mtime_ns) for p in (out / "cache").rglob("*") if p.is_file()) == cached  # nothing trained
    saved = [r for r in json.loads((out / "results.json").read_text())["alarms"] if r["kind"] in ("attack", "benign")]
    assert [r for r in records if r["calibration_conditional"] is None] == saved
    conditional = {(r["kind"], r.get("attack"), r["alarm_set"]): r for r in records if r["calibration_conditional"] == 0.01}
    assert len(conditional) == len(saved)
    # The stream test on pooled images: the other alarm sets exactly as before, every benign count within bounds
    full = {(r["kind"], r.get("attack"), r["alarm_set"], r["calibration_conditional"]): r for r in records}
    assert len(pooled) == len(records)
    for r in pooled:
        before = full[(r["kind"], r.get("attack"), r["alarm_set"], r["calibration_conditional"])]
        if "stream" not in r["alarm_set"]:
            assert {**r, "stream_pool_size": None} == before
        elif r["kind"] == "benign":
            assert r["clients"] == before["clients"]
    for r in saved:
        c = conditional[(r["kind"], r.get("attack"), r["alarm_set"])]
        if r["kind"] == "attack":
            later = c["alarm_query"] is None or (r["alarm_query"] is not None and c["alarm_query"] >= r["alarm_query"])
            assert later or r["alarm_set"] == "stream test", r
            if r["alarm_set"] == "stream test":
                assert c["alarm_query"] == r["alarm_query"]
        else:
            assert c["alarmed"] <= r["alarmed"] and c["skewed_alarmed"] <= r["skewed_alarmed"]
    assert main(["--config", str(TINY), "--bench-dir", str(out), "--calibration-conditional", "none,0.01",
                 "--out", str(tmp_path / "recheck.md")]) == 0
    text = capsys.readouterr().out
    assert "## marginal p-values" in text and "## calibration-conditional p-values, eta = 0.01" in text
    assert "### Per-client alarms (delta = 0.001, calibration-conditional p-values at eta = 0.01)" in text
    assert text.count("| combination + stream test |") == 2 and (tmp_path / "recheck.md").read_text().strip() == text.strip()
    assert main(["--config", str(TINY), "--bench-dir", str(out), "--calibration-conditional", "none",
                 "--stream-pool-size", "none,7"]) == 0
    assert "## marginal p-values; stream test on images pooled to 7x7" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--config", str(TINY), "--bench-dir", str(out), "--stream-pool-size", "0"])
    with pytest.raises(SystemExit):
        main(["--config", str(TINY), "--bench-dir", str(out), "--calibration-conditional", "1.5"])
