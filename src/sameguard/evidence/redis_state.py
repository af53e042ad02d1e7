"""The per-client alarm state in Redis, written incrementally: each query sends its new rows, not the bag.

:class:`~sameguard.evidence.redis_store.RedisStore` reads and writes a whole value per update. For the
alarm state that is the stream test's bag of the client's current block, up to ``window x D`` float32
(a 1 000-query client: 0.95 MB with images pooled to 14x14, 3.8 MB for every pixel of 28x28), sent twice
per query. :class:`RedisClientStates` keeps the state in two values per client:

* the **head** (``<prefix><client>``): martingales, counts, the alarm, the bag's nearest-neighbour
  distances (8 bytes a point) and where the bag stands: an ``epoch`` (random, new for each stored
  life of the client), the block's first query and its number of rows;
* the **rows** (``<rows prefix><client>``): the bag's feature rows, float32 little-endian, one Redis
  string that each update extends with ``APPEND`` (replaced when a new block starts).

Each process keeps the rows it has seen (:class:`_RowCache`, the most recently used clients); an update
reads the head, fetches with ``GETRANGE`` only the rows other workers appended since (none when the
client's queries come to this worker), runs ``fn`` and writes the head and the appended rows with one
compare-and-set script: only if the head still carries the stamp it was read with (a random version,
new for every write; every change of the rows comes with a new head, so the stamp covers them). Two
round trips per update (``GET``, the script), where ``WATCH`` / ``GET`` / ``MULTI``-``EXEC`` take three.
A lost race drops the process's copy of that client and retries; ``fn`` must be a pure function of its
argument.

A head stored by an earlier version (the whole state, :meth:`ClientState.to_bytes
<sameguard.evidence.ClientState.to_bytes>`, at the same key) is read as it is and rewritten in this
layout by the client's next update, so an upgrade keeps every client's evidence.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .redis_store import _escape_glob
from .state import ClientState
from .store import StateFormatError
from .stream import StreamState, _Bag

__all__ = ["RedisClientStates"]

#: The first bytes of a head in this layout (a whole state in the older layout starts with safetensors'
#: 8-byte header length, whose last bytes are zero).
_MAGIC = b"SGH1"
#: Bytes of a head's stamp: the magic and a random version.
_STAMP = len(_MAGIC) + 16

#: Compare-and-set of one client's head and rows: write only if the head is still the one read (its stamp,
#: or the whole value for a head in the older layout; absent when ARGV[1] is empty). ARGV: expected, comparison
#: (stamp / whole), new head, rows operation (append / set / delete), rows. Returns 1 when written.
_CAS_LUA = """
local expected, how = ARGV[1], ARGV[2]
if expected == '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
elseif how == 'stamp' then
  if redis.call('GETRANGE', KEYS[1], 0, string.len(expected) - 1) ~= expected then return 0 end
elseif redis.call('GET', KEYS[1]) ~= expected then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
if ARGV[4] == 'append' then
  redis.call('APPEND', KEYS[2], ARGV[5])
elseif ARGV[4] == 'set' then
  redis.call('SET', KEYS[2], ARGV[5])
else
  redis.call('DEL', KEYS[2])
end
return 1
"""


class _RowsMoved(Exception):
    """The rows read do not match the head read just before: another worker's write came in between, or
    the values are corrupted (the caller tells them apart by reading the head again)."""


@dataclasses.dataclass
class _Rows:
    """This process's copy of one client's bag: valid while ``bag.length == rows`` (no one appended in place)."""

    epoch: str
    start: int  # the block's first query (0-based index in the client's stream)
    rows: int
    bag: _Bag


class _RowCache:
    """The bags of the ``capacity`` clients this process used most recently (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._items: OrderedDict[str, _Rows] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> _Rows | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: _Rows) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


