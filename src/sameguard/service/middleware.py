"""The service's ASGI middleware: request ids, the body size limit, metrics and one log line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from .connection_balance import should_close
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

__all__ = ["ServiceMiddleware", "REQUEST_ID_HEADER", "BodyTooLarge"]

REQUEST_ID_HEADER = "X-Request-ID"
#: The response header that echoes the client's own ``X-Request-ID`` (when it sent a valid one).
CLIENT_REQUEST_ID_HEADER = "X-Client-Request-ID"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BodyTooLarge(Exception):
    """Raised by the limited ``receive`` when the body grows past the limit (the middleware answers 413).

    Code that reads the body and catches broad exceptions (the multipart parser) must re-raise it.
    """


def _only_body_too_large(exc: BaseException) -> bool:
    if isinstance(exc, BodyTooLarge):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_body_too_large(e) for e in exc.exceptions)
    return False


def new_request_id() -> str:
    """A fresh request id, assigned by the server: a random UUID (32 hex characters), unique per request."""
    return uuid.uuid4().hex


def client_request_id_from(headers: dict[bytes, bytes]) -> str | None:
    """The client's ``X-Request-ID`` when it is 1-64 characters of ``[A-Za-z0-9_-]``, else ``None``.

    It is only recorded beside the server's id (audit column ``client_request_id``) and echoed in
    ``X-Client-Request-ID``: a client cannot choose the id its queries are audited under.
    """
    incoming = headers.get(b"x-request-id", b"").decode("latin-1")
    return incoming if _REQUEST_ID_RE.fullmatch(incoming) else None  # match() let "id\n" through (`$`)


def declared_length(headers: dict[bytes, bytes]) -> int | None:
    """``Content-Length`` as an integer, ``None`` when absent, ``-1`` when it is not an integer."""
    length = headers.get(b"content-length")
    try:
        return None if length is None else int(length)
    except ValueError:
        return -1


class ServiceMiddleware:
    """Pure ASGI middleware: request id, body size limit, metrics and one log line per request.

    * ``X-Request-ID``: a fresh UUID per request, assigned here (``request.state.request_id``, the
      audit log's ``request_id``, the response's ``X-Request-ID``). A client's own ``X-Request-ID``
      (1-64 characters of ``[A-Za-z0-9_-]``) is kept beside it (``request.state.client_request_id``,
      audit column ``client_request_id``) and echoed as ``X-Client-Request-ID``.
    * Bodies over ``max_bytes`` are refused with 413, from ``Content-Length`` before anything is
      read, or while streaming (chunked bodies).
    * Metrics: requests by method, route template and status; latency by route.
    * ``Connection: close`` on a response when this worker's connection balancer asks for it
      (:func:`~sameguard.service.connection_balance.should_close`; ``serve --workers N`` only).
    """

    def __init__(self, app: Any, max_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid, client_rid = new_request_id(), client_request_id_from(headers)
        scope.setdefault("state", {}).update(request_id=rid, client_request_id=client_rid)
        extra = [(b"x-request-id", rid.encode("latin-1"))]
        if client_rid is not None:
            extra.append((b"x-client-request-id", client_rid.encode("latin-1")))
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = int(message["status"]), True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + extra
                if should_close():  # this worker holds more than its share of the connections: shed this one
                    message["headers"].append((b"connection", b"close"))
                    self.metrics.connections_shed.inc()
            await send(message)

        try:
            await self._within_limit(scope, receive, send_with_id, declared_length(headers), status)
        finally:
            self._record(scope, status["code"], time.perf_counter() - start, rid)

    async def _within_limit(self, scope: dict, receive: Any, send: Any, declared: int | None, status: dict) -> None:
        """Run the app unless the body is (declared or found while reading) over the limit."""
        limit = self.max_bytes

        async def reply(code: int, detail: str) -> None:
            body = {"detail": detail, "request_id": scope["state"]["request_id"]}
            await JSONResponse(body, status_code=code)(scope, receive, send)

        if declared is not None and declared < 0:
            await reply(400, "The Content-Length header is not a non-negative integer.")
            return
        if declared is not None and declared > limit:
            await reply(413, f"The request body is {declared} bytes; this service accepts at most {limit} bytes.")
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BaseException as exc:
            if not _only_body_too_large(exc) or status["started"]:
                raise
            await reply(413, f"The request body exceeds {limit} bytes, the most this service accepts.")

    def _record(self, scope: dict, code: int, elapsed: float, rid: str) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        method = scope.get("method", "?")
        self.metrics.observe_request(method, path, code, elapsed)
        logger.info("%s %s -> %d in %.1f ms (client %s, request %s)", method, path, code, 1000 * elapsed,
                    scope["state"].get("client_name", "-"), rid)
