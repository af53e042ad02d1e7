"""``sameguard info DIR``: what a saved victim, detector or set of per-client alarms is, from its manifest.

:func:`describe_folder` reads the folder's ``manifest.json`` (or ``alarms.json``) without loading
any weights, recomputes the SHA-256 of every file the manifest lists (so a tampered file shows as
such), and returns a flat, JSON-ready description: kind, architecture, dataset, test accuracy,
training hyper-parameters, the detector's preset (when its parameters are exactly one preset's),
threshold and the FPR it was calibrated for, the victim's weights SHA-256, library versions.
:func:`format_info` prints it as ``key: value`` lines.

Authentication (:mod:`sameguard.artifact_auth`): :func:`authentication_status` says whether the
folder is authentic under the trust configured in the environment (``SAMEGUARD_ARTIFACT_KEY``,
``SAMEGUARD_ARTIFACT_DIGESTS``): its HMAC verifies, or its digest is pinned, or it is signed but no key
is set to check it, or it is neither; ``info`` also prints the folder's digest, the value to pin.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .api import ArtifactError
from .artifacts import MANIFEST, is_part_file, read_manifest, sha256_file

__all__ = ["authentication_status", "describe_folder", "format_info", "matching_preset"]


def authentication_status(directory: str | os.PathLike) -> str:
    """Whether the folder is authentic under the environment's trust, in words (never raises for a bad signature)."""
    from .api import IntegrityError
    from .artifact_auth import KEY_ENV, ArtifactTrust, authenticate_folder, read_signature

    root = Path(directory)
    try:
        how = authenticate_folder(root, ArtifactTrust.from_env(required=False))
    except (IntegrityError, ArtifactError) as exc:
        return f"NO: {exc}"
    if how == "hmac":
        return f"yes: its HMAC verifies under the key in {KEY_ENV}"
    if how == "pinned":
        return "yes: its digest is pinned (SAMEGUARD_ARTIFACT_DIGESTS)"
    signature = read_signature(root)  # authenticate_folder has already refused a malformed one
    if signature is not None:
        return f"signed (key id {signature['key_id']}), not checked here: set {KEY_ENV} to verify it"
    return "no: not signed (sameguard artifacts sign) and its digest is not pinned"


def matching_preset(kind: str, params: dict[str, Any]) -> str | None:
    """The name of the detector preset whose every value equals ``params``' (``None``: none does)."""
    from .detectors.registry import DETECTORS

    cls = next((c for c in DETECTORS.values() if getattr(c, "KIND", None) == kind), None)
    presets = getattr(cls, "PRESETS", None) or {}
    for name, values in presets.items():
        shared = [k for k in values if k in params]
        if shared and all(params[k] == values[k] for k in shared):
            return name
    return None


def _has_presets(kind: str) -> bool:
    from .detectors.registry import DETECTORS

    return any(getattr(c, "KIND", None) == kind and getattr(c, "PRESETS", None) for c in DETECTORS.values())


def _verify_files(root: Path, files: dict[str, str]) -> str:
    bad = [name for name, digest in files.items()  # a name outside the folder is never read (loading refuses it)
           if not is_part_file(name) or not (root / name).is_file() or sha256_file(root / name) != digest]
    if bad:
        return f"MODIFIED OR MISSING: {', '.join(sorted(bad))} (loading will refuse it)"
    return f"{len(files)} file(s), SHA-256 verified"


def _describe_alarms(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / "alarms.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{root / 'alarms.json'} is not readable JSON ({exc}).") from None
    info: dict[str, Any] = {"folder": str(root), "kind": "per-client alarms (sameguard alarms calibrate)",
                            "authenticated": authentication_status(root), "digest (to pin)": _digest(root)}
    if isinstance(data, dict):
        for key in ("delta", "mode", "stream", "scorers", "victim_weights_sha256", "min_class_size"):
            if key in data:
                info[key] = data[key]
    sources = root / "detectors.json"
    if sources.is_file():
        try:
            info["detector folders"] = json.loads(sources.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            info["detector folders"] = "unreadable detectors.json"
    return info


def describe_folder(directory: str | os.PathLike) -> dict[str, Any]:
    """What the artifact folder ``directory`` holds, as a flat dict (see the module docstring).

    Raises:
        ArtifactError: no such folder, or neither ``manifest.json`` nor ``alarms.json`` in it, or an
            unreadable manifest.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"No artifact folder at {root}.")
    path = root / MANIFEST
    if not path.is_file():
        if (root / "alarms.json").is_file():
            return _describe_alarms(root)
        raise ArtifactError(f"{root} is not a sameguard artifact: it holds neither {MANIFEST} nor alarms.json.")
    manifest = read_manifest(path)
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    kind = str(manifest.get("kind"))
    info: dict[str, Any] = {"folder": str(root), "kind": kind, "created": manifest.get("created")}
    if kind == "victim":
        for key in ("arch", "dataset", "image_shape", "test_accuracy", "normalisation", "training"):
            if config.get(key) is not None:
                info[key] = config[key]
        info["classes"] = len(config.get("classes", []))
        info["weights SHA-256"] = config.get("weights_sha256")
    else:
        params = config.get("params") if isinstance(config.get("params"), dict) else {}
        if _has_presets(kind):
            preset = matching_preset(kind, params)
            info["preset"] = preset if preset is not None else "none (parameters differ from every preset)"
        info["params"] = params
        threshold = config.get("threshold")
        info["threshold"] = threshold if threshold is not None else "not calibrated"
        if config.get("calibration_fpr") is not None:
            info["calibrated for FPR"] = config["calibration_fpr"]
        for key in ("aux_arch", "image_shape", "num_classes", "normalisation", "fit_seconds"):
            if config.get(key) is not None:
                info[key] = config[key]
        info["victim weights SHA-256"] = config.get("victim_weights_sha256")
    info["versions"] = manifest.get("versions")
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    info["files"] = _verify_files(root, files)
    info["authenticated"] = authentication_status(root)
    info["digest (to pin)"] = _digest(root)
    return info


def _digest(root: Path) -> str:
    from .artifact_auth import folder_digest

    return folder_digest(root)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else json.dumps(value)
    return "-" if value is None else str(value)


def format_info(info: dict[str, Any]) -> str:
    """``key: value`` lines of :func:`describe_folder`'s result."""
    width = max(len(k) for k in info)
    return "\n".join(f"{k + ':':<{width + 1}} {_text(v)}" for k, v in info.items())
