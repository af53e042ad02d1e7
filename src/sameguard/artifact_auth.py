"""Authenticated artifacts: an HMAC (or a pinned digest) over a folder's manifest and every file in it.

The SHA-256 hashes in ``manifest.json`` detect corruption, not tampering: whoever can edit a weight
file can edit its hash too, and nothing covered the manifest itself (its ``threshold``, the
architecture, the calibration). This module adds two ways for the operator to *authenticate* an
artifact folder (a victim, a detector, a calibration, the per-client alarms):

* **HMAC** with a key the operator holds: ``sameguard artifacts sign DIR`` (or any
  ``save_artifact`` while ``SAMEGUARD_ARTIFACT_KEY`` is set) writes :data:`AUTH_FILE` with
  ``HMAC-SHA256(key, canonical)``; loading with the same key in ``SAMEGUARD_ARTIFACT_KEY``
  recomputes it and refuses the folder when it differs (:class:`~sameguard.api.IntegrityError`).
* **Pinned digest**: ``sameguard artifacts digest DIR`` prints ``SHA-256(canonical)``; an operator
  who pins it (``SAMEGUARD_ARTIFACT_DIGESTS=hex,...`` or ``serve --artifact-digest``) makes that exact
  content authentic without any key. Pinning any digest turns the requirement on: every folder loaded
  must then match a pin or verify under the key (an operator who pins expects an edited folder to be
  refused). An older, validly signed version of a folder is refused only when no key is configured,
  since a verifying HMAC is accepted whatever the pins.

``canonical`` covers **every regular file under the folder** (relative path and SHA-256, sorted),
the manifest included, except :data:`AUTH_FILE` itself. With ``SAMEGUARD_REQUIRE_AUTHENTICATED_ARTIFACTS=1``
(``serve --require-authenticated-artifacts``, ``sameguard --require-authenticated-artifacts ...``)
a folder that is neither signed with the key nor pinned is refused. Without it, an unsigned folder
loads as before, but a signature that does not verify under the configured key is always refused.

Keys are compared with :func:`hmac.compare_digest` and never logged; only a key id (a hash of
the key) is written next to the MAC, so that a wrong key can be told apart from a tampered folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .api import ArtifactError, IntegrityError

logger = logging.getLogger(__name__)

__all__ = ["AUTH_FILE", "SCHEME", "KEY_ENV", "DIGESTS_ENV", "REQUIRE_ENV", "ArtifactTrust", "folder_digest",
           "sign_folder", "authenticate_folder", "trusting", "current_trust", "key_id", "sha256_file",
           "read_signature"]

AUTH_FILE = "sameguard-auth.json"
SCHEME = "sameguard-folder-hmac-sha256-v1"
KEY_ENV = "SAMEGUARD_ARTIFACT_KEY"
DIGESTS_ENV = "SAMEGUARD_ARTIFACT_DIGESTS"
REQUIRE_ENV = "SAMEGUARD_REQUIRE_AUTHENTICATED_ARTIFACTS"
_MIN_KEY_BYTES = 16
_MAX_AUTH_BYTES = 4096
_TRUE = {"1", "true", "yes", "on"}


def key_id(key: bytes) -> str:
    """A public 16-hex identifier of ``key`` (a hash; reveals nothing usable about the key)."""
    return hashlib.sha256(b"sameguard-artifact-key-id\0" + key).hexdigest()[:16]


@dataclass(frozen=True)
class ArtifactTrust:
    """What makes an artifact folder authentic, and whether one must be.

    Attributes:
        key: the operator's HMAC key (at least 16 bytes), or ``None``. Not shown in ``repr``.
        pinned: hex SHA-256 digests (:func:`folder_digest`) accepted as authentic.
        required: refuse folders that are neither signed with ``key`` nor pinned; always on when
            ``pinned`` is not empty.
    """

    key: bytes | None = field(default=None, repr=False)
    pinned: frozenset[str] = frozenset()
    required: bool = False

    def __post_init__(self) -> None:
        if self.key is not None and len(self.key) < _MIN_KEY_BYTES:
            raise ValueError(f"The artifact key ({KEY_ENV}) must be at least {_MIN_KEY_BYTES} bytes, e.g. 64 hex "
                             "characters from 'python -c \"import secrets; print(secrets.token_hex(32))\"'.")
        bad = [d for d in self.pinned if not _is_hex(d, 64)]
        if bad:
            raise ValueError(f"Pinned artifact digests must be 64 hex characters (sameguard artifacts digest DIR); "
                             f"got {len(bad)} that are not.")
        object.__setattr__(self, "pinned", frozenset(d.lower() for d in self.pinned))
        object.__setattr__(self, "required", bool(self.required or self.pinned))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, required: bool | None = None) -> ArtifactTrust:
        """The trust configured by :data:`KEY_ENV`, :data:`DIGESTS_ENV` and :data:`REQUIRE_ENV`
        (``required`` overrides the latter when given)."""
        env = os.environ if environ is None else environ
        key = env.get(KEY_ENV, "").strip()
        pinned = frozenset(d.strip() for d in env.get(DIGESTS_ENV, "").split(",") if d.strip())
        if required is None:
            required = env.get(REQUIRE_ENV, "").strip().lower() in _TRUE
        return cls(key=key.encode() if key else None, pinned=pinned, required=required)


def _is_hex(text: object, length: int) -> bool:
    """``text`` is a string of exactly ``length`` hex digits (what :func:`hmac.compare_digest` can compare)."""
    return isinstance(text, str) and len(text) == length and all(c in "0123456789abcdefABCDEF" for c in text)


_TRUST: contextvars.ContextVar[ArtifactTrust | None] = contextvars.ContextVar("sameguard_artifact_trust", default=None)
#: Folders authenticated within the current :func:`trusting` block: what lies under them is covered.
_COVERED: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("sameguard_artifact_covered", default=())


def current_trust() -> ArtifactTrust:
    """The trust in force: the one set by :func:`trusting`, else :meth:`ArtifactTrust.from_env`."""
    trust = _TRUST.get()
    return trust if trust is not None else ArtifactTrust.from_env()


@contextlib.contextmanager
def trusting(trust: ArtifactTrust) -> Iterator[ArtifactTrust]:
    """Load artifacts under ``trust`` within the block (the service's settings, the CLI's flag).

    Within the block, a folder under one already authenticated (the calibrations inside the
    alarms folder) counts as authenticated too: the parent's signature or digest covers its files.
    """
    token, covered = _TRUST.set(trust), _COVERED.set(())
    try:
        yield trust
    finally:
        _COVERED.reset(covered)
        _TRUST.reset(token)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (also the per-file hash of :mod:`sameguard.artifacts`' manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(root: Path) -> bytes:
    """``sameguard-folder-v1`` then ``<relative path>\\0<sha256>`` per regular file under ``root``, sorted."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if name == AUTH_FILE or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            entries.append(f"{rel}\0{sha256_file(path)}\n")
    if not entries:
        raise ArtifactError(f"{root} holds no files to authenticate.")
    return ("sameguard-folder-v1\n" + "".join(sorted(entries))).encode("utf-8")


