"""Errors as the service answers them: JSON ``{"detail": "...", "request_id": ...}`` with a 4xx/503 status.

:func:`install_error_handlers` turns FastAPI's request validation errors into 400 (malformed
JSON) or 422 (a body that does not validate) with one readable sentence, and every
:class:`~fastapi.HTTPException` into the same JSON shape. :data:`ERROR_RESPONSES` documents them
in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import ErrorResponse

__all__ = ["ERROR_RESPONSES", "AUDIT_UNAVAILABLE", "error_response", "validation_message", "install_error_handlers"]

#: The error statuses of the API, for ``responses=`` in the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 410, 413, 415, 422, 429, 503)
}

#: The 503 answer when the audit log cannot be written: the query is not answered (fail closed).
AUDIT_UNAVAILABLE = "The audit log is unavailable, so the query was not answered; retry later."


#: Longest ``detail`` sent back; longer ones (a message quoting a huge input) are cut, never echoed whole.
MAX_DETAIL_CHARS = 500


def error_response(status: int, detail: str, request: Request | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error answer, with the request id the middleware assigned (``detail`` cut to 500 characters)."""
    rid = getattr(request.state, "request_id", None) if request is not None else None
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS - 16] + " ... (cut short)"
    return JSONResponse({"detail": detail, "request_id": rid}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One sentence from pydantic's error list (at most 10 errors): ``"Invalid request: field: msg; ...".``"""
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + "."


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for malformed JSON, 422 for a body that does not validate."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "Malformed JSON in the request body: " + "; ".join(
            str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors) + ".", request)
    return error_response(422, validation_message(list(errors)), request)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Any :class:`HTTPException` as ``{"detail", "request_id"}``, keeping its headers (``Retry-After``, ...)."""
    return error_response(exc.status_code, str(exc.detail), request, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Register the service's error handlers on ``app``."""
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    # Starlette's class is the base of FastAPI's: this also covers the framework's own 400/404/405.
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
