"""The HTTP service: a FastAPI app serving a :class:`~sameguard.guard.Guard` behind API keys.

Endpoints (the OpenAPI document is at ``/openapi.json``, interactive docs at ``/docs``):

* ``POST /v1/predict`` (``X-API-Key``): a batch of images as JSON (``{"instances": [...]}``, a
  nested ``(N, C, H, W)`` array in ``[-1, 1]``, or ``{"b64": ..., "shape": [N, C, H, W]}``,
  little-endian float32) or PNG files uploaded as ``multipart/form-data`` field ``images``.
  200: probabilities (or labels) per image, ``null`` for refused images. 202: a proof-of-work
  challenge; the answers are released by ``POST /v1/pow/redeem``.
* ``POST /v1/pow/redeem`` (``X-API-Key``): ``{"challenge", "signature", "nonce"}`` -> the held
  answers, once. ``GET /v1/pow/info``: how proof-of-work is priced.
* ``GET /v1/model`` (``X-API-Key``): image shape, classes, output, limits.
* ``GET /healthz``; ``GET /metrics`` (Prometheus text format).
* ``GET /v1/admin/alarms``, ``POST /v1/admin/clients/{client}/clear-alarm`` (operator token,
  ``Authorization: Bearer``): the per-client alarms (``--alarms``) and clearing one.

Every query is written to the append-only audit log before it is answered; a request that
cannot be audited is not answered (503). Errors are JSON ``{"detail": "...", "request_id": ...}``
with a 4xx status that says what was wrong: 400 malformed JSON, 401 missing or unknown key, 403 a
forged or wrong proof-of-work (or, with the reject policy, an API key alarmed as an extraction
attacker: ``{"error": "client_alarmed", ...}``), 409 a replayed challenge, 410 an expired one, 413 too large, 415 an
unsupported content type, 422 a body or images that do not validate, 429 rate limited.

Layout (FastAPI's "bigger applications"): this module is the factory. The endpoints are in
:mod:`.routers` (``ops``, ``predict``, ``pow``, ``admin``); what they depend on (the state, the API key, the
decoded and rate-limited batch, the audit log) in :mod:`.dependencies`; body decoding in
:mod:`.decoding`; the request-id, body-size and metrics middleware in :mod:`.middleware`; the
Prometheus metrics in :mod:`.metrics`; error answers in :mod:`.errors`; the parts in one
:class:`~.state.ServiceState` (``app.state.sameguard``); proof-of-work challenges in
:mod:`.challenges`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .. import __version__
from ..guard import Guard
from .challenges import ChallengeIssuer
from .errors import install_error_handlers
from .gc_pauses import freeze_startup_objects
from .middleware import ServiceMiddleware
from .ratelimit import RateLimitMiddleware
from .routers import ROUTERS
from .schemas import predict_json_schema
from .settings import ServiceSettings
from .state import ServiceState, build_state

logger = logging.getLogger(__name__)

__all__ = ["create_app", "ServiceState"]

DESCRIPTION = ("An image classifier protected against model extraction by SAME (Xie et al., AAAI 2024) and an "
               "action policy (reject, adaptive misinformation, calibrated proof-of-work). Images are float32 "
               "(N, C, H, W) in [-1, 1]. Send the API key in the X-API-Key header.")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Log the policy, freeze the start-up objects for the garbage collector and time its collections
    (``/metrics``) at start-up; close the database connections (and undo the rest) at shutdown."""
    state: ServiceState = app.state.sameguard
    guard = state.guard
    frozen = freeze_startup_objects() if state.settings.gc_freeze else 0
    state.metrics.watch_gc()
    logger.info("sameguard service up: policy %s, threshold %s, output %s (%d start-up objects frozen for the "
                "garbage collector)", guard.policy_name, guard.threshold, guard.output, frozen)
    try:
        yield
    finally:
        state.metrics.unwatch_gc()
        if frozen:
            gc.unfreeze()
        state.audit.engine.dispose()
        if state.store is not None:
            state.store.close()


def create_app(settings: ServiceSettings | None = None, *, guard: Guard | None = None,
               issuer: ChallengeIssuer | None = None) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: the service settings (default: :meth:`ServiceSettings.from_env`).
        guard: a ready guard (tests, embedding); by default it is loaded from ``settings.victim``
            and ``settings.detector`` (see :func:`~sameguard.service.loading.load_guard`).
        issuer: a proof-of-work challenge issuer (default: one keyed by ``settings.pow_secret``).
    """
    settings = settings if settings is not None else ServiceSettings.from_env()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    state = build_state(settings, guard=guard, issuer=issuer)
    app = FastAPI(title="sameguard", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.sameguard = state
    app.add_middleware(RateLimitMiddleware, state=state)  # inside ServiceMiddleware: refusals get request ids
    app.add_middleware(ServiceMiddleware, max_bytes=settings.max_request_bytes, metrics=state.metrics)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_openapi(app, tuple(state.guard.image_shape), settings.max_batch)
    return app


def install_openapi(app: FastAPI, image_shape: tuple[int, ...], max_batch: int | None = None) -> None:
    """Complete the OpenAPI document: ``/v1/predict`` reads its body itself, so its JSON schema
    (``#/components/schemas/PredictJSON``, with examples of the served ``image_shape``) is added here."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["PredictJSON"] = \
                predict_json_schema(image_shape, max_batch)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
