"""A :class:`~sameguard.evidence.store.StateStore` in Redis, shared by every process that opens it.

Values are turned into bytes with the ``encode`` / ``decode`` pair given (for the per-client alarm
state: :meth:`ClientState.to_bytes <sameguard.evidence.ClientState.to_bytes>` and
:meth:`~sameguard.evidence.ClientState.from_bytes`, safetensors plus a JSON header, never a pickle).
:meth:`RedisStore.update` is an optimistic transaction (``WATCH`` / ``MULTI`` / ``EXEC``, retried
when another process wrote the key in between), so ``fn`` may run more than once and must be a
pure function of its argument, as the protocol says. Needs ``redis`` (``pip install 'sameguard[redis]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["RedisStore"]

T = TypeVar("T")


class RedisStore(Generic[T]):
    """Per-key values in Redis under ``prefix`` (e.g. ``"sameguard:alarms:"``).

    Args:
        client: a ``redis.Redis`` client (``decode_responses=False``).
        prefix: prepended to every key; the store sees and lists only its own keys.
        encode, decode: value <-> ``bytes``.
        max_retries: attempts of an :meth:`update` that keeps losing the race before it gives up
            (``RuntimeError``).
    """

    def __init__(self, client: Any, prefix: str, encode: Callable[[T], bytes], decode: Callable[[bytes], T], *,
                 max_retries: int = 100) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("prefix must be a non-empty string (e.g. 'sameguard:alarms:').")
        self.client = client
        self.prefix = prefix
        self._encode = encode
        self._decode = decode
        self.max_retries = int(max_retries)

    def _key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError("A store key must be a non-empty string.")
        return self.prefix + key

    def get(self, key: str) -> T | None:
        data = self.client.get(self._key(key))
        return None if data is None else self._decode(data)

    def put(self, key: str, value: T) -> None:
        self.client.set(self._key(key), self._encode(value))

    def delete(self, key: str) -> bool:
        return bool(self.client.delete(self._key(key)))

    def keys(self) -> list[str]:
        n = len(self.prefix)
        return [k.decode() if isinstance(k, bytes) else k for k in
                (k[n:] for k in self.client.scan_iter(match=_escape_glob(self.prefix) + "*", count=500))]

    def update(self, key: str, fn: Callable[[T | None], T]) -> T:
        from redis.exceptions import WatchError

        name = self._key(key)
        with self.client.pipeline() as pipe:
            for _ in range(self.max_retries):
                try:
                    pipe.watch(name)
                    data = pipe.get(name)
                    value = fn(None if data is None else self._decode(data))
                    pipe.multi()
                    pipe.set(name, self._encode(value))
                    pipe.execute()
                    return value
                except WatchError:
                    continue
                finally:
                    pipe.reset()
        raise RuntimeError(f"The update of {key!r} lost the race {self.max_retries} times in a row; retry later.")

    def __len__(self) -> int:
        return len(self.keys())


def _escape_glob(text: str) -> str:
    """``text`` with Redis glob characters escaped, for ``SCAN MATCH``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
