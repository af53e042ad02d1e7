"""Proof-of-work: ``POST /v1/pow/redeem`` (a solved challenge for its held answers) and ``GET /v1/pow/info``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from ...actions import ProofOfWork
from ...actions.puzzle import SCHEME
from ..challenges import ChallengeError
from ..dependencies import ApiKeyDep, AuditDep, StateDep
from ..errors import ERROR_RESPONSES
from ..schemas import PowInfo, PredictResponse, RedeemRequest

__all__ = ["router"]

router = APIRouter(tags=["proof-of-work"])


@router.post("/v1/pow/redeem", response_model=PredictResponse, responses=ERROR_RESPONSES)
async def pow_redeem(body: RedeemRequest, key: ApiKeyDep, state: StateDep, audit: AuditDep) -> JSONResponse:
    """Redeem a solved challenge for the answers it holds (each challenge once, before it expires)."""
    # Every outcome goes to the proof-of-work event log, a refusal under its reason.
    try:
        challenge, payload = state.issuer.redeem(body.challenge, body.signature, body.nonce, key.name)
    except ChallengeError as exc:
        state.metrics.pow.labels(exc.reason).inc()
        await audit.pow_event(key.name, exc.reason)
        raise HTTPException(exc.status, str(exc)) from None
    state.metrics.pow.labels("redeemed").inc()
    await audit.pow_event(key.name, "redeemed", challenge_id=challenge.id, request_id=payload["request_id"],
                          bits=challenge.bits)
    return JSONResponse(payload)


@router.get("/v1/pow/info", response_model=PowInfo)
def pow_info(state: StateDep) -> dict[str, Any]:
    """How proof-of-work is priced on this service (whether it is on, the puzzle, the calibration)."""
    action = state.guard.policy.action
    enabled = isinstance(action, ProofOfWork)
    return {"enabled": enabled, "scheme": SCHEME, "hash": "sha256", "ttl_s": state.issuer.ttl_s,
            "calibration": action.describe() | {"benign": action.calibration_} if enabled else None}
