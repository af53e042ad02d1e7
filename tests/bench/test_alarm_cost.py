"""The standalone measurement of the per-client alarms' cost (``python -m sameguard.bench.alarm_cost``)."""

from __future__ import annotations

import logging

import pytest
import torch

from sameguard.bench import alarm_cost
from sameguard.guard import Guard


@pytest.fixture(scope="module")
def networks():
    logging.getLogger("sameguard.evidence.conformal").setLevel(logging.ERROR)
    return alarm_cost.build_networks(seed=0, fit_images=64)


def test_build_networks_has_the_standard_architectures_and_the_combination(networks):
    victim, scorers = networks
    assert (victim.arch, victim.image_shape, victim.num_classes) == ("conv3", (1, 28, 28), 10)
    assert list(scorers) == ["SAME", "SAME s2 only (alpha=0)", "MSP", "Energy"]
    same, s2 = scorers["SAME"], scorers["SAME s2 only (alpha=0)"]
    assert s2.alpha == 0.0 and s2.mae_ is same.mae_ and s2.aux_ is same.aux_  # shared networks
    assert same.mae_.config.emb_dim == 64 and same.mae_.config.patch_size == 4  # the cpu preset's "medium" MAE
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert all(torch.isfinite(torch.as_tensor(s.score(x))).all() for s in scorers.values())


def test_alarm_guard_is_the_benchmark_composition(networks):
    victim, scorers = networks
    cal = torch.rand(120, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    guard = alarm_cost.alarm_guard(victim, scorers, cal, delta=1e-3, stream=True, seed=0)
    assert isinstance(guard, Guard) and guard.detector is scorers["SAME"]
    assert guard.threshold == float("inf")  # no per-query action before the alarm
    assert guard.alarms.describe()["stream"] and sorted(guard.alarms.scorers) == sorted(scorers)
    verdict = guard.protect(cal[:2], "c")
    assert verdict.decisions[0].evidence is not None and not verdict.refused.any()


def test_alternate_median_ms_times_every_guard_on_every_query(networks):
    victim, scorers = networks
    calls: list[tuple[str, int]] = []

    class Counting(Guard):
        def protect(self, x, client="anonymous", **kw):
            calls.append((client, len(x)))
            return super().protect(x, client, **kw)

    guards = {"a": Counting(victim, scorers["MSP"], "monitor"), "b": Counting(victim, scorers["Energy"], "monitor")}
    ms = alarm_cost.alternate_median_ms(guards, torch.zeros(4, 1, 28, 28))
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert calls[:2] == [("warm-up", 1)] * 2 and calls[2:] == [("timing", 1)] * 8
    assert guards["a"].queries_used("timing") == 4
    calls.clear()
    timings = alarm_cost.alternate_timings(guards, torch.zeros(5, 1, 28, 28), client="batched", batch=2)
    assert calls[2:] == [("batched", 2)] * 4 + [("batched", 1)] * 2  # 2 + 2 + 1 images, the guards alternating
    assert all(len(t["wall"]) == len(t["cpu"]) == 3 for t in timings.values())


def test_measure_and_cli(capsys, monkeypatch, networks):
    monkeypatch.setattr(alarm_cost, "build_networks", lambda seed=0: networks)
    r = alarm_cost.measure(queries=3, client_history=5, calibration=60, profile=True)
    assert r["ms_guard"] > 0 and r["ratio"] == pytest.approx(r["ms_guard_with_alarms"] / r["ms_guard"])
    assert r["cpu_guard"] > 0 and r["cpu_ratio"] == pytest.approx(r["cpu_guard_with_alarms"] / r["cpu_guard"])
    assert "function calls" in r["profile"] and "tottime" in r["profile"]
    assert 0 < r["cpu_update"] < r["cpu_guard_with_alarms"]  # the alarms' update, timed inside the guard
    assert alarm_cost.main(["--queries", "2", "--client-history", "3", "--calibration", "60", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert "| SAME alone |" in out and "| ratio |" in out and "stream test off" in out and "median CPU ms" in out
    assert "inside the alarms' update" in out
    assert alarm_cost.main(["--queries", "2", "--batch", "3", "--client-history", "3", "--calibration", "60"]) == 0
    assert "calls of 3 images" in capsys.readouterr().out


def test_centred_history_and_mean_bag():
    assert alarm_cost.centred_history(1000, 500) == 250 and alarm_cost.centred_history(2000, 500) == 750
    assert alarm_cost.centred_history(1000, 1000) == 0 and alarm_cost.centred_history(100, 300) == 0
    assert alarm_cost.mean_bag(1000, 250, 500) == pytest.approx(499.5)  # bags 250..749
    assert alarm_cost.mean_bag(10, 8, 4) == pytest.approx((8 + 9 + 0 + 1) / 4)  # a new block after 10
    assert alarm_cost.mean_bag(1000, 0, 0) == 0.0


def test_stream_window_reaches_the_guard_and_the_history_default(capsys, monkeypatch, networks):
    monkeypatch.setattr(alarm_cost, "build_networks", lambda seed=0: networks)
    built = []
    original = alarm_cost.alarm_guard
    monkeypatch.setattr(alarm_cost, "alarm_guard", lambda *a, **k: built.append(g := original(*a, **k)) or g)
    r = alarm_cost.measure(queries=4, calibration=60, stream_window=20)
    assert built[0].alarms.monitor.stream.window == 20
    assert r["client_history"] == 8 and r["mean_bag"] == pytest.approx(9.5)  # bags 8..11 of blocks of 20
    assert alarm_cost.main(["--queries", "2", "--calibration", "60", "--stream-window", "10"]) == 0
    assert "client history 4;" in (out := capsys.readouterr().out) and "blocks of 10 queries, mean bag 4" in out


def test_free_scorers_skips_the_other_scorers_in_the_timed_queries(capsys, monkeypatch, networks):
    _, scorers = networks
    monkeypatch.setattr(alarm_cost, "build_networks", lambda seed=0: networks)
    calls = []
    energy = scorers["Energy"]
    monkeypatch.setattr(energy, "score_victim_outputs", lambda v, x, p: calls.append(len(x)) or torch.zeros(len(x)))
    alarm_cost.measure(queries=3, client_history=5, calibration=60)
    assert calls == [5, 1, 1, 1, 1]  # the history batch, the warm-up and the 3 timed queries: Energy scored each
    calls.clear()
    assert alarm_cost.main(["--queries", "3", "--client-history", "5", "--calibration", "60", "--free-scorers"]) == 0
    assert calls == [5]  # the history batch only: not the warm-up or the timed queries
    assert "not run (--free-scorers)" in capsys.readouterr().out


def test_bad_options_are_one_sentence_and_status_2():
    """Run as a script, a bad option is a usage error, not a traceback."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sameguard.bench.alarm_cost", "--threads", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--threads >= 1" in done.stderr and "Traceback" not in done.stderr
