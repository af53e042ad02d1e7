"""``sameguard info DIR``: a saved victim, a detector, tampering, and folders that are not artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from _cli import run
from sameguard.artifact_info import authentication_status, describe_folder, matching_preset
from sameguard.detectors import SAME_PRESETS, MSPDetector
from sameguard.models import build_classifier
from sameguard.victim import Victim


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="fashion-mnist",
                    image_shape=(1, 28, 28), classes=[str(i) for i in range(10)], test_accuracy=0.75)
    victim.save(tmp_path / "victim")
    detector = MSPDetector().fit(victim)
    detector.calibrate(torch.rand(40, 1, 28, 28) * 2 - 1, 0.05)
    detector.save(tmp_path / "msp")
    return tmp_path, victim, detector


def test_info_of_a_victim_and_a_detector(saved):
    root, victim, detector = saved
    code, out = run("info", str(root / "victim"), str(root / "msp"))
    assert code == 0
    out = " ".join(out.split())  # the values are aligned in columns
    assert "kind:" in out and "victim" in out and "lenet5" in out and "0.75" in out
    assert victim.weights_sha256 in out
    assert "msp-detector" in out and f"{detector.threshold_:.6g}" in out and "calibrated for FPR: 0.05" in out
    assert "SHA-256 verified" in out and "authenticated:" in out
    code, out = run("info", "--json", str(root / "msp"))
    info = json.loads(out)[0]
    assert info["victim weights SHA-256"] == victim.weights_sha256
    assert info["threshold"] == pytest.approx(detector.threshold_)


def test_info_shows_a_modified_file(saved):
    root, _, _ = saved
    weights = root / "victim" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "MODIFIED OR MISSING: model.safetensors" in describe_folder(root / "victim")["files"]


def test_info_never_hashes_a_file_outside_the_folder(saved):
    """A manifest may list only .safetensors files in the folder (as loading requires); info reports others."""
    root, _, _ = saved
    (root / "outside.safetensors").write_bytes(b"x")
    manifest_path = root / "victim" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from sameguard.artifacts import sha256_file

    manifest["files"] = {"../outside.safetensors": sha256_file(root / "outside.safetensors")}
    manifest_path.write_text(json.dumps(manifest))
    assert "MODIFIED OR MISSING: ../outside.safetensors" in describe_folder(root / "victim")["files"]


def test_info_of_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    code, _ = run("info", str(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "is not a sameguard artifact" in err


def test_preset_matching():
    assert matching_preset("same-detector", dict(SAME_PRESETS["tiny"], alpha=0.99)) == "tiny"
    assert matching_preset("same-detector", dict(SAME_PRESETS["tiny"], mae_epochs=99)) is None


def test_authentication_status(saved, monkeypatch):
    from sameguard.artifact_auth import DIGESTS_ENV, KEY_ENV, folder_digest, sign_folder

    root, _, _ = saved
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(DIGESTS_ENV, raising=False)
    assert authentication_status(root / "victim").startswith("no: not signed")
    key = "k" * 32
    sign_folder(root / "victim", key.encode())
    assert authentication_status(root / "victim").startswith("signed (key id")
    monkeypatch.setenv(KEY_ENV, key)
    assert authentication_status(root / "victim").startswith("yes: its HMAC verifies")
    info = describe_folder(root / "victim")
    assert info["digest (to pin)"] == folder_digest(root / "victim")
    manifest = root / "victim" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"test_accuracy": 0.75', '"test_accuracy": 0.99'))
    assert authentication_status(root / "victim").startswith("NO:")
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(DIGESTS_ENV, folder_digest(root / "msp"))
    assert authentication_status(root / "msp").startswith("yes: its digest is pinned")