class RedisClientStates:
    """A :class:`~sameguard.evidence.store.StateStore` of :class:`~sameguard.evidence.ClientState` in Redis,
    shared by every process that opens it, whose updates send a query's new rows only.

    Args:
        client: a ``redis.Redis`` client (``decode_responses=False``).
        prefix: the heads' keys are ``prefix + client id`` (e.g. ``"sameguard:kv:alarms:"``).
        rows_prefix: the rows' keys are ``rows_prefix + client id``; must not start with ``prefix``, so
            that :meth:`keys` lists clients only (default: ``prefix`` with ``"-rows"`` before its last
            character, ``"sameguard:kv:alarms-rows:"``).
        cache_clients: how many clients' bags this process keeps (most recently used first; ``0``: none,
            every update reads the whole bag). Each takes up to ``window x D x 4`` bytes.
        max_retries: attempts of an :meth:`update` that keeps losing the race before it gives up
            (``RuntimeError``).
    """

    def __init__(self, client: Any, prefix: str, *, rows_prefix: str | None = None, cache_clients: int = 64,
                 max_retries: int = 100) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError("prefix must be a non-empty string (e.g. 'sameguard:kv:alarms:').")
        rows_prefix = rows_prefix if rows_prefix is not None else prefix[:-1] + "-rows" + prefix[-1]
        if not isinstance(rows_prefix, str) or not rows_prefix or rows_prefix.startswith(prefix):
            raise ValueError(f"rows_prefix must be a non-empty string that does not start with {prefix!r}.")
        if int(cache_clients) < 0 or int(max_retries) < 1:
            raise ValueError("cache_clients must be >= 0 and max_retries >= 1.")
        self.client = client
        self.prefix = prefix
        self.rows_prefix = rows_prefix
        self.max_retries = int(max_retries)
        self._cache = _RowCache(int(cache_clients))
        self._cas = client.register_script(_CAS_LUA)
        # Threads of one process take turns per client (striped locks): the cached bag is appended in place.
        self._locks = [threading.Lock() for _ in range(64)]

    # -- the StateStore protocol ------------------------------------------------------------------
    def get(self, key: str) -> ClientState | None:
        name = self._head(key)
        with self._lock(key):
            for _ in range(self.max_retries):
                read = self._read(key, name)
                if read is not None and (read[0] is None or self.client.get(name) == read[0]):
                    return read[1]  # no state, or rows that belong to the head read (unchanged since)
                self._cache.drop(key)
        raise RuntimeError(f"The state of {key!r} kept changing while it was read; retry later.")

    def put(self, key: str, value: ClientState) -> None:
        with self._lock(key), self.client.pipeline(transaction=True) as pipe:
            self._cache.drop(key)
            head, rows_op, rows, entry = self._plan(key, value, None)
            pipe.set(self._head(key), head)
            if rows_op == b"delete":
                pipe.delete(self.rows_prefix + key)
            else:
                pipe.set(self.rows_prefix + key, rows)
            pipe.execute()
            self._remember(key, entry)

    def delete(self, key: str) -> bool:
        with self._lock(key):
            self._cache.drop(key)
            return bool(self.client.delete(self._head(key), self.rows_prefix + key))

    def keys(self) -> list[str]:
        n = len(self.prefix)
        return [k.decode() if isinstance(k, bytes) else k for k in
                (k[n:] for k in self.client.scan_iter(match=_escape_glob(self.prefix) + "*", count=500))]

    def update(self, key: str, fn: Callable[[ClientState | None], ClientState]) -> ClientState:
        name = self._head(key)
        with self._lock(key):
            for _ in range(self.max_retries):
                read = self._read(key, name)
                if read is None:
                    continue
                head, old, where = read
                try:
                    value = fn(old)
                    new_head, rows_op, rows, entry = self._plan(key, value, where)
                    written = self._cas(keys=[name, self.rows_prefix + key],
                                        args=[*_expected(head), new_head, rows_op, rows])
                except BaseException:
                    self._cache.drop(key)  # rows may have been appended to our copy in place
                    raise
                if written:
                    self._remember(key, entry)
                    return value
                self._cache.drop(key)  # another worker wrote first: read again
        raise RuntimeError(f"The update of {key!r} lost the race {self.max_retries} times in a row; retry later.")

    def __len__(self) -> int:
        return len(self.keys())

    # -- layout -----------------------------------------------------------------------------------
    def _head(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError("A store key must be a non-empty string.")
        return self.prefix + key

    def _lock(self, key: str) -> threading.Lock:
        return self._locks[zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(self._locks)]

    def _read(self, key: str, name: str) -> tuple[bytes | None, ClientState | None, _Rows | None] | None:
        """``(head, state, where its bag stands)`` as stored now (``(None, None, None)`` for no state), or
        ``None`` when the rows read belonged to a newer head (another worker wrote in between: read again).

        Raises:
            StateFormatError: the rows do not match an unchanged head (corrupted values).
        """
        head = self.client.get(name)
        if head is None:
            return None, None, None
        try:
            return (head, *self._assemble(key, head))
        except _RowsMoved as moved:
            if self.client.get(name) == head:
                raise StateFormatError(str(moved)) from None
            self._cache.drop(key)
            return None

    def _assemble(self, key: str, head: bytes) -> tuple[ClientState, _Rows | None]:
        """The state a head describes, its bag from this process's copy plus the rows it lacks; and where
        the bag stands (``None`` without a stream test, or for a head in the older whole-state layout)."""
        if not head.startswith(_MAGIC):  # the whole state, as RedisStore wrote it
            return ClientState.from_bytes(head), None
        meta, state = _decode_head(head)
        if state.stream is None:
            return state, None
        epoch, start, rows, dim = meta["epoch"], meta["start"], meta["rows"], meta["dim"]
        width = 4 * dim
        cached = self._cache.get(key)
        if (cached is None or cached.epoch != epoch or cached.start != start or cached.rows > rows
                or cached.bag.length != cached.rows or (rows and cached.bag.data.shape[1] != dim)):
            cached = None
        have = 0 if cached is None else cached.rows
        data = b""
        if rows > have:
            data = self.client.getrange(self.rows_prefix + key, have * width, rows * width - 1)
            if len(data) != (rows - have) * width:
                raise _RowsMoved(f"The stored rows of client {key!r} do not match its state "
                                       f"({len(data)} bytes for {rows - have} rows of {dim} features).")
        new_rows = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(rows - have, dim))
        if cached is None or cached.bag.data.shape[0] < rows:
            kept = cached.bag.data[:have] if cached is not None else torch.empty(0, dim)
            bag = _Bag(torch.cat([kept, new_rows]) if have else new_rows, rows + 64)  # room for the next queries
        else:
            bag = cached.bag
            if rows > have:
                bag.data.numpy()[have:rows] = new_rows.numpy()
            bag.length = rows
        where = _Rows(epoch, start, rows, bag)
        self._cache.put(key, where)
        stream = StreamState(bag.data[:rows], state.stream.nn_dist, state.stream.seen, bag)
        return dataclasses.replace(state, stream=stream), where

    def _plan(self, key: str, value: ClientState, where: _Rows | None) -> tuple[bytes, bytes, bytes, _Rows | None]:
        """What writing ``value`` takes: its head, what to do with the rows (``append`` the new ones when
        ``value`` continues ``where``'s bag, ``set`` them all, or ``delete`` them without a stream test),
        those rows' bytes, and the bag this process may keep for the client afterwards."""
        if not isinstance(value, ClientState):
            raise ValueError(f"RedisClientStates holds ClientState values, got {type(value).__name__}.")
        stream = value.stream
        if stream is None:
            return _encode_head(value, {"epoch": _epoch()}), b"delete", b"", None
        rows, dim = int(stream.points.shape[0]), int(stream.points.shape[1])
        start = stream.seen - rows
        same_block = where is not None and where.start == start and where.rows <= rows and \
            (where.rows == 0 or where.bag.data.shape[1] == dim)
        epoch = where.epoch if same_block else _epoch()
        points = stream.points.numpy()
        op, data = (b"append", _row_bytes(points[where.rows:rows])) if same_block else (b"set", _row_bytes(points))
        head = _encode_head(value, {"epoch": epoch, "start": start, "rows": rows, "dim": dim})
        bag = stream._bag
        entry = _Rows(epoch, start, rows, bag) if bag is not None and bag.length == rows else None
        return head, op, data, entry

    def _remember(self, key: str, entry: _Rows | None) -> None:
        """Keep the written state's bag (when it is its storage's newest state), else forget the client's."""
        if entry is None:
            self._cache.drop(key)
        else:
            self._cache.put(key, entry)


