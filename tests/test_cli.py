"""The command line end to end on tiny settings: train-victim -> fit -> calibrate -> score, and errors."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest

from _cli import run
from sameguard.cli import COMMANDS, build_parser
from sameguard.data import to_uint8
from sameguard.detectors import DETECTORS
from sameguard.imagefiles import write_pngs


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    # One --seed everywhere but where seeds come from a config (bench: --seeds picks among them) or nothing trains.
    assert bool(re.search(r"--seed\b(?!s)", text)) == (command not in ("bench", "same-study", "info"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_small):
    root = tmp_path_factory.mktemp("cli")
    code, out = run("train-victim", "--dataset", "fashion-mnist", "--arch", "lenet5", "--epochs", "1",
                    "--max-train-samples", "600", "--out", str(root / "victim"), "--no-progress")
    assert code == 0 and "test accuracy" in out
    code, out = run("fit", "--victim", str(root / "victim"), "--preset", "tiny", "--max-train-samples", "600",
                    "--mae-epochs", "2", "--aux-epochs", "1", "--target-fpr", "0.05", "--out", str(root / "det"),
                    "--no-progress")
    assert code == 0 and "threshold" in out
    return root


def test_fit_writes_manifest_with_threshold(trained):
    manifest = json.loads((trained / "det" / "manifest.json").read_text())
    assert manifest["kind"] == "same-detector"
    assert manifest["config"]["calibration_fpr"] == 0.05
    assert manifest["config"]["threshold"] is not None


def test_calibrate_and_score_npy_and_png(trained, fmnist_small, tmp_path):
    _, test = fmnist_small
    benign = test.images[:200].numpy()
    np.save(tmp_path / "benign.npy", benign)
    code, out = run("calibrate", "--detector", str(trained / "det"), "--victim", str(trained / "victim"),
                    "--images", str(tmp_path / "benign.npy"), "--target-fpr", "0.1", "--no-progress")
    assert code == 0 and "flags" in out
    manifest = json.loads((trained / "det" / "manifest.json").read_text())
    assert manifest["config"]["calibration_fpr"] == 0.1

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "noise_u8.npy", noise)
    code, _ = run("score", "--detector", str(trained / "det"), "--victim", str(trained / "victim"),
                  "--images", str(tmp_path / "noise_u8.npy"), "--out", str(tmp_path / "s.csv"))
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 5 and set(rows[0]) == {"image", "score", "s1", "s2", "flagged"}

    write_pngs(test.images[:3], tmp_path / "pngs")
    code, out = run("score", "--detector", str(trained / "det"), "--victim", str(trained / "victim"),
                    "--images", str(tmp_path / "pngs"))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["image"] for r in rows] == ["img_00000.png", "img_00001.png", "img_00002.png"]
    # PNG round trip is exact for 8-bit images, so PNG and array scores agree.
    np.save(tmp_path / "same.npy", to_uint8(test.images[:3])[..., 0])
    _, out2 = run("score", "--detector", str(trained / "det"), "--victim", str(trained / "victim"),
                  "--images", str(tmp_path / "same.npy"))
    from_png = [float(r["score"]) for r in rows]
    from_npy = [float(r["score"]) for r in csv.DictReader(io.StringIO(out2))]
    assert from_npy == pytest.approx(from_png, rel=1e-5, abs=1e-7)


# Every saveable detector kind through fit -> calibrate -> score, on tiny budgets.
OTHER_KINDS = [
    ("mahalanobis", ["--max-train-samples", "600"]),
    ("same-conv-ae", ["--preset", "tiny", "--param", "ae_epochs=1", "--aux-epochs", "1", "--max-train-samples", "600"]),
    ("vardetect", ["--param", "epochs=1", "--param", "window_size=20", "--max-train-samples", "600"]),
]


@pytest.mark.parametrize("kind, extra", OTHER_KINDS, ids=[k for k, _ in OTHER_KINDS])
def test_fit_calibrate_score_any_saveable_kind(trained, tmp_path, kind, extra):
    det = tmp_path / kind
    code, out = run("fit", "--victim", str(trained / "victim"), "--detector-kind", kind, *extra, "--holdout", "0.05",
                    "--target-fpr", "0.05", "--out", str(det), "--no-progress")
    assert code == 0
    assert "threshold" in out
    manifest = json.loads((det / "manifest.json").read_text())
    assert manifest["kind"] == DETECTORS[kind].KIND
    assert manifest["config"]["calibration_fpr"] == 0.05

    rng = np.random.default_rng(1)
    np.save(tmp_path / "noise.npy", rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8))
    code, out = run("calibrate", "--detector", str(det), "--victim", str(trained / "victim"),
                    "--images", str(tmp_path / "noise.npy"), "--target-fpr", "0.1", "--no-progress")
    assert code == 0
    assert json.loads((det / "manifest.json").read_text())["config"]["calibration_fpr"] == 0.1
    code, out = run("score", "--detector", str(det), "--victim", str(trained / "victim"),
                    "--images", str(tmp_path / "noise.npy"))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 40
    expected = ["image", "score", "s1", "s2", "flagged"] if kind == "same-conv-ae" else ["image", "score", "flagged"]
    assert list(rows[0]) == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--detector-kind", "prada"], "cannot be saved"),
        (["--detector-kind", "nope"], "Unknown detector 'nope'"),
        (["--detector-kind", "mahalanobis", "--mae-epochs", "2"], "has no parameter mae_epochs"),
        (["--detector-kind", "mahalanobis", "--preset", "tiny"], "Unknown preset 'tiny'"),
        (["--param", "alpha"], "NAME=VALUE"),
        (["--detector-kind", "outlier-exposure"], "needs outlier data"),
        (["--holdout", "1.5"], "--holdout"),
    ],
)
def test_fit_errors_exit_2_with_one_sentence(trained, tmp_path, capsys, argv, message):
    code, _ = run("fit", "--victim", str(trained / "victim"), *argv, "--out", str(tmp_path / "d"), "--no-progress")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert err.count("\n") == 0


def test_score_errors_exit_2_with_message(trained, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 32, 32), dtype=np.float32))
    code, _ = run("score", "--detector", str(trained / "det"), "--victim", str(trained / "victim"),
                  "--images", str(tmp_path / "bad.npy"))
    assert code == 2
    assert "(N, 1, 28, 28)" in capsys.readouterr().err
    code, _ = run("score", "--detector", str(tmp_path / "missing"), "--victim", str(trained / "victim"),
                  "--images", str(tmp_path / "bad.npy"))
    assert code == 2
    assert "No artifact directory" in capsys.readouterr().err


def test_pickled_npy_is_refused(trained, tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _ = run("score", "--detector", str(trained / "det"), "--victim", str(trained / "victim"),
                  "--images", str(tmp_path / "obj.npy"))
    assert code == 2
    assert "pickle" in capsys.readouterr().err


def test_demo_runs_end_to_end_on_tiny_settings(tmp_path, fmnist_small):
    code, out = run("demo", "--workdir", str(tmp_path / "demo"), "--preset", "tiny", "--victim-epochs", "1",
                    "--train-samples", "1500", "--queries", "200", "--no-progress")
    assert code == 0
    assert "uniform noise" in out and "sklearn digits" in out and "AUROC" in out
    # A second run reuses the cached victim and detector and prints the same table.
    code, again = run("demo", "--workdir", str(tmp_path / "demo"), "--preset", "tiny", "--victim-epochs", "1",
                      "--train-samples", "1500", "--queries", "200", "--no-progress")
    strip = lambda text: [line for line in text.splitlines() if "fitted in" not in line and "ms per query" not in line]
    assert strip(again) == strip(out)


def test_attack_behind_detector_saves_scores(trained, tmp_path):
    code, out = run("attack", "jbda", "--victim", str(trained / "victim"), "--detector", str(trained / "det"),
                    "--budget", "60", "--epochs", "1", "--scores-out", str(tmp_path / "q.csv"), "--no-progress")
    assert code == 0
    assert "60/60 queries" in out and "fidelity" in out and "above the threshold" in out
    rows = list(csv.DictReader(open(tmp_path / "q.csv")))
    assert len(rows) == 60 and all(float(r["score"]) >= 0 for r in rows)


def test_attack_needing_probabilities_refuses_labels(trained, capsys):
    code, _ = run("attack", "dfme", "--victim", str(trained / "victim"), "--budget", "50", "--output", "labels",
                  "--no-progress")
    assert code == 2
    assert "probabilit" in capsys.readouterr().err


def test_bench_attacks_prints_table(trained):
    code, out = run("bench-attacks", "--victim", str(trained / "victim"), "--attacks", "knockoff,jbda",
                    "--budgets", "40", "--no-progress")
    assert code == 0
    assert "| knockoff |" in out and "| jbda |" in out
