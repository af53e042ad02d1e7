"""API keys: created once, shown once, stored as SHA-256, compared in constant time.

A key is ``sg_<key_id>_<secret>``: ``key_id`` is 16 public hex characters used to find the
record, ``secret`` 64 hex characters (32 bytes from :func:`secrets.token_bytes`). With 256 bits
of entropy a plain SHA-256 is enough (no password stretching needed); the stored digest is of the
whole token and is compared with :func:`hmac.compare_digest`. Keys are never logged. A client
(the key's ``name``) may hold several keys, e.g. while rotating; revoking one leaves the others.

Revocation is written to the database and, when the service shares a state store (Redis), to the
store's set of revoked key ids, which every worker checks on each request: the key is refused at
once. Without a shared store a worker may keep serving a revoked key for up to ``cache_s`` seconds
(the key cache).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, insert, select, update

from .db import api_keys

if TYPE_CHECKING:
    from .store import ServiceStore

logger = logging.getLogger(__name__)

__all__ = ["ApiKey", "KeyStore", "hash_key", "NAME_PATTERN"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
_TOKEN_RE = re.compile(r"^sg_(?P<key_id>[0-9a-f]{16})_(?P<secret>[0-9a-f]{64})$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def hash_key(token: str) -> str:
    """Hex SHA-256 of an API key token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A stored key (without its secret).

    Attributes:
        key_id: public identifier (16 hex), shown in listings.
        name: the client's name, used as the client id in decisions and the audit log.
        created_at, revoked_at: UNIX seconds (``revoked_at`` is ``None`` while the key is valid).
    """

    key_id: str
    name: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyStore:
    """Create, verify, list and revoke API keys in the service database.

    Args:
        engine: the database engine (tables created by :func:`~sameguard.service.db.init_db`).
        cache_s: seconds a verified key is remembered in memory (keyed by its SHA-256) to spare the
            database; a revocation takes effect within this delay, unless ``store`` is shared.
            ``0`` disables the cache.
        store: the service's state store; when it is shared (Redis), revocations are written to it
            and a cached key is checked against it on every verification, so revocation is immediate.
    """

    def __init__(self, engine: Engine, *, cache_s: float = 5.0, store: ServiceStore | None = None) -> None:
        self.engine = engine
        self.cache_s = float(cache_s)
        self.store = store
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()

    def create(self, name: str) -> tuple[ApiKey, str]:
        """Create a key for client ``name``; returns the record and the token (shown once, never stored)."""
        if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            raise ValueError(f"A key name must be 1-64 characters of letters, digits and _ . @ -, starting with a "
                             f"letter or digit; got {name!r}.")
        key_id = secrets.token_hex(8)
        token = f"sg_{key_id}_{secrets.token_hex(32)}"
        record = ApiKey(key_id=key_id, name=name, created_at=time.time())
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(key_id=key_id, name=name, key_sha256=hash_key(token),
                                                 created_at=record.created_at, revoked_at=None))
        logger.info("Created API key %s for client %r", key_id, name)
        return record, token

    def verify(self, token: str | None) -> ApiKey | None:
        """The active key ``token`` belongs to, or ``None`` (malformed, unknown or revoked)."""
        if not isinstance(token, str) or len(token) > 200:
            return None
        digest = hash_key(token)
        now = time.monotonic()
        if self.cache_s > 0:
            with self._lock:
                hit = self._cache.get(digest)
            if hit is not None and hit[0] > now:
                if self.store is not None and self.store.shared and self.store.is_revoked(hit[1].key_id):
                    with self._lock:
                        self._cache.pop(digest, None)
                    return None
                return hit[1]
        m = _TOKEN_RE.match(token)
        row = None
        if m is not None:
            with self.engine.connect() as conn:
                row = conn.execute(select(api_keys).where(api_keys.c.key_id == m["key_id"])).mappings().first()
        stored = row["key_sha256"] if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(stored, digest) and row is not None and row["revoked_at"] is None
        if not ok:
            return None
        record = ApiKey(key_id=row["key_id"], name=row["name"], created_at=row["created_at"])
        if self.cache_s > 0:
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + self.cache_s, record)
        return record

    def list(self) -> list[ApiKey]:
        """Every key, oldest first (no secrets)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.id)).mappings().all()
        return [ApiKey(r["key_id"], r["name"], r["created_at"], r["revoked_at"]) for r in rows]

    def revoke(self, *, name: str | None = None, key_id: str | None = None) -> int:
        """Revoke one key (``key_id``) or every key of a client (``name``); returns how many were revoked."""
        if (name is None) == (key_id is None):
            raise ValueError("Revoke by exactly one of name=... or key_id=...")
        column = api_keys.c.name if name is not None else api_keys.c.key_id
        match = column == (name if name is not None else key_id)
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(api_keys.c.key_id).where(match).where(api_keys.c.revoked_at.is_(None)))
                       .scalars())
            result = conn.execute(update(api_keys).where(match).where(api_keys.c.revoked_at.is_(None))
                                  .values(revoked_at=time.time()))
        if self.store is not None and ids:
            self.store.revoke_keys(ids)
        with self._lock:
            self._cache.clear()
        logger.info("Revoked %d API key(s) (%s)", result.rowcount, f"client {name!r}" if name else f"key {key_id}")
        return int(result.rowcount)
