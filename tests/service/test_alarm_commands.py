"""``sameguard alarms calibrate`` end to end on tiny artifacts, and ``serve --alarms`` loading them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli import run
from sameguard.alarm_commands import ALARM_SOURCES_FILE
from sameguard.alarms import ALARMS_FILE
from sameguard.detectors import MahalanobisDetector, VarDetectDetector
from sameguard.detectors.registry import fit_detector


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, fmnist_small, kit) -> Path:
    """A saved tiny victim, two calibrated Mahalanobis detectors, a VarDetect, and benign images (.npy)."""
    root = tmp_path_factory.mktemp("alarm-cli")
    train, test = fmnist_small
    victim = kit.make_victim()
    victim.save(root / "victim")
    for name, seed in (("maha-a", 0), ("maha-b", 1)):
        detector = fit_detector(MahalanobisDetector(seed=seed), victim, train.take(300, seed=seed))
        detector.calibrate(test.images[:200], 0.05)
        detector.save(root / name)
    fit_detector(VarDetectDetector(epochs=1, window_size=20), victim, train.take(300, seed=2)).save(root / "vardetect")
    np.save(root / "benign.npy", test.images[200:800].numpy())
    return root


def test_alarms_calibrate_writes_alarms_that_serve_loads(artifacts, tmp_path):
    out = tmp_path / "alarms"
    code, text = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector",
                     str(artifacts / "maha-a"), "--images", str(artifacts / "benign.npy"), "--out", str(out),
                     "--delta", "0.01", "--mode", "cusum", "--min-class-size", "20")
    assert code == 0
    assert text.count("\n") == 1 and "alarms for mahalanobis calibrated on 600 benign images" in text
    assert json.loads((out / ALARMS_FILE).read_text())["scorers"] == ["mahalanobis"]
    sources = json.loads((out / ALARM_SOURCES_FILE).read_text())["scorers"]
    assert sources == {"mahalanobis": str((artifacts / "maha-a").resolve())}

    from sameguard.service.loading import load_guard
    from sameguard.service.settings import ServiceSettings

    guard = load_guard(ServiceSettings(victim=artifacts / "victim", detector=artifacts / "maha-a", policy="reject",
                                       alarms=out))
    assert guard.alarms is not None
    assert guard.alarms.describe() | {"threshold_log10": 2.0} == {
        "delta": 0.01, "scorers": ["mahalanobis"], "stream": False, "mode": "cusum", "threshold_log10": 2.0,
        "calibration_conditional": None}
    assert guard.alarms.scorers["mahalanobis"] is guard.detector  # scored once per batch
    verdict = guard.protect(torch.zeros(2, 1, 28, 28), "alice")
    assert all(d.evidence is not None for d in verdict.decisions)


def test_two_detectors_of_one_kind_are_named_by_folder_and_folders_can_be_overridden(artifacts, tmp_path):
    out = tmp_path / "alarms"
    code, text = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector",
                     str(artifacts / "maha-a"), "--detector", str(artifacts / "maha-b"), "--images",
                     str(artifacts / "benign.npy"), "--out", str(out), "--stream")
    assert code == 0 and "maha-a, maha-b" in text and "stream test on" in text
    (out / ALARM_SOURCES_FILE).unlink()  # moved artifacts: the folders must be named at start-up

    from sameguard.service.loading import load_guard
    from sameguard.service.settings import ServiceSettings

    settings = ServiceSettings(victim=artifacts / "victim", detector=artifacts / "maha-a", alarms=out)
    with pytest.raises(ValueError, match="--alarm-detector NAME=DIR"):
        load_guard(settings)
    settings = ServiceSettings.from_env({"SAMEGUARD_ALARM_DETECTORS": f"maha-a={artifacts / 'maha-a'},"
                                                                      f"maha-b={artifacts / 'maha-b'}"},
                                        victim=artifacts / "victim", detector=artifacts / "maha-a", alarms=out)
    guard = load_guard(settings)
    assert sorted(guard.alarms.scorers) == ["maha-a", "maha-b"]
    assert guard.alarms.describe()["stream"] is True


def test_alarms_calibrate_stream_pool_size_is_saved_and_served(artifacts, tmp_path, capsys):
    out = tmp_path / "alarms"
    code, text = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector",
                     str(artifacts / "maha-a"), "--images", str(artifacts / "benign.npy"), "--out", str(out),
                     "--min-class-size", "20", "--stream", "--stream-pool-size", "7")
    assert code == 0 and "stream test on" in text

    from sameguard.service.loading import load_guard
    from sameguard.service.settings import ServiceSettings

    guard = load_guard(ServiceSettings(victim=artifacts / "victim", detector=artifacts / "maha-a", alarms=out))
    assert guard.alarms.monitor.stream.pool_size == 7
    code, text = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector",
                     str(artifacts / "maha-a"), "--images", str(artifacts / "benign.npy"), "--out", str(out),
                     "--stream-pool-size", "7")
    assert code != 0 and "add --stream" in capsys.readouterr().err
    for given, expected in (([], 14), (["--stream-pool-size", "none"], None)):  # the default; every pixel
        code, _ = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector",
                      str(artifacts / "maha-a"), "--images", str(artifacts / "benign.npy"), "--out", str(out),
                      "--min-class-size", "20", "--stream", *given)
        assert code == 0
        guard = load_guard(ServiceSettings(victim=artifacts / "victim", detector=artifacts / "maha-a", alarms=out))
        assert guard.alarms.monitor.stream.pool_size == expected
    with pytest.raises(SystemExit):
        run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector", str(artifacts / "maha-a"),
            "--images", str(artifacts / "benign.npy"), "--out", str(out), "--stream", "--stream-pool-size", "0")
    assert "at least 1" in capsys.readouterr().err


def test_alarms_calibrate_stream_window_is_saved_and_served(artifacts, tmp_path, capsys):
    from sameguard.service.loading import load_guard
    from sameguard.service.settings import ServiceSettings

    out = tmp_path / "alarms"
    base = ("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector", str(artifacts / "maha-a"),
            "--images", str(artifacts / "benign.npy"), "--out", str(out), "--min-class-size", "20")
    for given, expected in (([], 1000), (["--stream-window", "300"], 300)):  # the default; a chosen one
        code, _ = run(*base, "--stream", *given)
        assert code == 0
        guard = load_guard(ServiceSettings(victim=artifacts / "victim", detector=artifacts / "maha-a", alarms=out))
        assert guard.alarms.monitor.stream.window == expected
    code, _ = run(*base, "--stream-window", "300")
    assert code != 0 and "add --stream" in capsys.readouterr().err
    code, _ = run(*base, "--stream", "--stream-window", "1")
    assert code != 0 and "--stream-window" in capsys.readouterr().err


def test_alarms_calibrate_calibration_conditional_is_saved_and_served(artifacts, tmp_path):
    out = tmp_path / "alarms"
    code, text = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), "--detector",
                     str(artifacts / "maha-a"), "--images", str(artifacts / "benign.npy"), "--out", str(out),
                     "--min-class-size", "20", "--calibration-conditional", "0.001")
    assert code == 0 and "calibration-conditional at eta 0.001" in text

    from sameguard.service.loading import load_guard
    from sameguard.service.settings import ServiceSettings

    guard = load_guard(ServiceSettings(victim=artifacts / "victim", detector=artifacts / "maha-a", alarms=out))
    assert guard.alarms.describe()["calibration_conditional"] == 0.001
    calibrator = guard.alarms.monitor.calibrators["mahalanobis"]
    # the most suspicious score gets 1/(m+1) plus its reference's margin, no less
    m = calibrator.reference(0).numel()
    p = calibrator.p_values(torch.full((1,), float("inf"), dtype=torch.float64), torch.tensor([0]))
    assert p.item() == pytest.approx(1 / (m + 1) + calibrator.margin(m), abs=1e-12) and calibrator.margin(m) > 0.05


@pytest.mark.parametrize("argv, message", [
    (["--detector", "{root}/vardetect"], "per-client detector"),
    (["--detector", "{root}/maha-a", "--delta", "1.5"], "--delta"),
    (["--detector", "{root}/missing"], "No artifact directory"),
    (["--detector", "{root}/maha-a", "--calibration-conditional", "0"], "--calibration-conditional"),
    (["--detector", "{root}/maha-a", "--calibration-conditional", "0.7"], "--calibration-conditional"),
])
def test_alarms_calibrate_errors_exit_2_with_one_sentence(artifacts, tmp_path, capsys, argv, message):
    argv = [a.format(root=artifacts) for a in argv]
    code, _ = run("alarms", "calibrate", "--victim", str(artifacts / "victim"), *argv, "--images",
                  str(artifacts / "benign.npy"), "--out", str(tmp_path / "alarms"))
    err = capsys.readouterr().err.strip()
    assert (code, message in err, err.count("\n")) == (2, True, 0), err
    assert not (tmp_path / "alarms").exists()


def test_serve_parser_takes_the_alarm_options():
    from sameguard.cli import build_parser
    from sameguard.service.commands import _alarm_detectors

    args = build_parser().parse_args(["serve", "--victim", "v", "--detector", "d", "--alarms", "a",
                                      "--alarm-detector", "same=d", "--admin-token-env", "SG_ADMIN"])
    assert (args.alarms, _alarm_detectors(args), args.admin_token_env) == ("a", {"same": "d"}, "SG_ADMIN")
    args = build_parser().parse_args(["serve", "--alarm-detector", "same"])
    with pytest.raises(ValueError, match="--alarm-detector: expected NAME=DIR"):
        _alarm_detectors(args)
