"""Settings, the command-line wiring, and the service built from real saved artifacts (a tiny SAME)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from sameguard.actions import ProofOfWork
from sameguard.api import DatasetNotFoundError
from sameguard.service import ServiceSettings, create_app
from sameguard.service.commands import SERVICE_COMMANDS, add_service_commands
from sameguard.service.loading import load_guard


def test_service_settings_from_env_and_validation():
    s = ServiceSettings.from_env({"SAMEGUARD_POLICY": "reject", "SAMEGUARD_MAX_BATCH": "7",
                                  "SAMEGUARD_POW_SECRET": "ab" * 16}, port=9000, threshold=None)
    assert s.policy == "reject" and s.max_batch == 7 and s.port == 9000
    assert "abab" not in repr(s) and s.pow_secret.get_secret_value() == "ab" * 16
    with pytest.raises(ValueError, match="policy"):
        ServiceSettings.from_env({"SAMEGUARD_POLICY": "shout"})
    with pytest.raises(ValueError, match="pow_benign_bits"):
        ServiceSettings.from_env({}, pow_benign_bits=30, pow_max_bits=20)
    with pytest.raises(ValueError, match="16 bytes"):
        ServiceSettings.from_env({"SAMEGUARD_POW_SECRET": "short"})
    s = ServiceSettings.from_env({"SAMEGUARD_COMPILE": "true"})
    assert s.compile is True and s.compile_backend == "inductor" and not ServiceSettings().compile
    assert ServiceSettings.from_env(s.to_env()) == s  # what serve --workers hands its workers
    with pytest.raises(ValueError, match="compile_backend"):
        ServiceSettings.from_env({}, compile_backend="in ductor; rm")
    assert ServiceSettings().gc_freeze is True
    unfrozen = ServiceSettings.from_env({"SAMEGUARD_GC_FREEZE": "false"})
    assert unfrozen.gc_freeze is False and ServiceSettings.from_env(unfrozen.to_env()) == unfrozen


def test_service_commands_parse():
    parser = argparse.ArgumentParser(prog="sameguard")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = add_service_commands(sub)
    assert set(commands) == set(SERVICE_COMMANDS) == {"serve", "keys", "audit"}
    args = parser.parse_args(["serve", "--victim", "v", "--detector", "d", "--policy", "pow", "--db", "sqlite://",
                              "--port", "8123", "--rate", "5", "--burst", "50"])
    assert (args.policy, args.port, args.rate_per_second, args.rate_burst) == ("pow", 8123, 5.0, 50)
    assert args.compile is None and args.compile_backend is None  # unset: the environment's or the default
    args = parser.parse_args(["serve", "--compile", "--compile-backend", "aot_eager"])
    assert args.compile is True and args.compile_backend == "aot_eager"
    assert args.gc_freeze is None and parser.parse_args(["serve", "--no-gc-freeze"]).gc_freeze is False
    args = parser.parse_args(["keys", "create", "--name", "alice", "--db", "sqlite:///k.db"])
    assert (args.keys_command, args.name) == ("create", "alice")
    args = parser.parse_args(["audit", "--db", "sqlite:///k.db", "--json"])
    assert args.json


def test_service_load_guard_from_saved_same_artifacts(tmp_path, kit):
    from sameguard.data import load_dataset
    from sameguard.detectors import SAMEDetector

    try:
        data = load_dataset("fashion-mnist", "train").take(400, seed=0)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    fit_part, held_out = data.split_off(0.25, seed=0)
    victim = kit.make_victim()
    detector = SAMEDetector.from_preset("tiny", mae_epochs=1, aux_epochs=1, seed=0, progress=False)
    detector.fit(victim, fit_part).calibrate(held_out.images, 0.05)
    victim.save(tmp_path / "victim")
    detector.save(tmp_path / "same")
    np.save(tmp_path / "benign.npy", held_out.images.numpy())
    settings = ServiceSettings(victim=tmp_path / "victim", detector=tmp_path / "same", policy="pow",
                               db_url=f"sqlite:///{tmp_path / 'a.db'}", calibration=str(tmp_path / "benign.npy"),
                               calibration_limit=100, pow_benign_bits=3, pow_max_bits=10)
    guard = load_guard(settings)
    assert isinstance(guard.policy.action, ProofOfWork) and guard.policy.action.is_calibrated()
    assert guard.threshold == pytest.approx(detector.threshold_)
    assert guard.versions["detector"] == "SAMEDetector" and len(guard.versions["detector_sha256"]) == 64
    app = create_app(settings)
    _, token = app.state.sameguard.keys.create("alice")
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        r = client.post("/v1/predict", json={"instances": held_out.images[:2].tolist()})
        assert r.status_code in (200, 202), r.text
        assert client.get("/v1/pow/info").json()["calibration"]["benign"]["n"] == 100
    with pytest.raises(ValueError, match="needs a detector"):
        load_guard(ServiceSettings(victim=tmp_path / "victim", policy="reject"))
    off = load_guard(ServiceSettings(victim=tmp_path / "victim", policy="off"))
    assert off.detector is None and off.protect(held_out.images[:1], "a").decisions[0].score is None
    assert off.policy_name == off.versions["policy"] == "off"  # not "monitor": nothing is scored
    uncalibrated = SAMEDetector.load(tmp_path / "same", victim)
    uncalibrated.threshold_ = None
    uncalibrated.save(tmp_path / "same2")
    with pytest.raises(ValueError, match="not calibrated"):
        load_guard(ServiceSettings(victim=tmp_path / "victim", detector=tmp_path / "same2", policy="reject"))
    torch.testing.assert_close(guard.victim.predict_proba(held_out.images[:2]), victim.predict_proba(held_out.images[:2]))
    # serve --compile: the same guard, its networks compiled in place at load (warmed up), the same answers
    compiled = load_guard(settings.model_copy(update={"compile": True, "compile_backend": "eager"}))
    assert compiled.victim.model._compiled_call_impl is not None
    assert compiled.detector.aux_._compiled_call_impl is not None
    assert compiled.versions["detector_sha256"] == guard.versions["detector_sha256"]
    torch.testing.assert_close(compiled.detector.score(held_out.images[:3]), guard.detector.score(held_out.images[:3]))
