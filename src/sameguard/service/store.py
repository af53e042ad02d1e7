"""The service's per-client and per-challenge state, in one store: in memory (one process) or in Redis (many).

Everything the service keeps between requests, apart from the database, goes through one
:class:`ServiceStore`:

* **rate limits** (:meth:`ServiceStore.hit`): per-key counters, through the ``limits`` package
  (sliding-window counters; in Redis each hit is one atomic Lua script of ``limits``);
* **proof-of-work challenges** (:meth:`~ServiceStore.hold_challenge`,
  :meth:`~ServiceStore.take_challenge`): a challenge is held with its answers, counted against the
  client's and the server's caps, and handed back **once**, whichever worker redeems it (in Redis:
  two Lua scripts of ours, so issue-with-caps and take-once are each atomic);
* **key revocation** (:meth:`~ServiceStore.revoke_keys`, :meth:`~ServiceStore.is_revoked`): with a
  shared store a revoked key is refused by every worker at its next request, without waiting for
  the key cache;
* **generic per-client values** (:meth:`~ServiceStore.kv`): a
  :class:`~sameguard.evidence.store.StateStore` (``get`` / ``put`` / atomic ``update``) per namespace,
  used for the per-client alarm state.

:func:`open_store` picks the implementation from a URL: ``memory://`` (default;
:class:`MemoryServiceStore`, per process) or ``redis://host:port/db`` / ``rediss://...``
(:class:`RedisServiceStore`, shared). The proof-of-work scheme itself (signing, checking solutions)
stays in :mod:`.challenges`; this module only holds and hands back.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..evidence.store import InMemoryStore, StateStore

logger = logging.getLogger(__name__)

__all__ = ["ServiceStore", "MemoryServiceStore", "RedisServiceStore", "RateLimit", "open_store", "redact_store_url",
           "TOO_MANY_CLIENT", "TOO_MANY_SERVER"]

#: :meth:`ServiceStore.hold_challenge` results other than ``None`` (held).
TOO_MANY_CLIENT = "client"
TOO_MANY_SERVER = "server"


class RateLimit:
    """``amount`` units per ``window_s`` seconds, as a ``limits`` item (sliding window counter).

    Built from a rate and a burst: at most ``burst`` units at once, ``burst`` per
    ``ceil(burst / rate)`` seconds on average (so never more than ``rate`` per second over a window).
    """

    def __init__(self, name: str, rate: float, burst: int) -> None:
        from limits import RateLimitItemPerSecond

        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number per second, got {rate!r}.")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a positive integer, got {burst!r}.")
        self.name = name
        self.rate = float(rate)
        self.burst = int(burst)
        self.window_s = max(1, math.ceil(self.burst / self.rate))
        self.item = RateLimitItemPerSecond(self.burst, self.window_s)

    def __repr__(self) -> str:
        return f"RateLimit({self.name!r}, {self.burst} per {self.window_s} s)"


@runtime_checkable
class ServiceStore(Protocol):
    """What the service keeps per client and per challenge; see the module documentation."""

    #: ``True`` when several processes see the same state (Redis), ``False`` for one process.
    shared: bool

    def hit(self, limit: RateLimit, client: str, cost: int = 1) -> float:
        """Charge ``cost`` units of ``limit`` to ``client``: 0 when granted, else seconds to wait (nothing charged)."""

    def remaining(self, limit: RateLimit, client: str) -> int:
        """Units of ``limit`` ``client`` could take now (a look; nothing is charged)."""

    def hold_challenge(self, cid: str, client: str, expires_at: int, value: Any, *, now: float,
                       max_per_client: int, max_total: int) -> str | None:
        """Hold ``value`` under challenge ``cid`` until ``expires_at``, unless ``client`` (or the server)
        already holds its cap of unexpired challenges: ``None`` when held, else :data:`TOO_MANY_CLIENT`
        or :data:`TOO_MANY_SERVER` (nothing held). Atomic."""

    def challenge_state(self, cid: str) -> str:
        """``"held"``, ``"redeemed"`` or ``"unknown"`` (a look, not a claim)."""

    def take_challenge(self, cid: str, client: str, expires_at: int) -> tuple[str, Any]:
        """Claim challenge ``cid`` once: ``("taken", value)``, or ``("redeemed", None)`` /
        ``("unknown", None)``. Atomic: of concurrent takes, across processes, exactly one gets it."""

    def drop_challenge(self, cid: str, client: str) -> None:
        """Forget a held challenge (it expired)."""

    def pending_challenges(self, now: float) -> int:
        """Unexpired challenges held, for every client."""

    def revoke_keys(self, key_ids: list[str]) -> None:
        """Mark API keys revoked (by public key id)."""

    def is_revoked(self, key_id: str) -> bool:
        """Whether :meth:`revoke_keys` marked ``key_id``."""

    def kv(self, namespace: str, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> StateStore:
        """A :class:`~sameguard.evidence.store.StateStore` of per-client values under ``namespace``."""

    def client_states(self, namespace: str = "alarms") -> StateStore:
        """The per-client alarm states (:class:`~sameguard.evidence.ClientState`) under ``namespace``: in
        Redis, a store whose updates send each query's new rows only
        (:class:`~sameguard.evidence.redis_state.RedisClientStates`)."""

    def ping(self) -> None:
        """Raise when the store cannot be reached."""

    def close(self) -> None:
        """Release connections."""


class _LimitsMixin:
    """Rate limits through a ``limits`` storage and its sliding-window-counter strategy."""

    def _init_limits(self, storage: Any, prefix: str) -> None:
        from limits.strategies import SlidingWindowCounterRateLimiter

        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._limits_storage = storage
        self._limit_prefix = prefix

    def hit(self, limit: RateLimit, client: str, cost: int = 1) -> float:
        if cost > limit.burst:
            return math.inf
        if self._limiter.hit(limit.item, self._limit_prefix, limit.name, client, cost=int(cost)):
            return 0.0
        stats = self._limiter.get_window_stats(limit.item, self._limit_prefix, limit.name, client)
        return max(0.001, float(stats.reset_time) - time.time())

    def remaining(self, limit: RateLimit, client: str) -> int:
        return int(self._limiter.get_window_stats(limit.item, self._limit_prefix, limit.name, client).remaining)


class MemoryServiceStore(_LimitsMixin):
    """Everything in this process's memory (the default; one worker process).

    Thread-safe. Challenge values are kept as given (not serialised).
    """

    shared = False

    def __init__(self) -> None:
        from limits.storage import MemoryStorage

        self._init_limits(MemoryStorage(), "sg")
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, int, Any]] = {}  # cid -> (client, expires_at, value)
        self._per_client: dict[str, int] = {}
        self._redeemed: OrderedDict[str, int] = OrderedDict()  # cid -> expires_at
        self._revoked: set[str] = set()
        self._kv: dict[str, InMemoryStore] = {}

    def hold_challenge(self, cid: str, client: str, expires_at: int, value: Any, *, now: float,
                       max_per_client: int, max_total: int) -> str | None:
        with self._lock:
            self._purge(now)
            if self._per_client.get(client, 0) >= max_per_client:
                return TOO_MANY_CLIENT
            if len(self._pending) >= max_total:
                return TOO_MANY_SERVER
            self._pending[cid] = (client, int(expires_at), value)
            self._per_client[client] = self._per_client.get(client, 0) + 1
        return None

    def challenge_state(self, cid: str) -> str:
        with self._lock:
            if cid in self._redeemed:
                return "redeemed"
            return "held" if cid in self._pending else "unknown"

    def take_challenge(self, cid: str, client: str, expires_at: int) -> tuple[str, Any]:
        with self._lock:
            if cid in self._redeemed:
                return "redeemed", None
            entry = self._pending.pop(cid, None)
            if entry is None:
                return "unknown", None
            self._release(entry[0])
            self._redeemed[cid] = int(expires_at)
            return "taken", entry[2]

    def drop_challenge(self, cid: str, client: str) -> None:
        with self._lock:
            entry = self._pending.pop(cid, None)
            if entry is not None:
                self._release(entry[0])

    def pending_challenges(self, now: float) -> int:
        with self._lock:
            self._purge(now)
            return len(self._pending)

    def _purge(self, now: float) -> None:
        for cid in [cid for cid, (_, expires, _) in self._pending.items() if expires < now]:
            self._release(self._pending.pop(cid)[0])
        while self._redeemed and next(iter(self._redeemed.values())) < now:
            self._redeemed.popitem(last=False)

    def _release(self, client: str) -> None:
        left = self._per_client.get(client, 1) - 1
        if left <= 0:
            self._per_client.pop(client, None)
        else:
            self._per_client[client] = left

    def revoke_keys(self, key_ids: list[str]) -> None:
        with self._lock:
            self._revoked.update(key_ids)

    def is_revoked(self, key_id: str) -> bool:
        with self._lock:
            return key_id in self._revoked

    def kv(self, namespace: str, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> StateStore:
        with self._lock:
            return self._kv.setdefault(namespace, InMemoryStore())

    def client_states(self, namespace: str = "alarms") -> StateStore:
        from ..evidence import ClientState

        return self.kv(namespace, ClientState.to_bytes, ClientState.from_bytes)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None


# Hold a challenge unless the client or the server is at its cap. KEYS: all-pending zset,
# client-pending zset, entry. ARGV: now, cid, expires_at, value, max_per_client, max_total.
_HOLD_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[6]) then return 2 end
local expires = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expires, ARGV[2])
redis.call('ZADD', KEYS[2], expires, ARGV[2])
redis.call('SET', KEYS[3], ARGV[4], 'EXAT', expires + 2)
redis.call('EXPIREAT', KEYS[2], expires + 2, 'GT')
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIREAT', KEYS[2], expires + 2) end
return 0
"""

