"""Operator routes under ``/v1/admin``: list alarmed clients and clear a client's alarm.

They are authorised by the operator's token (``Authorization: Bearer <token>``), read at start-up
from the environment variable named by ``--admin-token-env`` and compared in constant time; the
token is never logged. Without a configured token every admin route answers 403; a missing token
is 401, a wrong one 403. Clearing an alarm is written to the audit log (``sg_alarm_events``,
event ``cleared``) before it takes effect, so no clearing goes unaudited.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..audit import AlarmEvent
from ..dependencies import AuditDep, StateDep
from ..errors import ERROR_RESPONSES
from ..schemas import ClearedAlarm, ClientAlarm, ErrorResponse

logger = logging.getLogger(__name__)

__all__ = ["router", "require_admin"]

_LN10 = math.log(10.0)
_RESPONSES: dict[int | str, dict[str, Any]] = {**ERROR_RESPONSES, 404: {"model": ErrorResponse}}
admin_bearer = HTTPBearer(auto_error=False, description="the operator's token (--admin-token-env)")


def require_admin(state: StateDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Security(admin_bearer)] = None) -> None:
    """403 when admin routes are off, 401 without a bearer token, 403 with a wrong one."""
    expected = state.admin_token
    if expected is None:
        raise HTTPException(403, "The admin routes are disabled: start the service with --admin-token-env NAME.")
    if credentials is None or not credentials.credentials:
        raise HTTPException(401, "Missing admin token: send it as 'Authorization: Bearer <token>'.",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, "Invalid admin token.")


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])

ClientPath = Annotated[str, Path(min_length=1, max_length=64, description="the client (API key name)")]


def _alarms(state: Any) -> Any:
    alarms = state.guard.alarms
    if alarms is None:
        raise HTTPException(404, "This service has no per-client alarms (start it with --alarms DIR).")
    return alarms


@router.get("/alarms", response_model=list[ClientAlarm], responses=_RESPONSES)
def list_alarms(state: StateDep) -> list[dict[str, Any]]:
    """Every alarmed client, in order of alarm time, with its evidence now."""
    return [{"client": e.client, "queries": e.queries, "queries_at_alarm": e.alarm_query, "alarm_time": e.alarm_time,
             "evidence_log10": e.log_evidence / _LN10} for e in _alarms(state).alarmed_clients()]


@router.post("/clients/{client}/clear-alarm", response_model=ClearedAlarm, responses=_RESPONSES)
async def clear_alarm(client: ClientPath, state: StateDep, audit: AuditDep) -> dict[str, Any]:
    """Clear a client's alarm: its martingales restart at 1 and its queries are answered again (404: unknown)."""
    alarms = _alarms(state)
    evidence = alarms.evidence(client)
    if evidence is None:
        raise HTTPException(404, f"Unknown client {client!r}: it has sent no query since the service started.")
    await audit.alarm_event(AlarmEvent(time=time.time(), client=client, event="cleared", queries=evidence.queries,
                                       evidence=evidence.log_evidence / _LN10, request_id=audit.request_id))
    alarms.clear(client)
    state.alarm_ledger.cleared(client)
    state.metrics.alarms_cleared.inc()
    logger.warning("Operator cleared the alarm of client %r (was alarmed: %s, %d queries)", client, evidence.alarmed,
                   evidence.queries)
    return {"client": client, "was_alarmed": evidence.alarmed, "queries": evidence.queries,
            "evidence_log10": evidence.log_evidence / _LN10}
