"""Prediction: ``POST /v1/predict`` and ``GET /v1/model``.

A prediction request goes: API key -> decode and validate the images -> rate limit ->
``guard.protect`` (victim, detector, policy) -> audit rows -> metrics -> the answer (200), or,
when the policy prices the batch in proof-of-work, a signed challenge (202) whose answers
``POST /v1/pow/redeem`` releases. The audit rows are written before anything is answered; when
they cannot be, the request gets 503 and no prediction.

With per-client alarms, the batch that raises a client's alarm also writes the alarm event (same
transaction). With the reject policy, a request whose images are all refused because its API key
is alarmed is answered 403 ``{"error": "client_alarmed", "detail": ..., "alarm": {...}}``; when
the alarm is raised within a batch, the 200 answer carries ``alarm`` next to the refused positions.
Misinformation and proof-of-work act as their actions do (answers that look normal, harder puzzles).
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...prediction_api import BudgetExceededError
from ..challenges import ChallengeError
from ..dependencies import ApiKeyDep, PredictDep, RequestAudit, StateDep
from ..errors import ERROR_RESPONSES
from ..schemas import AlarmedError, ChallengeResponse, ModelInfo, PredictResponse
from ..state import ServiceState

logger = logging.getLogger(__name__)

__all__ = ["router", "answer_body", "ALARMED_STATUS"]

#: The status of a request refused because its API key is alarmed (reject policy).
ALARMED_STATUS = 403

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
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
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
            "output": guard.output, "policy": guard.policy_name, "max_batch": settings.max_batch,
            "max_request_bytes": settings.max_request_bytes, "versions": guard.versions,
            "alarms": None if guard.alarms is None else guard.alarms.describe()}


@router.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_OPENAPI,
             responses={202: {"model": ChallengeResponse, "description": "proof-of-work due"},
                        **ERROR_RESPONSES,
                        ALARMED_STATUS: {"model": AlarmedError, "description": "this API key is alarmed (reject "
                                                                               "policy), or a proof-of-work error"}})
async def predict(request: Request, inputs: PredictDep) -> JSONResponse:
    """Classify a batch of images (JSON or PNG upload); see the module documentation."""
    key, batch, state, audit = inputs.key, inputs.batch, inputs.state, inputs.audit
    rid = request.state.request_id
    try:  # one hop to a worker thread for the decision and its audit rows
        verdict, event = await run_in_threadpool(_decide_and_audit, state, audit, key.name, batch.images, rid)
    except BudgetExceededError as exc:
        raise HTTPException(429, str(exc)) from None
    if event is not None:
        state.metrics.alarms.inc()
        logger.warning("Client %r alarmed as a model-extraction attacker after %s queries (evidence 10^%.2f)",
                       key.name, event.queries, event.evidence if event.evidence is not None else math.nan)
    state.metrics.observe_decisions(verdict.decisions)
    body = answer_body(verdict, batch.output, rid)
    if verdict.work_bits > 0:
        return await _hold_for_proof_of_work(state, audit, key.name, verdict, body)
    alarm_refused = [bool(d.alarmed) and bool(r) for d, r in zip(verdict.decisions, verdict.refused.tolist())]
    if any(alarm_refused):
        notice = alarm_notice(state, key.name, verdict.decisions)
        if all(alarm_refused):
            return JSONResponse({"error": "client_alarmed", "detail": alarmed_message(notice), "request_id": rid,
                                 "alarm": notice}, status_code=ALARMED_STATUS)
        body["alarm"] = notice
    return JSONResponse(body)


def _decide_and_audit(state: ServiceState, audit: RequestAudit, client: str, images: Any,
                      request_id: str) -> tuple[Any, Any]:
    """On a worker thread: ``guard.protect`` of the batch, then its audit rows and, when this batch raised
    the client's alarm, the alarm event (one transaction; 503 when it cannot be written, and the alarm
    is recorded again by the next batch). Returns ``(verdict, event or None)``."""
    verdict = state.guard.protect(images, client, request_id=request_id)
    event = state.alarm_ledger.raised(state.guard.alarms, client, verdict.decisions, audit.request_id)
    try:
        audit.decisions_now(verdict.decisions, () if event is None else (event,))
    except HTTPException:
        if event is not None:
            state.alarm_ledger.undo(event)
        raise
    return verdict, event


def alarm_notice(state: ServiceState, client: str, decisions: Any) -> dict[str, Any]:
    """The ``alarm`` object of an alarmed client's answer: queries and evidence at the alarm, the threshold."""
    alarms = state.guard.alarms
    record = state.alarm_ledger.get(client)
    evidence = alarms.evidence(client) if alarms is not None else None
    threshold = math.log10(1.0 / alarms.delta) if alarms is not None else math.nan
    last = next((d.evidence for d in reversed(decisions) if d.evidence is not None), None)
    return {"queries_at_alarm": record.queries if record is not None else getattr(evidence, "alarm_query", None),
            "evidence_log10": record.evidence if record is not None else last,
            "threshold_log10": threshold,
            "alarm_time": record.alarm_time if record is not None else getattr(evidence, "alarm_time", None)}


def alarmed_message(notice: dict[str, Any]) -> str:
    """The 403 ``detail``: what happened to this API key, in one paragraph."""
    n = notice["queries_at_alarm"]
    ev, th = notice["evidence_log10"], notice["threshold_log10"]
    after = f" after {n} queries" if n is not None else ""
    evidence = f" (evidence 10^{ev:.2f} >= 1/delta = 10^{th:.2f})" if ev is not None else ""
    return (f"This API key has been flagged as a model-extraction attacker{after}{evidence}; its queries are refused. "
            "Contact the provider.")


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
        # The batch was decided (scored, counted in the client's evidence) and its audit rows are
        # written: they stay, and this event says why those queries got no answer (429).
        state.metrics.pow.labels("refused_too_many").inc()
        await audit.pow_event(client, exc.reason, request_id=audit.request_id, bits=verdict.work_bits)
        raise HTTPException(exc.status, str(exc)) from None
    state.metrics.pow.labels("issued").inc()
    await audit.pow_event(client, "issued", challenge_id=challenge.id, request_id=audit.request_id,
                          bits=challenge.bits)
    return JSONResponse({"request_id": audit.request_id, "challenge": challenge.to_dict(), "redeem": "/v1/pow/redeem"},
                        status_code=202)
