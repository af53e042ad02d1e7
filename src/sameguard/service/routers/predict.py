"""Prediction: ``POST /v1/predict`` and ``GET /v1/model``.

A prediction request goes: API key -> decode and validate the images -> rate limit ->
``guard.protect`` (victim, detector, policy) -> audit rows -> metrics -> the answer (200), or,
when the policy prices the batch in proof-of-work, a signed challenge (202) whose answers
``POST /v1/pow/redeem`` releases. The audit rows are written before anything is answered; when
they cannot be, the request gets 503 and no prediction.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...prediction_api import BudgetExceededError
from ..challenges import ChallengeError
from ..dependencies import ApiKeyDep, AuditDep, RateLimitedBatchDep, RequestAudit, StateDep
from ..errors import ERROR_RESPONSES
from ..schemas import ChallengeResponse, ModelInfo, PredictResponse
from ..state import ServiceState

__all__ = ["router", "answer_body"]

router = APIRouter(tags=["predict"])

#: ``/v1/predict`` reads its body itself (JSON or multipart), so its schema is given here.
PREDICT_OPENAPI: dict[str, Any] = {
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


@router.get("/v1/model", response_model=ModelInfo, responses=ERROR_RESPONSES)
def model_info(key: ApiKeyDep, state: StateDep) -> dict[str, Any]:
    """What the service serves: input shape, classes, output kind and limits."""
    guard, settings = state.guard, state.settings
    return {"image_shape": list(guard.image_shape), "num_classes": guard.num_classes, "classes": state.classes,
            "output": guard.output, "policy": guard.policy.name, "max_batch": settings.max_batch,
            "max_request_bytes": settings.max_request_bytes, "versions": guard.versions}


@router.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_OPENAPI,
             responses={202: {"model": ChallengeResponse, "description": "proof-of-work due"}, **ERROR_RESPONSES})
async def predict(request: Request, key: ApiKeyDep, batch: RateLimitedBatchDep, state: StateDep,
                  audit: AuditDep) -> JSONResponse:
    """Classify a batch of images (JSON or PNG upload); see the module documentation."""
    rid = request.state.request_id
    try:
        verdict = await run_in_threadpool(state.guard.protect, batch.images, key.name, request_id=rid)
    except BudgetExceededError as exc:
        raise HTTPException(429, str(exc)) from None
    await audit.decisions(verdict.decisions)
    state.metrics.observe_decisions(verdict.decisions)
    body = answer_body(verdict, batch.output, rid)
    if verdict.work_bits > 0:
        return await _hold_for_proof_of_work(state, audit, key.name, verdict, body)
    return JSONResponse(body)


def answer_body(verdict: Any, output: str, request_id: str) -> dict[str, Any]:
    """The 200 body: per image its probabilities (or top-1 label), ``None`` where refused."""
    refused = verdict.refused.tolist()
    if output == "labels":
        labels = verdict.probabilities.argmax(dim=1).tolist()
        predictions: list[Any] = [None if r else int(lab) for lab, r in zip(labels, refused)]
    else:
        rows = verdict.probabilities.tolist()
        predictions = [None if r else row for row, r in zip(rows, refused)]
    return {"request_id": request_id, "output": output, "predictions": predictions,
            "refused": [i for i, r in enumerate(refused) if r]}


async def _hold_for_proof_of_work(state: ServiceState, audit: RequestAudit, client: str, verdict: Any,
                                  body: dict[str, Any]) -> JSONResponse:
    """Keep ``body`` behind a challenge worth ``verdict.work_bits``; answer 202 with the challenge."""
    resource = hashlib.sha256("".join(d.input_sha256 for d in verdict.decisions).encode()).hexdigest()
    try:
        challenge = state.issuer.issue(client, verdict.work_bits, payload=body, resource=resource)
    except ChallengeError as exc:
        state.metrics.pow.labels("refused_too_many").inc()
        raise HTTPException(exc.status, str(exc)) from None
    state.metrics.pow.labels("issued").inc()
    await audit.pow_event(client, "issued", challenge_id=challenge.id, request_id=audit.request_id,
                          bits=challenge.bits)
    return JSONResponse({"request_id": audit.request_id, "challenge": challenge.to_dict(), "redeem": "/v1/pow/redeem"},
                        status_code=202)