def folder_digest(directory: str | os.PathLike) -> str:
    """Hex SHA-256 of the folder's canonical listing: every file under it (manifest included), path and content."""
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"No artifact directory at {root}.")
    return hashlib.sha256(_canonical(root)).hexdigest()


def _mac(key: bytes, canonical: bytes) -> str:
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def sign_folder(directory: str | os.PathLike, key: bytes) -> Path:
    """Write :data:`AUTH_FILE` in ``directory``: the HMAC-SHA256 under ``key`` of every file under it.

    Returns:
        The path of the written file.
    """
    trust = ArtifactTrust(key=key)  # validates the key length
    root = Path(directory)
    canonical = _canonical(root)
    body = {"scheme": SCHEME, "key_id": key_id(trust.key), "digest": hashlib.sha256(canonical).hexdigest(),
            "hmac": _mac(trust.key, canonical)}
    tmp = root / f".{AUTH_FILE}.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / AUTH_FILE)
    logger.info("Signed %s (key id %s)", root, body["key_id"])
    return root / AUTH_FILE


def read_signature(root: Path) -> dict[str, str] | None:
    """The folder's :data:`AUTH_FILE` (``None``: unsigned); :class:`IntegrityError` when it is not a valid one."""
    path = root / AUTH_FILE
    if not path.exists():
        return None
    try:
        if path.stat().st_size > _MAX_AUTH_BYTES:
            raise ValueError("too large")
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} is not a readable signature ({exc}); refusing {root}.") from None
    if (not isinstance(body, dict) or body.get("scheme") != SCHEME or not _is_hex(body.get("key_id"), 16)
            or not _is_hex(body.get("hmac"), 64)):
        raise IntegrityError(f"{path} is not a {SCHEME} signature; refusing {root}.")
    return body


