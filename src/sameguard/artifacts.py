"""Saving and loading fitted parts: safetensors weights plus a JSON manifest; never a pickle.

An artifact is a directory::

    manifest.json          kind, format version, versions, hyper-parameters, SHA-256 of every file
    <part>.safetensors     one state dict per network (e.g. ``mae``, ``aux``, ``model``)

Loading checks the manifest's ``kind``, recomputes the SHA-256 of every file it lists and refuses
the artifact if one differs (:class:`~sameguard.api.IntegrityError`), if a listed file is not a
``.safetensors`` file, or if the directory holds pickle-based checkpoints (``.pt``, ``.pth``,
``.pkl``, ``.ckpt``...). Weights are read with :func:`safetensors.torch.load_file`, which cannot
run code.

The hashes detect corruption, not tampering. *Authentication* (an HMAC with the operator's key over
the manifest and every file, or a digest the operator pins) is :mod:`sameguard.artifact_auth`:
:func:`load_artifact` checks it first (and refuses an unauthenticated folder when that is required),
and :func:`save_artifact` signs the folder when ``SAMEGUARD_ARTIFACT_KEY`` is set.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from . import __version__
from .api import ArtifactError, IntegrityError
from .artifact_auth import AUTH_FILE, authenticate_folder, current_trust, sha256_file, sign_folder

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "MANIFEST", "sha256_file", "save_artifact", "load_artifact", "read_manifest",
           "is_part_file", "state_dict_sha256", "fitted_state_sha256"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".joblib"}


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, dtypes, shapes and values (independent of file layout)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def fitted_networks(obj: object) -> dict[str, torch.nn.Module]:
    """``obj``'s fitted networks, attribute name -> module, in name order: the attributes ending in
    ``_`` (the fitted-state convention of the detectors) that are :class:`torch.nn.Module`."""
    names = sorted(vars(obj)) if hasattr(obj, "__dict__") else []
    return {name: value for name in names
            if name.endswith("_") and isinstance(value := getattr(obj, name), torch.nn.Module)}


def fitted_state_sha256(obj: object) -> str | None:
    """SHA-256 over the state dicts of ``obj``'s fitted networks (:func:`fitted_networks`).

    Identifies a fitted detector by its weights (e.g. for the guard's version record and to tie a
    calibration to the detector it was made for); ``None`` when ``obj`` holds no fitted network
    (MSP, Energy: they are defined by the victim alone).
    """
    networks = fitted_networks(obj)
    if not networks:
        return None
    digest = hashlib.sha256(type(obj).__name__.encode())
    for name, module in networks.items():
        digest.update(name.encode())
        digest.update(state_dict_sha256(module.state_dict()).encode())
    return digest.hexdigest()


def save_artifact(directory: str | os.PathLike, kind: str, parts: dict[str, dict[str, torch.Tensor]],
                  config: dict[str, Any]) -> Path:
    """Write ``parts`` (name -> state dict) as safetensors and a manifest with ``config``.

    Args:
        directory: created if needed; existing files of the same names are replaced.
        kind: what this is (``"victim"``, ``"same-detector"``...), checked on load.
        parts: state dicts to store, one ``<name>.safetensors`` file each.
        config: JSON-serialisable description (architecture, hyper-parameters, threshold...).

    Returns:
        The directory's path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for name, state in parts.items():
        if not name.replace("-", "_").isidentifier():
            raise ValueError(f"Artifact part names must be simple identifiers, got {name!r}.")
        filename = f"{name}.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        tmp = out / f".{filename}.tmp"
        safetensors.torch.save_file(tensors, str(tmp), metadata={"sameguard_kind": kind, "part": name})
        os.replace(tmp, out / filename)
        files[filename] = sha256_file(out / filename)
    manifest = {
        "format": "sameguard-artifact",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"sameguard": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "files": files,
        "config": config,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    trust = current_trust()
    if trust.key is not None:
        sign_folder(out, trust.key)
    elif (out / AUTH_FILE).exists():  # the old signature no longer matches: drop it rather than leave it stale
        (out / AUTH_FILE).unlink()
        logger.warning("Removed the signature of %s: its content changed and no artifact key is set to re-sign it",
                       out)
    logger.info("Saved %s artifact to %s (%s)", kind, out, ", ".join(files))
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` at ``path`` (not yet checked against the files or a signature).

    Raises:
        ArtifactError: not valid JSON, or not a sameguard manifest.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "sameguard-artifact":
        raise ArtifactError(f"{path} is not a sameguard manifest.")
    return manifest


def is_part_file(filename: object) -> bool:
    """Whether a manifest may list ``filename``: a ``.safetensors`` file directly in the artifact folder."""
    return isinstance(filename, str) and Path(filename).name == filename and filename.endswith(".safetensors")


def load_artifact(directory: str | os.PathLike, kind: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and verify an artifact written by :func:`save_artifact`.

    Returns:
        ``(parts, manifest)``: the state dicts by part name, and the whole manifest.

    Raises:
        ArtifactError: missing directory or manifest, wrong kind, unsupported format, pickles, or
            not authenticated when authentication is required (:mod:`sameguard.artifact_auth`).
        IntegrityError: a file's SHA-256 differs from the manifest's, or the folder's signature
            does not verify under the configured key.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"No artifact directory at {root}.")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise ArtifactError(
            f"Refusing to load {root}: it contains pickle-based checkpoint files ({', '.join(pickles)}). "
            "sameguard only loads safetensors weights, which cannot execute code."
        )
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} is not a sameguard artifact: {MANIFEST} is missing.")
    authenticate_folder(root)  # the manifest and every file, before any of it is believed
    manifest = read_manifest(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has artifact format version {manifest.get('format_version')!r}; this sameguard "
            f"reads version {FORMAT_VERSION}."
        )
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{root} holds a {manifest.get('kind')!r} artifact, expected {kind!r}.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{manifest_path} lists no files.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for filename, expected in files.items():
        path = root / filename
        if not is_part_file(filename):
            raise ArtifactError(f"{manifest_path} lists {filename!r}; only .safetensors files in the artifact are allowed.")
        if not path.is_file():
            raise ArtifactError(f"{root} is incomplete: {filename} is listed in the manifest but missing.")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path} does not match its manifest (SHA-256 {actual}, expected {expected}): the file "
                "was modified or corrupted; refusing to load it."
            )
        try:
            parts[filename[: -len(".safetensors")]] = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from None
    return parts, manifest
