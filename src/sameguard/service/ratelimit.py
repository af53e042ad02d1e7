"""Per-client token buckets, counted in images (queries), not requests.

A client's bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per second; a
batch of ``N`` images takes ``N`` tokens or is refused whole (HTTP 429 with ``Retry-After``).
State is in memory, per process: with several workers or replicas, put the counters in a shared
store (Redis via the ``limits`` package, for instance).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucketLimiter"]


class TokenBucketLimiter:
    """Token buckets keyed by client.

    Args:
        rate: tokens (images) added per second, positive.
        burst: bucket capacity, at least 1; also the largest batch a client can ever send.
        clock: monotonic seconds (tests pass a fake one).
        max_clients: buckets kept; the least recently used are dropped beyond it (a dropped
            client starts again with a full bucket).
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 100_000) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of images per second, got {rate!r}.")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a positive integer number of images, got {burst!r}.")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, client: str, n: int = 1) -> float:
        """Take ``n`` tokens for ``client``; returns 0 when granted, else the seconds to wait (nothing taken).

        A request larger than ``burst`` can never be granted: ``math.inf`` is returned.
        """
        if n > self.burst:
            return math.inf
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= n:
                self._buckets[client] = (tokens - n, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (n - tokens) / self.rate
            if len(self._buckets) > self._max_clients:
                self._buckets.pop(next(iter(self._buckets)))
        return wait
