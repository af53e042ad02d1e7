"""Operations: ``GET /healthz`` (liveness) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ..dependencies import StateDep
from ..metrics import CONTENT_TYPE_LATEST
from ..schemas import Health

__all__ = ["router"]

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=Health)
def healthz(state: StateDep) -> dict[str, Any]:
    """Liveness: the service is up and its models are loaded."""
    guard = state.guard
    return {"status": "ok", "policy": guard.policy_name, "versions": guard.versions,
            "alarms": None if guard.alarms is None else guard.alarms.describe()}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(state: StateDep) -> PlainTextResponse:
    """Prometheus metrics (text exposition format)."""
    return PlainTextResponse(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
