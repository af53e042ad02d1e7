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

Refusing must cost the server little, or a flood of refused requests slows every other key down:
:class:`RateLimitMiddleware` charges the request limit before FastAPI routes the request or reads
its body, and turns a prediction away at once when the key has no image left in its window; only
what passes goes on to decoding. With the in-memory store it looks at the window itself (a few
microseconds); with a shared store (Redis), where that look would be one more round trip on every
request, each worker process remembers instead the keys whose image window a refusal found empty, for
that refusal's wait and at most one image's share of the window (``window_s / burst``), and turns
their predictions away until then (:meth:`RateLimiter.exhausted`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

from anyio import to_thread

from .keys import ApiKey
from .store import MemoryServiceStore, RateLimit, ServiceStore

__all__ = ["RateLimiter", "RateLimitMiddleware", "KEYED_PATHS", "PREDICT_PATH"]

#: Paths that take an API key (and so count against its request limit).
KEYED_PATHS = frozenset({"/v1/predict", "/v1/pow/redeem", "/v1/model"})
PREDICT_PATH = "/v1/predict"


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
        self._empty_until: dict[str, float] = {}  # client -> time.monotonic() until which its image window is empty
        self._lock = threading.Lock()

    def take_request(self, client: str) -> float:
        """Charge one request to ``client``: 0 when granted, else the seconds to wait."""
        return self.store.hit(self.requests, client, 1)

    def take(self, client: str, n: int = 1) -> float:
        """Charge ``n`` images to ``client``: 0 when granted, ``math.inf`` when ``n`` exceeds the
        burst (never grantable), else the seconds to wait (nothing charged).

        With a shared store, a refusal that finds the window empty (not a single image left) is
        remembered in this process for :meth:`exhausted`."""
        wait = self.store.hit(self.images, client, int(n))
        if 0 < wait < math.inf and self.store.shared and self.store.remaining(self.images, client) < 1:
            until = time.monotonic() + min(wait, self.images.window_s / self.images.burst)
            with self._lock:
                if len(self._empty_until) >= 10_000:  # bounded: expired entries go first, then all
                    now = time.monotonic()
                    self._empty_until = {c: t for c, t in self._empty_until.items() if t > now}
                    if len(self._empty_until) >= 10_000:
                        self._empty_until.clear()
                self._empty_until[client] = until
        return wait

    def exhausted(self, client: str) -> bool:
        """Whether ``client``'s image window is known to be empty, to turn a prediction away before its
        body is read. In memory: the window is looked at (exact, microseconds). With a shared store:
        whether a refusal in this process found it empty less than its wait ago (no round trip; a key
        emptied by granted requests, or by another worker, is turned away by the image charge itself,
        after decoding). A request it turns away came before the ``Retry-After`` of the refusal that
        found the window empty."""
        if not self.store.shared:
            return self.store.remaining(self.images, client) < 1
        with self._lock:
            until = self._empty_until.get(client)
            if until is not None and until <= time.monotonic():  # the wait is over: forget it
                del self._empty_until[client]
                until = None
        return until is not None


class RateLimitMiddleware:
    """Pure ASGI middleware: the per-key request limit (and an empty image window) answered early.

    For a request to :data:`KEYED_PATHS` with a valid ``X-API-Key``, one request is charged before
    anything else happens; over the limit, or (for ``/v1/predict``) with no image left in the
    key's window, the answer is 429 with ``Retry-After`` and the body is never read. Requests
    without a valid key go on (the endpoint answers 401). ``scope["state"]["verified_key"]``, the token
    and its :class:`~sameguard.service.keys.ApiKey`, tells
    :func:`~sameguard.service.dependencies.require_key` that this request's key was verified and
    charged already (one key check and one charge per request, even with a shared store).

    Args:
        app: the ASGI app.
        state: the :class:`~sameguard.service.state.ServiceState` (keys and limiter).
    """

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in KEYED_PATHS:
            await self.app(scope, receive, send)
            return
        token = None
        for name, value in scope.get("headers") or ():
            if name == b"x-api-key":
                token = value.decode("latin-1")
                break
        if not token:
            refusal = None
        elif self.state.limiter.store.shared:  # network round trips: off the event loop
            refusal = await to_thread.run_sync(self._check, token, scope["path"])
        else:  # memory and the key cache: microseconds, cheaper than a thread hop
            refusal = self._check(token, scope["path"])
        if not isinstance(refusal, tuple):
            if refusal is not None:  # the key, verified and charged
                scope.setdefault("state", {})["verified_key"] = (token, refusal)
            await self.app(scope, receive, send)
            return
        detail, wait = refusal
        body = json.dumps({"detail": detail, "request_id": scope.get("state", {}).get("request_id")}).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(max(1, math.ceil(wait))).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _check(self, token: str, path: str) -> tuple[str, float] | ApiKey | None:
        """``(detail, wait)`` to refuse; else the verified, charged key (``None``: no valid key, the
        endpoint answers 401)."""
        key = self.state.keys.verify(token)
        if key is None:
            return None
        limiter: RateLimiter = self.state.limiter
        wait = limiter.take_request(key.name)
        if wait > 0:
            return (f"Request rate limit exceeded for this API key ({limiter.requests.burst} requests per "
                    f"{limiter.requests.window_s} s); retry in {wait:.2f} s.", wait)
        if path == PREDICT_PATH and limiter.exhausted(key.name):
            wait = limiter.images.window_s / limiter.images.burst
            return (f"Rate limit exceeded for this API key ({limiter.images.burst} images per "
                    f"{limiter.images.window_s} s, {limiter.images.rate:g} images/s); retry in {wait:.2f} s.", wait)
        return key
