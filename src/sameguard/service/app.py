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

Every query is written to the append-only audit log before it is answered; a request that
cannot be audited is not answered (503). Errors are JSON ``{"detail": "...", "request_id": ...}``
with a 4xx status that says what was wrong: 400 malformed JSON, 401 missing or unknown key, 403 a
forged or wrong proof-of-work, 409 a replayed challenge, 410 an expired one, 413 too large, 415 an
unsupported content type, 422 a body or images that do not validate, 429 rate limited.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from .. import __version__
from ..actions import ChallengeIssuer, PowError, ProofOfWork
from ..guard import Guard
from ..prediction_api import BudgetExceededError
from ..validation import check_images
from .audit import AuditLog
from .db import init_db, make_engine
from .keys import ApiKey, KeyStore
from .ratelimit import TokenBucketLimiter
from .schemas import (
    ChallengeResponse,
    ErrorResponse,
    Health,
    ModelInfo,
    PowInfo,
    PredictJSON,
    PredictResponse,
    RedeemRequest,
)
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["create_app", "ServiceState"]

API_KEY_HEADER = "X-API-Key"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# -- state ----------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sameguard_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("sameguard_http_request_seconds", "HTTP request latency in seconds", ["route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queries = Counter("sameguard_queries", "Queries (images) decided, by action", ["action"],
                               registry=self.registry)
        self.flagged = Counter("sameguard_flagged_queries", "Queries flagged by the detector", registry=self.registry)
        self.pow = Counter("sameguard_pow_challenges", "Proof-of-work challenges by outcome", ["outcome"],
                           registry=self.registry)


@dataclass
class ServiceState:
    """Everything the endpoints use (``app.state.sameguard``)."""

    settings: ServiceSettings
    guard: Guard
    keys: KeyStore
    audit: AuditLog
    issuer: ChallengeIssuer
    limiter: TokenBucketLimiter
    metrics: Metrics
    classes: list[str] | None


# -- request context and body size limit ----------------------------------------------------------
class _BodyTooLarge(Exception):
    """Raised by the limited ``receive`` when the body grows past the limit."""


def _only_body_too_large(exc: BaseException) -> bool:
    if isinstance(exc, _BodyTooLarge):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_body_too_large(e) for e in exc.exceptions)
    return False


class ServiceMiddleware:
    """Pure ASGI middleware: request id, body size limit, metrics and one log line per request.

    * ``X-Request-ID``: taken from the request when it is 1-64 characters of ``[A-Za-z0-9_-]``,
      else a fresh UUID; stored in ``request.state.request_id`` and echoed in the response.
    * Bodies over ``max_bytes`` are refused with 413, from ``Content-Length`` before anything is
      read, or while streaming (chunked bodies).
    * Metrics: requests by method, route template and status; latency by route.
    """

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = int(message["status"]), True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        async def reply(code: int, detail: str) -> None:
            await JSONResponse({"detail": detail, "request_id": rid}, status_code=code)(scope, receive, send_with_id)

        length = headers.get(b"content-length")
        seen = 0
        limit = self.max_bytes

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        try:
            declared = None if length is None else int(length)
        except ValueError:
            declared = -1
        try:
            if declared is not None and declared < 0:
                await reply(400, "The Content-Length header is not a non-negative integer.")
            elif declared is not None and declared > limit:
                await reply(413, f"The request body is {declared} bytes; this service accepts at most {limit} bytes.")
            else:
                try:
                    await self.app(scope, limited_receive, send_with_id)
                except BaseException as exc:
                    if not _only_body_too_large(exc) or status["started"]:
                        raise
                    await reply(413, f"The request body exceeds {limit} bytes, the most this service accepts.")
        finally:
            elapsed = time.perf_counter() - start
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "?")
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(elapsed)
            logger.info("%s %s -> %d in %.1f ms (client %s, request %s)", method, path, status["code"],
                        1000 * elapsed, scope["state"].get("client_name", "-"), rid)