def _expected(head: bytes | None) -> tuple[bytes, bytes]:
    """What the compare-and-set compares with the stored head, and how: nothing (no head yet), the stamp of a
    head in this layout, or the whole value of one in the older layout."""
    if head is None:
        return b"", b"stamp"
    return (head[:_STAMP], b"stamp") if head.startswith(_MAGIC) else (head, b"whole")


def _epoch() -> str:
    return secrets.token_hex(8)


def _row_bytes(points: np.ndarray) -> bytes:
    return np.ascontiguousarray(points, dtype="<f4").tobytes()


def _encode_head(state: ClientState, meta: dict[str, Any]) -> bytes:
    """The stamp (``MAGIC`` and 16 random hex characters, new for every write: what :meth:`update`'s
    compare-and-set compares), 4-byte length, JSON ``meta``, then the state's own bytes with an empty bag
    (its distances kept)."""
    if state.stream is not None:
        s = state.stream
        state = dataclasses.replace(state, stream=StreamState(torch.empty(0, s.points.shape[1]), s.nn_dist, s.seen))
    text = json.dumps(meta, sort_keys=True).encode()
    return _MAGIC + secrets.token_hex(8).encode() + len(text).to_bytes(4, "little") + text + state.to_bytes()


def _decode_head(data: bytes) -> tuple[dict[str, Any], ClientState]:
    try:
        length = int.from_bytes(data[_STAMP:_STAMP + 4], "little")
        meta = json.loads(data[_STAMP + 4:_STAMP + 4 + length])
        state = ClientState.from_bytes(data[_STAMP + 4 + length:])
    except StateFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed bytes raise many kinds of errors
        raise StateFormatError(f"These bytes are not a stored client state head ({exc}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("epoch"), str):
        raise StateFormatError("A stored client state head lacks its epoch.")
    if state.stream is not None:
        fields = [meta.get(name) for name in ("start", "rows", "dim")]
        if (not all(isinstance(v, int) and v >= 0 for v in fields)
                or state.stream.nn_dist.shape != (meta["rows"],) or state.stream.seen != meta["start"] + meta["rows"]):
            raise StateFormatError("A stored client state head is inconsistent (bag size, distances or counts).")
    return meta, state
