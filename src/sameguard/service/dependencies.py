"""FastAPI dependencies: the service state, API-key auth, the decoded and rate-limited query, the audit log.

Endpoints declare what they need with the ``Annotated`` aliases::

    async def predict(request: Request, key: ApiKeyDep, batch: RateLimitedBatchDep, state: StateDep,
                      audit: AuditDep) -> ...

FastAPI resolves them in that order, so a request is authenticated (401) and charged to its key's
request limit (429) before its body is read and decoded (400/413/415/422), and decoded before the
key's image limit is charged (429).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import Depends, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader

from ..validation import check_images
from .decoding import check_batch_size, decode_request
from .errors import AUDIT_UNAVAILABLE
from .keys import ApiKey
from .state import ServiceState

logger = logging.getLogger(__name__)

__all__ = [
    "API_KEY_HEADER",
    "get_state",
    "require_key",
    "read_batch",
    "rate_limited_batch",
    "get_audit",
    "ImageBatch",
    "RequestAudit",
    "StateDep",
    "ApiKeyDep",
    "BatchDep",
    "RateLimitedBatchDep",
    "AuditDep",
    "PredictInputs",
    "predict_inputs",
    "PredictDep",
]

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="an API key from 'sameguard keys create'")


async def get_state(request: Request) -> ServiceState:
    """The app's :class:`~sameguard.service.state.ServiceState`."""
    return request.app.state.sameguard


StateDep = Annotated[ServiceState, Depends(get_state)]