# Take a held challenge once. KEYS: entry, redeemed marker, all-pending zset, client-pending zset.
# ARGV: cid, expires_at. Returns {0, value} taken, {1} already redeemed, {2} unknown.
_TAKE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {1} end
local value = redis.call('GET', KEYS[1])
if not value then return {2} end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'EXAT', tonumber(ARGV[2]) + 2)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return {0, value}
"""


class RedisServiceStore(_LimitsMixin):
    """Everything in one Redis, shared by every worker and host that opens the same URL and prefix.

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://...`` (TLS).
        prefix: prepended to every key this store writes (default ``"sameguard:"``), so several
            services (or tests) can share one Redis.

    Challenge values must be JSON-serialisable (the service's held answers are). Keys:
    ``<prefix>rl:*`` (``limits``' counters), ``<prefix>pow:*`` (challenges, replay markers and the
    pending sets, each expiring with its challenge), ``<prefix>revoked`` (a set of key ids),
    ``<prefix>kv:<namespace>:<client>`` (per-client values).
    """

    shared = True

    def __init__(self, url: str, *, prefix: str = "sameguard:") -> None:
        import redis
        from limits.storage import RedisStorage

        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError("The Redis key prefix must be a non-empty string without spaces.")
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                           health_check_interval=30)
        self._init_limits(RedisStorage(url, key_prefix=prefix + "rl"), "sg")
        self._hold = self.client.register_script(_HOLD_LUA)
        self._take = self.client.register_script(_TAKE_LUA)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def hold_challenge(self, cid: str, client: str, expires_at: int, value: Any, *, now: float,
                       max_per_client: int, max_total: int) -> str | None:
        data = json.dumps(value, separators=(",", ":"))
        code = int(self._hold(keys=[self._k("pow", "pending"), self._k("pow", "client", client),
                                    self._k("pow", "held", cid)],
                              args=[repr(float(now)), cid, int(expires_at), data, int(max_per_client), int(max_total)]))
        return {0: None, 1: TOO_MANY_CLIENT, 2: TOO_MANY_SERVER}[code]

    def challenge_state(self, cid: str) -> str:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self._k("pow", "redeemed", cid))
            pipe.exists(self._k("pow", "held", cid))
            redeemed, held = pipe.execute()
        return "redeemed" if redeemed else "held" if held else "unknown"

    def take_challenge(self, cid: str, client: str, expires_at: int) -> tuple[str, Any]:
        result = self._take(keys=[self._k("pow", "held", cid), self._k("pow", "redeemed", cid),
                                  self._k("pow", "pending"), self._k("pow", "client", client)],
                            args=[cid, int(expires_at)])
        code = int(result[0])
        if code == 0:
            return "taken", json.loads(result[1])
        return ("redeemed" if code == 1 else "unknown"), None

    def drop_challenge(self, cid: str, client: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("pow", "held", cid))
            pipe.zrem(self._k("pow", "pending"), cid)
            pipe.zrem(self._k("pow", "client", client), cid)
            pipe.execute()

    def pending_challenges(self, now: float) -> int:
        key = self._k("pow", "pending")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", f"({float(now)!r}")
            pipe.zcard(key)
            return int(pipe.execute()[1])

    def revoke_keys(self, key_ids: list[str]) -> None:
        if key_ids:
            self.client.sadd(self._k("revoked"), *key_ids)

    def is_revoked(self, key_id: str) -> bool:
        return bool(self.client.sismember(self._k("revoked"), key_id))

    def kv(self, namespace: str, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> StateStore:
        from ..evidence.redis_store import RedisStore

        return RedisStore(self.client, self._k("kv", namespace) + ":", encode, decode)

    def client_states(self, namespace: str = "alarms") -> StateStore:
        from ..evidence.redis_state import RedisClientStates

        return RedisClientStates(self.client, self._k("kv", namespace) + ":")

    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()


def redact_store_url(url: str) -> str:
    """``url`` with any password hidden, for logs and messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable store URL>"


def open_store(url: str | None = None, *, prefix: str = "sameguard:") -> ServiceStore:
    """The store named by ``url``: ``None`` / ``"memory://"`` in memory, ``redis://...`` / ``rediss://...`` in Redis.

    A Redis store is pinged once, so a wrong URL fails at start-up rather than on the first request.

    Raises:
        ValueError: an unknown scheme, or Redis cannot be reached (the message names the URL
            without its password).
    """
    if url is None or url in ("memory", "memory://"):
        return MemoryServiceStore()
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"Unknown state store {redact_store_url(str(url))!r}: use memory:// (one process) or "
                         "redis://HOST:PORT/DB (shared by several workers).")
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ValueError("A Redis state store needs the redis package: pip install 'sameguard[redis]'.") from None
    store = RedisServiceStore(url, prefix=prefix)
    try:
        store.ping()
    except Exception as exc:  # noqa: BLE001 - connection errors come in many classes
        store.close()
        raise ValueError(f"Cannot reach the Redis state store {redact_store_url(url)}: {type(exc).__name__}: {exc}") \
            from None
    logger.info("State store: Redis at %s (prefix %r)", redact_store_url(url), prefix)
    return store

