"""What the training commands report: the victim's manifest (hyper-parameters, normalisation), the real
training subset of ``fit``, progress lines when not on a terminal, the GPU-preset warning, and the
warning before ``train-victim`` overwrites a victim that detectors were fitted for."""

from __future__ import annotations

import json
import logging

import pytest

from _cli import run
from sameguard.cli import main
from sameguard.cli_training import detectors_fitted_for, training_subset_note, warn_if_gpu_preset_on_cpu
from sameguard.detectors import SAMEDetector
from sameguard.victim import Victim


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    code, _ = run("train-victim", "--dataset", "digits", "--arch", "lenet5", "--epochs", "1", "--lr", "0.05",
                  "--max-train-samples", "200", "--seed", "3", "--out", str(root / "victim"), "--no-progress")
    assert code == 0
    return root / "victim"


def test_victim_manifest_carries_hyper_parameters_and_normalisation(victim_dir):
    config = json.loads((victim_dir / "manifest.json").read_text())["config"]
    assert config["normalisation"] == "x = 2 * pixel / 255 - 1, values in [-1, 1]"
    training = config["training"]
    assert training["epochs"] == 1 and training["lr"] == 0.05 and training["seed"] == 3
    assert training["batch_size"] == 128 and training["train_images"] == 200
    assert Victim.load(victim_dir).training == training


def test_fit_reports_the_real_training_subset(victim_dir, tmp_path):
    code, out = run("fit", "--victim", str(victim_dir), "--dataset", "digits", "--preset", "tiny",
                    "--mae-epochs", "1", "--aux-epochs", "1", "--max-train-samples", "300",
                    "--out", str(tmp_path / "same"), "--no-progress")
    assert code == 0
    assert "fitted on 1294 images (its networks trained on a random 300 of them" in out
    assert training_subset_note(SAMEDetector.from_preset("tiny"), 1000) == ""  # 2000 >= 1000: no subset
    assert training_subset_note(SAMEDetector.from_preset("tiny"), 54000).endswith("random 2000 of them: max_train_samples)")


def test_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    code, _ = run("train-victim", "--dataset", "digits", "--arch", "lenet5", "--epochs", "2",
                  "--max-train-samples", "100", "--out", str(tmp_path / "v"), "--no-progress")
    err = capsys.readouterr().err
    assert code == 0
    assert "epoch 1/2" in err and "epoch 2/2" in err
    assert logging.getLogger("sameguard.training").level == logging.INFO
    main(["info", str(tmp_path / "v")])  # the next command starts from the default levels again
    assert logging.getLogger("sameguard.training").level == logging.NOTSET


def test_paper_preset_on_cpu_warns(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="sameguard.cli"):
        assert warn_if_gpu_preset_on_cpu("paper", "cpu")
        assert not warn_if_gpu_preset_on_cpu("cpu", "cpu")
    assert "sized for a GPU" in caplog.text
    code, _ = run("fit", "--victim", str(tmp_path / "missing"), "--preset", "paper", "--out", str(tmp_path / "d"))
    err = capsys.readouterr().err
    assert code == 2 and "sized for a GPU" in err and "No artifact directory" in err


def test_overwriting_a_victim_names_its_detectors(victim_dir, tmp_path, capsys):
    code, _ = run("fit", "--victim", str(victim_dir), "--dataset", "digits", "--detector-kind", "msp",
                  "--out", str(victim_dir.parent / "msp"))
    assert code == 0
    sha = Victim.load(victim_dir).weights_sha256
    assert detectors_fitted_for(sha, victim_dir) == [(victim_dir.parent / "msp").resolve()]
    capsys.readouterr()
    code, _ = run("train-victim", "--dataset", "digits", "--arch", "lenet5", "--epochs", "1", "--max-train-samples",
                  "100", "--seed", "4", "--out", str(victim_dir), "--no-progress")
    err = capsys.readouterr().err
    assert code == 0
    assert "already holds a victim" in err and str((victim_dir.parent / "msp").resolve()) in err