async def require_key(request: Request, state: StateDep,
                      token: Annotated[str | None, Security(api_key_header)] = None) -> ApiKey:
    """The caller's active API key from the ``X-API-Key`` header; 401 when missing, unknown or revoked.

    Every request of a known key is charged to its request limit before anything else is read
    (429 when over it), so invalid requests count as much as valid ones: by
    :class:`~sameguard.service.ratelimit.RateLimitMiddleware`, or here when the app runs without it.

    Runs on the event loop (no thread hop): the key is usually in the key cache and the limits are
    in memory; a cache miss or a Redis store costs the loop a fraction of a millisecond.
    """
    if not token:
        raise HTTPException(401, f"Missing API key: send it in the {API_KEY_HEADER} header.",
                            headers={"WWW-Authenticate": "ApiKey"})
    verified = request.scope.get("state", {}).get("verified_key")
    if verified is not None and verified[0] == token:  # RateLimitMiddleware verified and charged it already
        request.state.client_name = verified[1].name
        return verified[1]
    key = state.keys.verify(token)
    if key is None:
        raise HTTPException(401, "Unknown or revoked API key.", headers={"WWW-Authenticate": "ApiKey"})
    request.state.client_name = key.name
    wait = state.limiter.take_request(key.name)
    if wait > 0:
        limit = state.limiter.requests
        raise HTTPException(429, f"Request rate limit exceeded for this API key ({limit.burst} requests per "
                                 f"{limit.window_s} s); retry in {wait:.2f} s.",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return key


ApiKeyDep = Annotated[ApiKey, Depends(require_key)]


@dataclass(frozen=True)
class ImageBatch:
    """A decoded, validated batch: ``images`` float32 ``(N, C, H, W)`` in ``[-1, 1]`` and the ``output`` wanted."""

    images: torch.Tensor
    output: str


async def read_batch(request: Request, state: StateDep) -> ImageBatch:
    """Decode the body (:mod:`~sameguard.service.decoding`), check the images and the output asked for."""
    guard, max_batch = state.guard, state.settings.max_batch
    x, output = await decode_request(request, guard.image_shape, max_batch)
    try:
        x = check_images(x, guard.image_shape, name="images")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    check_batch_size(int(x.shape[0]), max_batch)
    output = output or guard.output
    if guard.output == "labels" and output == "probabilities":
        raise HTTPException(422, "This service answers top-1 labels only; ask for output='labels'.")
    return ImageBatch(images=x, output=output)


BatchDep = Annotated[ImageBatch, Depends(read_batch)]


async def rate_limited_batch(key: ApiKeyDep, batch: BatchDep, state: StateDep) -> ImageBatch:
    """The batch, once the key's image limit paid one unit per image (413 over the burst, 429 over the limit)."""
    n = int(batch.images.shape[0])
    limit = state.limiter.images
    wait = state.limiter.take(key.name, n)
    if wait == math.inf:
        raise HTTPException(413, f"The batch of {n} images exceeds the rate limit's burst of {limit.burst} "
                                 "images; send smaller batches.")
    if wait > 0:
        raise HTTPException(429, f"Rate limit exceeded for this API key ({limit.burst} images per {limit.window_s} s, "
                                 f"{limit.rate:g} images/s); retry in {wait:.2f} s.",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return batch


RateLimitedBatchDep = Annotated[ImageBatch, Depends(rate_limited_batch)]


class RequestAudit:
    """The audit log for one request: writes run in the thread pool and fail closed.

    Any failure to write (database down, locked, full) is logged and answered 503
    (:data:`~sameguard.service.errors.AUDIT_UNAVAILABLE`): the caller must write before it answers,
    so nothing is answered without its audit row.
    """

    def __init__(self, state: ServiceState, request_id: str, client_request_id: str | None = None) -> None:
        self.log = state.audit
        self.request_id = request_id
        self.client_request_id = client_request_id

    def decisions_now(self, decisions: Iterable[Any], alarms: Iterable[Any] = ()) -> None:
        """One row per :class:`~sameguard.guard.Decision`, and the alarm events raised, in one transaction,
        on the calling thread (a worker thread, never the event loop)."""
        self._write_now(self.log.append, tuple(decisions), tuple(alarms), client_request_id=self.client_request_id)

    async def alarm_event(self, event: Any) -> None:
        """An alarm event on its own (an operator clearing an alarm)."""
        await self._write(self.log.alarm_event, event)

    async def pow_event(self, client: str, outcome: str, **fields: Any) -> None:
        """A proof-of-work event (``issued``, ``redeemed``, or why a redemption was refused)."""
        await self._write(self.log.pow_event, client, outcome, **fields)

    async def _write(self, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        await run_in_threadpool(self._write_now, write, *args, **kwargs)

    def _write_now(self, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            write(*args, **kwargs)
        except Exception:
            logger.exception("Audit log write failed for request %s; the query was not answered", self.request_id)
            raise HTTPException(503, AUDIT_UNAVAILABLE) from None


async def get_audit(request: Request, state: StateDep) -> RequestAudit:
    """The audit log bound to this request's id (and the client's own ``X-Request-ID``, if any)."""
    return RequestAudit(state, request.state.request_id, getattr(request.state, "client_request_id", None))


AuditDep = Annotated[RequestAudit, Depends(get_audit)]


@dataclass(frozen=True)
class PredictInputs:
    """What ``POST /v1/predict`` needs: the caller's key, its decoded and charged batch, the service
    state and the request's audit log."""

    key: ApiKey
    batch: ImageBatch
    state: ServiceState
    audit: RequestAudit


async def predict_inputs(request: Request, token: Annotated[str | None, Security(api_key_header)] = None
                         ) -> PredictInputs:
    """:class:`PredictInputs`, resolved exactly as ``ApiKeyDep``, ``RateLimitedBatchDep``, ``StateDep``
    and ``AuditDep`` are (key, then body, then image limit; the same errors), by plain calls: one
    dependency for FastAPI to solve on the hot path instead of a dozen nested ones, whose resolution
    cost more than what they do."""
    state = await get_state(request)
    key = await require_key(request, state, token)
    batch = await rate_limited_batch(key, await read_batch(request, state), state)
    return PredictInputs(key=key, batch=batch, state=state, audit=await get_audit(request, state))


PredictDep = Annotated[PredictInputs, Depends(predict_inputs)]
