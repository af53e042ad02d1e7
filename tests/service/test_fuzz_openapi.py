"""Schemathesis against the live service: every operation of its own OpenAPI document, fuzzed.

The service is served for real (uvicorn on loopback) with a tiny victim; its ``/openapi.json`` is
loaded into Schemathesis, and every operation gets schema-valid (positive) and schema-violating
(negative) requests, JSON and multipart bodies alike, with and without a valid API key. Every
answer must be a status that the document lists for the operation (never a 5xx), an error must be
the service's JSON ``{"detail", "request_id"}``, a 200 from ``/v1/predict`` must be a
``PredictResponse``, and the keep-alive connection must survive every request.

Bounded for the test suite (``SAMEGUARD_FUZZ_EXAMPLES``, default 15 examples per operation and
mode, derandomized). The longer run is the same test with more examples::

    make fuzz EXAMPLES=1000    # = SAMEGUARD_FUZZ_EXAMPLES=1000 pytest tests/service/test_fuzz_openapi.py ...
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from sameguard.service.schemas import PredictResponse

EXAMPLES = int(os.environ.get("SAMEGUARD_FUZZ_EXAMPLES", "15"))
logger = logging.getLogger(__name__)


def _check(label: str, documented: set[str], response) -> None:
    status = response.status_code
    assert status < 500, f"{label}: {status} {response.text[:300]}"
    assert str(status) in documented, f"{label}: undocumented status {status} ({sorted(documented)}): " \
                                      f"{response.text[:300]}"
    if label == "GET /metrics" and status == 200:
        return
    body = response.json()  # every answer is JSON
    if status >= 400:
        assert isinstance(body.get("detail"), str) and body["detail"], f"{label}: {body}"
        rid = response.headers.get("x-request-id") or [None]  # Schemathesis: lower-case names, lists of values
        assert body.get("request_id") == rid[0], f"{label}: {status} {body} {dict(response.headers)}"
    elif label == "POST /v1/predict" and status == 200:
        PredictResponse.model_validate(body)


def _fuzz(op, mode, documented: set[str], url: str, session, token: str, seen: Counter) -> None:
    """Send ``EXAMPLES`` generated requests to one operation and check each answer."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        headers = {} if seen[op.label] % 5 == 4 else {"X-API-Key": token}  # some requests without a key
        response = case.call(base_url=url, session=session, headers=headers)
        seen[op.label] += 1
        seen[(op.label, case.media_type)] += 1
        seen[(op.label, response.status_code)] += 1
        _check(op.label, documented, response)

    try:
        run()
    except Exception as exc:  # an operation without parameters has no negative case
        if type(exc).__name__ != "Unsatisfiable":
            raise


@pytest.mark.slow
def test_schemathesis_fuzzes_the_live_service(make_app, kit):
    app, token = make_app("reject", max_batch=4, max_request_bytes=64 * 1024, rate_per_second=1e6,
                          rate_burst=10**6, request_rate_per_second=1e6, request_burst=10**6)
    seen: Counter = Counter()
    with kit.live(app) as url, requests.Session() as session:
        spec = session.get(url + "/openapi.json").json()
        schema = schemathesis.openapi.from_dict(spec)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /v1/predict", "POST /v1/pow/redeem", "GET /v1/model"}
        for op in operations:
            documented = set(spec["paths"][op.path][op.method.lower()]["responses"])
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(op, mode, documented, url, session, token, seen)
    logger.info("requests per operation, media type and status: %s",
                "; ".join(f"{k}: {v}" for k, v in sorted(seen.items(), key=str)))
    assert seen[("POST /v1/predict", "application/json")] > 0
    assert seen[("POST /v1/predict", "multipart/form-data")] > 0
    assert seen[("POST /v1/predict", 200)] > 0  # schema-valid bodies are answered
