"""Where per-client state lives: one small protocol, an in-memory implementation, a byte format.

The protocol is what a shared store (e.g. Redis used by many service workers) implements too; its
atomic :meth:`StateStore.update` is the only way the monitor changes a client's state, so two
requests of the same client never lose each other's queries. Values that go to such a store must
turn into bytes: :func:`pack` / :func:`unpack` write tensors with safetensors plus a small JSON
header (never a pickle), and the per-client state classes build their ``to_bytes`` / ``from_bytes``
on them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import safetensors.numpy
import torch

from ..api import SameguardError

__all__ = ["InMemoryStore", "StateFormatError", "StateStore", "pack", "unpack"]

T = TypeVar("T")

_HEADER_KEY = "sameguard"


class StateFormatError(SameguardError, ValueError):
    """Bytes that should hold a per-client state are not in the expected format."""


@runtime_checkable
class StateStore(Protocol[T]):
    """A key -> value map of per-client states, with an atomic read-modify-write.

    Keys are client ids (non-empty strings). Implementations must make :meth:`update` atomic per
    key: ``fn`` sees the latest value and no other write to that key happens in between (a lock in
    memory; ``WATCH``/``MULTI`` with retries, or a Lua script, in Redis, where ``fn`` may then run
    more than once and must be a pure function of its argument).
    """

    def get(self, key: str) -> T | None:
        """The value stored under ``key``, or ``None``."""

    def put(self, key: str, value: T) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it was there."""

    def keys(self) -> list[str]:
        """All keys, in no particular order."""

    def update(self, key: str, fn: Callable[[T | None], T]) -> T:
        """Atomically replace the value under ``key`` by ``fn(old)`` (``old`` is ``None`` if absent)."""


class InMemoryStore(Generic[T]):
    """A thread-safe dict behind one re-entrant lock (one process; not shared between workers).

    Values are kept as given (not copied nor serialised): callers must treat them as immutable and
    store new objects, as :class:`~sameguard.evidence.EvidenceMonitor` does. ``fn`` in
    :meth:`update` runs under the lock, so it should be quick and must not block on other threads.
    """

    def __init__(self) -> None:
        self._data: dict[str, T] = {}
        self._lock = threading.RLock()

    def get(self, key: str) -> T | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, value: T) -> None:
        with self._lock:
            self._data[key] = value

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._data)

    def update(self, key: str, fn: Callable[[T | None], T]) -> T:
        with self._lock:
            value = fn(self._data.get(key))
            self._data[key] = value
            return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def pack(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> bytes:
    """Tensors (safetensors) plus a JSON-serialisable ``header``, as one ``bytes`` value.

    Written through NumPy (``safetensors.numpy``: the same format, several times faster than
    ``safetensors.torch`` for a per-query state of a few small arrays); the states hold float and integer
    tensors only."""
    return safetensors.numpy.save({name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in tensors.items()},
                                  metadata={_HEADER_KEY: json.dumps(header, sort_keys=True)})


def unpack(data: bytes, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`pack`; checks that ``header["format"] == fmt``.

    The header is read from the safetensors file header (8-byte little-endian length, then JSON
    whose ``__metadata__`` holds our JSON string); tensors are read by safetensors, which runs no code.

    Raises:
        StateFormatError: not bytes, not safetensors, or another format.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateFormatError(f"A serialised state must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(json.loads(data[8:8 + length])["__metadata__"][_HEADER_KEY])
        tensors = {name: torch.from_numpy(a) for name, a in safetensors.numpy.load(data).items()}
    except Exception as exc:  # noqa: BLE001 - malformed bytes raise many kinds of errors
        raise StateFormatError(f"These bytes are not a serialised sameguard state ({exc}).") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        found = header.get("format") if isinstance(header, dict) else None
        raise StateFormatError(f"Expected a serialised {fmt!r}, got format {found!r}.")
    return tensors, header
