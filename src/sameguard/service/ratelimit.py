"""Per-key rate limits: every request a key sends, and every image it asks about.

Two limits per API key, both kept in the service's state store (:mod:`.store`: in memory for one
process, Redis for several workers, so a burst of ``B`` lets ``B`` through however many workers
share it) and counted by the ``limits`` package (sliding-window counters, atomic in Redis):

* **requests**: charged once per request as soon as the key is known, *before* the body is read
  or validated, so malformed or oversized requests cost the key as much as good ones;
* **images** (queries): a batch of ``N`` images takes ``N`` units or is refused whole.

A refusal is HTTP 429 with ``Retry-After``; a batch larger than the image burst can never be
granted (413). A limit of ``burst`` per ``ceil(burst / rate)`` seconds is used, i.e. at most
``burst`` at once and ``rate`` per second on average.
"""

from __future__ import annotations

from .store import MemoryServiceStore, RateLimit, ServiceStore

__all__ = ["RateLimiter"]


class RateLimiter:
    """The per-key request and image limits.

    Args:
        images_per_second, image_burst: the image (query) limit.
        requests_per_second, request_burst: the request limit.
        store: where the counters live (default: a new in-memory store).
    """

    def __init__(self, images_per_second: float, image_burst: int, requests_per_second: float, request_burst: int,
                 *, store: ServiceStore | None = None) -> None:
        self.images = RateLimit("img", images_per_second, image_burst)
        self.requests = RateLimit("req", requests_per_second, request_burst)
        self.store: ServiceStore = store if store is not None else MemoryServiceStore()

    def take_request(self, client: str) -> float:
        """Charge one request to ``client``: 0 when granted, else the seconds to wait."""
        return self.store.hit(self.requests, client, 1)

    def take(self, client: str, n: int = 1) -> float:
        """Charge ``n`` images to ``client``: 0 when granted, ``math.inf`` when ``n`` exceeds the
        burst (never grantable), else the seconds to wait (nothing charged)."""
        return self.store.hit(self.images, client, int(n))