# -- helpers --------------------------------------------------------------------------------------
def _error(status: int, detail: str, request: Request | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", None) if request is not None else None
    return JSONResponse({"detail": detail, "request_id": rid}, status_code=status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + "."


def _answer_body(guard: Guard, verdict: Any, output: str, request_id: str) -> dict[str, Any]:
    refused = verdict.refused.tolist()
    if output == "labels":
        labels = verdict.probabilities.argmax(dim=1).tolist()
        predictions: list[Any] = [None if r else int(lab) for lab, r in zip(labels, refused)]
    else:
        rows = verdict.probabilities.tolist()
        predictions = [None if r else row for row, r in zip(rows, refused)]
    return {"request_id": request_id, "output": output, "predictions": predictions,
            "refused": [i for i, r in enumerate(refused) if r]}


_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSON"}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                               "description": "PNG files of the model's height and width (grayscale or RGB)"},
                    "output": {"type": "string", "enum": ["probabilities", "labels"]},
                },
                "required": ["images"],
            }},
        },
    },
}

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 410, 413, 415, 422, 429, 503)}


# -- the factory ----------------------------------------------------------------------------------
def create_app(settings: ServiceSettings | None = None, *, guard: Guard | None = None,
               issuer: ChallengeIssuer | None = None) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: the service settings (default: :meth:`ServiceSettings.from_env`).
        guard: a ready guard (tests, embedding); by default it is loaded from ``settings.victim``
            and ``settings.detector`` (see :func:`~sameguard.service.loading.load_guard`). Its
            ``sink`` is chained with the audit log.
        issuer: a proof-of-work challenge issuer (default: one keyed by ``settings.pow_secret``).
    """
    settings = settings if settings is not None else ServiceSettings.from_env()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    if guard is None:
        from .loading import load_guard

        guard = load_guard(settings)
    engine = make_engine(settings.db_url)
    init_db(engine)
    audit = AuditLog(engine, guard.versions)
    previous_sink = guard.sink

    def sink(decisions: tuple) -> None:
        if previous_sink is not None:
            previous_sink(decisions)
        audit.append(decisions)

    guard.sink = sink
    if issuer is None:
        secret = settings.pow_secret.get_secret_value().encode() if settings.pow_secret is not None else None
        issuer = ChallengeIssuer(secret, ttl_s=settings.pow_ttl_s)
    if settings.max_batch > settings.rate_burst:
        logger.warning("max_batch (%d) exceeds the rate limit's burst (%d): larger batches will be refused",
                       settings.max_batch, settings.rate_burst)
    classes = getattr(guard.victim, "classes", None)
    state = ServiceState(settings=settings, guard=guard, keys=KeyStore(engine, cache_s=settings.key_cache_s),
                         audit=audit, issuer=issuer,
                         limiter=TokenBucketLimiter(settings.rate_per_second, settings.rate_burst),
                         metrics=Metrics(), classes=list(classes) if classes is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("sameguard service up: policy %s, threshold %s, output %s", guard.policy.name, guard.threshold,
                    guard.output)
        yield
        engine.dispose()

    app = FastAPI(
        title="sameguard",
        version=__version__,
        description="An image classifier protected against model extraction by SAME (Xie et al., AAAI 2024) "
                    "and an action policy (reject, adaptive misinformation, calibrated proof-of-work). Images are "
                    "float32 (N, C, H, W) in [-1, 1]. Send the API key in the X-API-Key header.",
        lifespan=lifespan,
    )
    app.state.sameguard = state
    api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="an API key from "
                                  "'sameguard keys create'")

    app.add_middleware(ServiceMiddleware, max_bytes=settings.max_request_bytes, metrics=state.metrics)

    # -- error handlers --------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "Malformed JSON in the request body: " + "; ".join(
                str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors) + ".", request)
        return _error(422, _validation_message(list(errors)), request)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), request, headers=getattr(exc, "headers", None))

    # -- auth ------------------------------------------------------------------------------------
    def require_key(request: Request, token: str | None = Security(api_key_header)) -> ApiKey:
        if not token:
            raise HTTPException(401, f"Missing API key: send it in the {API_KEY_HEADER} header.",
                                headers={"WWW-Authenticate": "ApiKey"})
        key = state.keys.verify(token)
        if key is None:
            raise HTTPException(401, "Unknown or revoked API key.", headers={"WWW-Authenticate": "ApiKey"})
        request.state.client_name = key.name
        return key

    # -- parsing ---------------------------------------------------------------------------------
    c, h, w = guard.image_shape

    def _check_batch_size(n: int) -> None:
        if n > settings.max_batch:
            raise HTTPException(413, f"The batch has {n} images; this service accepts at most {settings.max_batch} "
                                     "per request.")

    def _decode_json(raw: bytes) -> tuple[torch.Tensor, str | None]:
        try:
            obj = json.loads(raw)
        except RecursionError:
            raise HTTPException(400, "Malformed JSON in the request body: it is nested too deeply.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "the body is not UTF-8"
            raise HTTPException(400, f"Malformed JSON in the request body: {msg}{where}.") from None
        try:
            body = PredictJSON.model_validate(obj)
        except ValidationError as exc:
            raise HTTPException(422, _validation_message(exc.errors())) from None
        if body.b64 is not None:
            shape = tuple(int(s) for s in body.shape)  # type: ignore[union-attr]
            _check_batch_size(shape[0])
            if shape[1:] != (c, h, w):
                raise HTTPException(422, f"shape must be (N, {c}, {h}, {w}) for this model, got {list(shape)}.")
            try:
                data = base64.b64decode(body.b64, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(422, "b64 is not valid base64.") from None
            expected = math.prod(shape) * 4
            if len(data) != expected:
                raise HTTPException(422, f"b64 holds {len(data)} bytes but shape {list(shape)} of float32 needs "
                                         f"{expected}.")
            array = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
        else:
            try:
                array = np.asarray(body.instances)
            except (ValueError, TypeError):
                raise HTTPException(422, f"instances must be a rectangular nested array of numbers of shape "
                                         f"(N, {c}, {h}, {w}).") from None
            if array.dtype.kind not in "fiu" or array.dtype == object:
                raise HTTPException(422, f"instances must be a rectangular nested array of numbers of shape "
                                         f"(N, {c}, {h}, {w}); found non-numeric or ragged values.")
            if array.ndim >= 1:
                _check_batch_size(int(array.shape[0]))
            array = array.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(array)), body.output

    async def _decode_multipart(request: Request) -> tuple[torch.Tensor, str | None]:
        from PIL import Image, UnidentifiedImageError

        from ..data.transforms import to_model_range

        try:
            form = await request.form(max_files=settings.max_batch + 1, max_fields=16)
        except HTTPException:
            raise
        except Exception as exc:
            raise HTTPException(400, f"Malformed multipart body: {exc}") from None
        files = form.getlist("images")
        output = form.get("output")
        if output is not None and not isinstance(output, str):
            raise HTTPException(422, "The 'output' form field must be text: 'probabilities' or 'labels'.")
        if not files:
            raise HTTPException(422, "The multipart body has no 'images' field: upload one or more PNG files as "
                                     "'images'.")
        _check_batch_size(len(files))
        mode = {1: "L", 3: "RGB"}.get(c)
        if mode is None:
            raise HTTPException(422, f"PNG uploads are supported for 1- or 3-channel models, not {c} channels.")
        arrays = []
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise HTTPException(422, f"'images' item {i} is a text field; upload PNG files.")
            data = await f.read()
            try:
                with Image.open(io.BytesIO(data)) as img:
                    if img.format != "PNG":
                        raise HTTPException(422, f"'images' item {i} ({f.filename!r}) is {img.format}, not PNG.")
                    if img.size != (w, h):
                        raise HTTPException(422, f"'images' item {i} ({f.filename!r}) is {img.size[0]}x{img.size[1]} "
                                                 f"pixels; the model expects {w}x{h}.")
                    arrays.append(np.asarray(img.convert(mode), dtype=np.uint8))
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
                raise HTTPException(422, f"'images' item {i} ({f.filename!r}) is not a readable PNG image.") from None
        pixels = np.stack(arrays)
        if output is not None and output not in ("probabilities", "labels"):
            raise HTTPException(422, f"output must be 'probabilities' or 'labels', got {output!r}.")
        return to_model_range(pixels), output

    # -- endpoints -------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness: the service is up and its models are loaded."""
        return {"status": "ok", "policy": guard.policy.name, "versions": guard.versions}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    def metrics() -> PlainTextResponse:
        """Prometheus metrics (text exposition format)."""
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS, tags=["predict"])
    def model_info(key: ApiKey = Depends(require_key)) -> dict[str, Any]:
        """What the service serves: input shape, classes, output kind and limits."""
        return {"image_shape": list(guard.image_shape), "num_classes": guard.num_classes, "classes": state.classes,
                "output": guard.output, "policy": guard.policy.name, "max_batch": settings.max_batch,
                "max_request_bytes": settings.max_request_bytes, "versions": guard.versions}

    @app.post("/v1/predict", response_model=PredictResponse, tags=["predict"], openapi_extra=_PREDICT_OPENAPI,
              responses={202: {"model": ChallengeResponse, "description": "proof-of-work due"}, **_ERRORS})
    async def predict(request: Request, key: ApiKey = Depends(require_key)) -> Any:
        """Classify a batch of images (JSON or PNG upload); see the module documentation."""
        rid = request.state.request_id
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            x, output = _decode_json(await request.body())
        elif ctype == "multipart/form-data":
            x, output = await _decode_multipart(request)
        else:
            raise HTTPException(415, f"Unsupported content type {ctype or '(none)'!r}: send application/json or "
                                     "multipart/form-data with PNG files in 'images'.")
        try:
            x = check_images(x, guard.image_shape, name="images")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        _check_batch_size(int(x.shape[0]))
        output = output or guard.output
        if guard.output == "labels" and output == "probabilities":
            raise HTTPException(422, "This service answers top-1 labels only; ask for output='labels'.")
        wait = state.limiter.take(key.name, int(x.shape[0]))
        if wait == math.inf:
            raise HTTPException(413, f"The batch of {x.shape[0]} images exceeds the rate limit's burst of "
                                     f"{settings.rate_burst} images; send smaller batches.")
        if wait > 0:
            raise HTTPException(429, f"Rate limit exceeded for this API key ({settings.rate_per_second:g} images/s, "
                                     f"burst {settings.rate_burst}); retry in {wait:.2f} s.",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            verdict = await run_in_threadpool(guard.protect, x, key.name, request_id=rid)
        except SQLAlchemyError:
            logger.exception("Audit log write failed for request %s; the query was not answered", rid)
            raise HTTPException(503, "The audit log is unavailable, so the query was not answered; retry later.") from None
        except BudgetExceededError as exc:
            raise HTTPException(429, str(exc)) from None
        for d in verdict.decisions:
            state.metrics.queries.labels(d.action).inc()
        n_flagged = sum(d.flagged for d in verdict.decisions)
        if n_flagged:
            state.metrics.flagged.inc(n_flagged)
        body = _answer_body(guard, verdict, output, rid)
        if verdict.work_bits > 0:
            resource = hashlib.sha256("".join(d.input_sha256 for d in verdict.decisions).encode()).hexdigest()
            try:
                challenge = state.issuer.issue(key.name, verdict.work_bits, payload=body, resource=resource)
            except PowError as exc:
                state.metrics.pow.labels("refused_too_many").inc()
                raise HTTPException(exc.status, str(exc)) from None
            state.metrics.pow.labels("issued").inc()
            await run_in_threadpool(state.audit.pow_event, key.name, "issued", challenge_id=challenge.id,
                                    request_id=rid, bits=challenge.bits)
            return JSONResponse({"request_id": rid, "challenge": challenge.to_dict(), "redeem": "/v1/pow/redeem"},
                                status_code=202)
        return JSONResponse(body)

    @app.post("/v1/pow/redeem", response_model=PredictResponse, tags=["proof-of-work"], responses=_ERRORS)
    def pow_redeem(body: RedeemRequest, request: Request, key: ApiKey = Depends(require_key)) -> Any:
        """Redeem a solved challenge for the answers it holds (each challenge once, before it expires)."""
        try:
            challenge, payload = state.issuer.redeem(body.challenge, body.signature, body.nonce, key.name)
        except PowError as exc:
            outcome = type(exc).__name__.replace("Challenge", "").replace("Error", "").lower() or "refused"
            state.metrics.pow.labels(outcome).inc()
            state.audit.pow_event(key.name, outcome)
            raise HTTPException(exc.status, str(exc)) from None
        state.metrics.pow.labels("redeemed").inc()
        state.audit.pow_event(key.name, "redeemed", challenge_id=challenge.id, request_id=payload["request_id"],
                              bits=challenge.bits)
        return JSONResponse(payload)

    @app.get("/v1/pow/info", response_model=PowInfo, tags=["proof-of-work"])
    def pow_info() -> dict[str, Any]:
        """How proof-of-work is priced on this service (whether it is on, the puzzle, the calibration)."""
        action = guard.policy.action
        enabled = isinstance(action, ProofOfWork)
        return {"enabled": enabled, "scheme": "sg-pow-1", "hash": "sha256", "ttl_s": state.issuer.ttl_s,
                "calibration": action.describe() | {"benign": action.calibration_} if enabled else None}

    return app