def _cover(resolved: Path, trust: ArtifactTrust) -> None:
    if trust is _TRUST.get():
        _COVERED.set(_COVERED.get() + (resolved,))


def authenticate_folder(directory: str | os.PathLike, trust: ArtifactTrust | None = None) -> str:
    """Check that ``directory`` is authentic under ``trust`` (default :func:`current_trust`).

    Returns:
        How: ``"pinned"`` (its digest is pinned), ``"hmac"`` (its signature verifies under the key),
        ``"covered"`` (it lies under a folder authenticated earlier in the same :func:`trusting`
        block) or ``"unauthenticated"`` (none of these, and ``trust.required`` is off).

    Raises:
        IntegrityError: a signature that does not verify under the key (the manifest or a file was
            changed after signing), or an unreadable signature file.
        ArtifactError: ``trust.required`` and the folder is neither pinned nor signed with the key.
    """
    trust = current_trust() if trust is None else trust
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"No artifact directory at {root}.")
    resolved = root.resolve()
    if trust is _TRUST.get() and any(resolved != parent and resolved.is_relative_to(parent)
                                     for parent in _COVERED.get()):
        return "covered"
    auth = read_signature(root)
    if trust.pinned or (auth is not None and trust.key is not None):  # else nothing to check: no hashing
        canonical = _canonical(root)
        digest = hashlib.sha256(canonical).hexdigest()
        if digest in trust.pinned:
            logger.info("%s is authentic: its digest %s is pinned", root, digest[:16])
            _cover(resolved, trust)
            return "pinned"
        if auth is not None and trust.key is not None:
            if not hmac.compare_digest(auth["key_id"].lower(), key_id(trust.key)):
                raise IntegrityError(f"{root} was signed with another key (key id {auth['key_id']!r}, the "
                                     f"configured key's is {key_id(trust.key)!r}); refusing to load it.")
            if not hmac.compare_digest(_mac(trust.key, canonical), auth["hmac"].lower()):
                raise IntegrityError(f"{root} does not match its signature: its manifest or a file was changed after "
                                     "it was signed; refusing to load it.")
            logger.info("%s is authentic: its HMAC verifies (key id %s)", root, key_id(trust.key))
            _cover(resolved, trust)
            return "hmac"
    if trust.required:
        why = ("it is signed but no key is configured to check it (set " + KEY_ENV + ")" if auth is not None
               else "it is neither signed (sameguard artifacts sign) nor pinned (sameguard artifacts digest)")
        raise ArtifactError(f"{root} is not authenticated: {why}; authenticated artifacts are required.")
    if auth is not None:
        logger.warning("%s is signed, but %s is not set: the signature was not checked", root, KEY_ENV)
    return "unauthenticated"
