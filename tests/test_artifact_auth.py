"""Authenticated artifacts (issue 12, finding 3): the manifest and every file, under a key or a pinned digest.

The SHA-256 hashes in a manifest detect corruption only: setting a SAME detector's ``threshold`` to
1e9 in ``manifest.json``, or changing a weight file and its hash, loaded silently. A folder signed
with the operator's key (or pinned by digest) is refused after either change, and with
authentication required an unsigned folder is refused by the library, the CLI and the service.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from sameguard.api import ArtifactError, IntegrityError
from sameguard.artifact_auth import (AUTH_FILE, DIGESTS_ENV, KEY_ENV, REQUIRE_ENV, ArtifactTrust, authenticate_folder,
                                     folder_digest, sign_folder, trusting)
from sameguard.artifacts import sha256_file
from sameguard.cli import main
from sameguard.detectors.registry import load_detector
from sameguard.victim import Victim

KEY = "k" * 32


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (KEY_ENV, DIGESTS_ENV, REQUIRE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def saved(tiny_victim, tiny_same, tmp_path, monkeypatch):
    """The tiny victim and SAME detector saved while the artifact key is set (so both are signed)."""
    monkeypatch.setenv(KEY_ENV, KEY)
    tiny_victim.save(tmp_path / "victim")
    tiny_same.save(tmp_path / "det")
    return tmp_path


def _set_threshold(folder, value: float) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["threshold"] = value
    path.write_text(json.dumps(manifest))


def _swap_weights(folder, part: str) -> None:
    """Change a weight file and put its new hash in the manifest: the hashes alone no longer notice."""
    path = folder / f"{part}.safetensors"
    state = safetensors.torch.load_file(str(path))
    first = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[first] = state[first] + 0.5
    safetensors.torch.save_file(state, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][path.name] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_save_signs_when_the_key_is_set_and_the_signed_folder_loads(saved, tiny_same):
    assert (saved / "det" / AUTH_FILE).is_file() and (saved / "victim" / AUTH_FILE).is_file()
    assert KEY not in (saved / "det" / AUTH_FILE).read_text()
    victim = Victim.load(saved / "victim")
    det = load_detector(saved / "det", victim)
    assert det.threshold_ == pytest.approx(tiny_same.threshold_)
    assert authenticate_folder(saved / "det") == "hmac"


def test_edited_manifest_threshold_is_refused(saved):
    victim = Victim.load(saved / "victim")
    _set_threshold(saved / "det", 1e9)
    with pytest.raises(IntegrityError, match="changed after it was signed"):
        load_detector(saved / "det", victim)


def test_changed_weights_with_updated_hash_are_refused(saved):
    _swap_weights(saved / "victim", "model")
    with pytest.raises(IntegrityError, match="changed after it was signed"):
        Victim.load(saved / "victim")


def test_a_file_added_or_removed_or_another_key_is_refused(saved, monkeypatch):
    (saved / "victim" / "extra.json").write_text("{}")
    with pytest.raises(IntegrityError):
        authenticate_folder(saved / "victim")
    (saved / "victim" / "extra.json").unlink()
    assert authenticate_folder(saved / "victim") == "hmac"
    monkeypatch.setenv(KEY_ENV, "z" * 32)
    with pytest.raises(IntegrityError, match="another key"):
        Victim.load(saved / "victim")


@pytest.mark.parametrize("field,value", [("key_id", "\u00e9" * 16), ("hmac", "\u00e9" * 64), ("hmac", "ab"),
                                         ("key_id", 7)])
def test_a_malformed_signature_is_refused_as_such(saved, field, value):
    """Not hex (hmac.compare_digest raises TypeError on non-ASCII text) or of the wrong length: IntegrityError."""
    path = saved / "victim" / AUTH_FILE
    body = json.loads(path.read_text())
    body[field] = value
    path.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="is not a sameguard-folder-hmac-sha256-v1 signature"):
        authenticate_folder(saved / "victim")


def test_unsigned_folders_load_unless_authentication_is_required(tiny_victim, tmp_path, monkeypatch):
    tiny_victim.save(tmp_path / "victim")
    assert not (tmp_path / "victim" / AUTH_FILE).exists()
    Victim.load(tmp_path / "victim")  # as before: hashes checked, nothing authenticated
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(ArtifactError, match="not authenticated"):
        Victim.load(tmp_path / "victim")
    with trusting(ArtifactTrust(required=False)):
        Victim.load(tmp_path / "victim")


def test_pinning_requires_authentication_of_every_folder(saved):
    """An operator who pins a digest is refused an edited, unsigned folder without also asking for it."""
    pinned = ArtifactTrust(pinned=frozenset({folder_digest(saved / "det")}))
    assert pinned.required
    assert authenticate_folder(saved / "det", pinned) == "pinned"
    _set_threshold(saved / "det", 1e9)
    with pytest.raises((ArtifactError, IntegrityError)):
        authenticate_folder(saved / "det", pinned)


def test_a_pinned_digest_authenticates_that_content_only(tiny_victim, tmp_path):
    tiny_victim.save(tmp_path / "victim")
    digest = folder_digest(tmp_path / "victim")
    with trusting(ArtifactTrust(pinned=frozenset({digest}), required=True)):
        Victim.load(tmp_path / "victim")
        _swap_weights(tmp_path / "victim", "model")
        with pytest.raises(ArtifactError, match="not authenticated"):
            Victim.load(tmp_path / "victim")


def test_resaving_without_the_key_drops_the_stale_signature(saved, tiny_victim, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    tiny_victim.save(saved / "victim")
    assert not (saved / "victim" / AUTH_FILE).exists()


def test_trust_validates_its_key_and_digests():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ArtifactTrust(key=b"short")
    with pytest.raises(ValueError, match="64 hex"):
        ArtifactTrust(pinned=frozenset({"abc"}))
    assert KEY not in repr(ArtifactTrust(key=KEY.encode()))


def test_cli_refuses_unauthenticated_artifacts_when_told_to(tiny_victim, tiny_same, tmp_path, monkeypatch, capsys):
    import numpy as np

    tiny_victim.save(tmp_path / "victim")
    tiny_same.save(tmp_path / "det")
    np.save(tmp_path / "x.npy", (torch.zeros(2, 1, 28, 28) - 0.5).numpy())
    score = ["score", "--detector", str(tmp_path / "det"), "--victim", str(tmp_path / "victim"),
             "--images", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.csv")]
    assert main(score) == 0
    assert main(["--require-authenticated-artifacts", *score]) == 2
    assert "not authenticated" in capsys.readouterr().err
    monkeypatch.setenv(KEY_ENV, KEY)
    assert main(["artifacts", "sign", str(tmp_path / "victim"), str(tmp_path / "det")]) == 0
    assert main(["--require-authenticated-artifacts", *score]) == 0
    assert main(["artifacts", "verify", "--require", str(tmp_path / "det")]) == 0
    _set_threshold(tmp_path / "det", 1e9)
    assert main(["artifacts", "verify", str(tmp_path / "det")]) == 2
    assert main(score) == 2  # a signature that no longer verifies is refused even when not required
    capsys.readouterr()
    assert main(["artifacts", "digest", str(tmp_path / "victim")]) == 0
    assert capsys.readouterr().out.split()[0] == folder_digest(tmp_path / "victim")


def test_service_refuses_to_start_on_a_tampered_or_unauthenticated_artifact(saved, monkeypatch):
    pytest.importorskip("fastapi")
    from sameguard.service import ServiceSettings, create_app

    def settings(**kw):
        return ServiceSettings(victim=saved / "victim", detector=saved / "det", policy="reject",
                               db_url=f"sqlite:///{saved / 'a.db'}", **kw)

    monkeypatch.delenv(KEY_ENV)
    create_app(settings())  # signed but no key configured: starts (with a warning), as before
    with pytest.raises(ArtifactError, match="no key is configured"):
        create_app(settings(require_authenticated_artifacts=True))
    app = create_app(settings(require_authenticated_artifacts=True, artifact_key=KEY))
    assert app.state.sameguard.guard.threshold is not None
    _set_threshold(saved / "det", 1e9)  # the tampering: serve used to start and refuse nothing
    with pytest.raises(IntegrityError):
        create_app(settings(artifact_key=KEY))
    pinned = ",".join([folder_digest(saved / "victim"), folder_digest(saved / "det")])
    create_app(settings(require_authenticated_artifacts=True, artifact_digests=pinned))  # the operator pins it


def test_a_signed_parent_folder_covers_the_artifacts_under_it(tiny_victim, tmp_path):
    """The alarms folder: alarms.json next to calibration artifacts, signed once as a whole."""
    root = tmp_path / "alarms"
    tiny_victim.save(root / "calibration")
    (root / "alarms.json").write_text('{"delta": 0.001}')
    key = KEY.encode()
    sign_folder(root, key)
    with trusting(ArtifactTrust(key=key, required=True)):
        assert authenticate_folder(root) == "hmac"
        assert authenticate_folder(root / "calibration") == "covered"
    with pytest.raises(ArtifactError, match="not authenticated"):  # on its own, the sub-folder is unsigned
        authenticate_folder(root / "calibration", ArtifactTrust(key=key, required=True))
    (root / "alarms.json").write_text('{"delta": 1e-300}')  # e.g. alarms made impossible
    with pytest.raises(IntegrityError):
        authenticate_folder(root, ArtifactTrust(key=key))


def test_a_pin_refuses_an_older_signed_version_only_without_the_key(saved, monkeypatch):
    """What the README promises of a pin against a rollback, and where that promise ends."""
    old = folder_digest(saved / "victim")
    _set_threshold(saved / "victim", 0.5)  # stands in for a newer version: re-signed, then pinned
    sign_folder(saved / "victim", KEY.encode())
    new = folder_digest(saved / "victim")
    assert new != old
    # the older version again, with its own valid signature: rolled back by whoever can write the folder
    manifest = json.loads((saved / "victim" / "manifest.json").read_text())
    manifest["config"].pop("threshold")
    (saved / "victim" / "manifest.json").write_text(json.dumps(manifest))
    sign_folder(saved / "victim", KEY.encode())
    assert folder_digest(saved / "victim") not in (new, old)  # json.dumps re-formats it: another signed version
    with pytest.raises(ArtifactError, match="not authenticated"):
        authenticate_folder(saved / "victim", ArtifactTrust(pinned=frozenset({new}), required=True))
    with pytest.raises(ArtifactError, match="not authenticated"):  # a pin turns the requirement on
        authenticate_folder(saved / "victim", ArtifactTrust(pinned=frozenset({new})))
    assert authenticate_folder(saved / "victim", ArtifactTrust(key=KEY.encode(), pinned=frozenset({new}),
                                                                required=True)) == "hmac"
