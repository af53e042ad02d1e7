"""Issue 12: what fuzzing and tampering found in the service, each closed and pinned by a test.

Findings (numbers as in the issue): 1 huge integer literals (a 500, a reset keep-alive connection, a
422 echoing the number), 2 the OpenAPI document, 4 server-assigned request ids, 5 NaN/inf scores
flagged everywhere, 7 proof-of-work batch cap and its audit, 8 chunked multipart over the limit and
``true`` among the floats.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

BIG = "1" * 5000  # more digits than Python's int() accepts (4300)


@pytest.fixture
def client(make_app):
    app, token = make_app("reject", max_batch=8, rate_burst=100, max_request_bytes=200_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["X-API-Key"] = token
        yield app, c


def _post_raw(c, path: str, body: bytes):
    return c.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("body", [
    '{"instances": %s}' % BIG,
    '{"instances": [[[[%s]]]]}' % BIG,
    '{"instances": [[[[0.0]]]], "output": %s}' % BIG,
    '{"b64": "", "shape": [1, 1, 28, %s]}' % ("1" * 4300),
    '{"b64": "", "shape": [%s, 1, 28, 28]}' % ("1" * 4300),
])
def test_huge_integer_literals_get_a_short_400_not_a_500(client, body):
    app, c = client
    r = _post_raw(c, "/v1/predict", body.encode())
    assert r.status_code == 400, r.text[:300]
    assert "integer of" in r.json()["detail"] and len(r.text) < 400  # says why, echoes nothing
    assert app.state.sameguard.audit.count() == 0


def test_error_details_are_cut_short(client):
    _, c = client
    r = c.post("/v1/predict", json={"b64": "", "shape": [1, 1, 28, int("9" * 30)], "x" * 5000: 1})
    assert r.status_code == 422 and len(r.json()["detail"]) <= 500


def test_huge_integer_keeps_the_keep_alive_connection_usable(make_app, kit):
    app, token = make_app("reject")
    with kit.live(app) as url, httpx.Client(base_url=url, headers={"X-API-Key": token}, timeout=30) as http:
        r = http.post("/v1/predict", content=('{"instances": %s}' % BIG).encode(),
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
        r = http.post("/v1/predict", json={"instances": kit.dark(1).tolist()})  # same connection
        assert r.status_code == 200, r.text


def test_true_among_the_floats_is_refused(client):
    app, c = client
    rows = [[[True] + [0.0] * 27] + [[0.0] * 28] * 27]
    r = c.post("/v1/predict", json={"instances": [rows]})
    assert r.status_code == 422 and "true/false" in r.json()["detail"], r.text
    r = c.post("/v1/predict", json={"instances": [[[[False] * 28] * 28]]})
    assert r.status_code == 422, r.text
    assert app.state.sameguard.audit.count() == 0


def _multipart_chunks(total: int, boundary: str):
    yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n" \
          f"Content-Type: image/png\r\n\r\n".encode()
    sent = 0
    while sent < total:
        yield b"x" * 65536
        sent += 65536
    yield f"\r\n--{boundary}--\r\n".encode()


def test_chunked_multipart_over_the_limit_gets_413_with_a_reason(client):
    app, c = client
    boundary = "sgboundary"
    r = c.post("/v1/predict", content=_multipart_chunks(300_000, boundary),
               headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert "exceeds 200000 bytes" in r.json()["detail"]
    assert app.state.sameguard.audit.count() == 0


def test_framework_errors_carry_the_request_id(client):
    _, c = client
    r = _post_raw(c, "/v1/pow/redeem", ('{"challenge": %s}' % BIG).encode())
    assert r.status_code == 400 and r.json()["request_id"], r.text
    r = c.get("/no/such/route")
    assert r.status_code == 404 and r.json()["request_id"], r.text


def _resolve(spec: dict, ref: str) -> dict:
    node = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_openapi_document_defines_every_ref_and_its_examples_are_accepted(client):
    app, c = client
    spec = c.get("/openapi.json").json()
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert "#/components/schemas/PredictJSON" in refs
    for ref in refs:
        _resolve(spec, ref)  # KeyError when the document refers to a schema it does not define
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    schema = _resolve(spec, body["application/json"]["schema"]["$ref"])
    assert len(schema["examples"]) == 2
    for example in schema["examples"]:  # the document's own examples are accepted by this model
        r = c.post("/v1/predict", json=example)
        assert r.status_code == 200, r.text
    assert app.state.sameguard.audit.count() == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_service_refuses_and_audits_non_finite_scores_as_flagged(make_app, victim, kit, value):
    from sqlalchemy import select

    from sameguard.guard import Guard
    from sameguard.service.db import audit_log

    class Broken(kit.FakeDetector):
        def score(self, x):
            return torch.full((len(x),), value)

    app, token = make_app("reject", guard=Guard(victim, Broken(), "reject"))
    with TestClient(app) as c:
        r = c.post("/v1/predict", json={"instances": kit.dark(2).tolist()}, headers={"X-API-Key": token})
    assert r.status_code == 200 and r.json()["refused"] == [0, 1], r.text
    with app.state.sameguard.audit.engine.connect() as conn:
        flagged = conn.execute(select(audit_log.c.flagged)).scalars().all()
    assert flagged == [True, True]


def test_request_ids_are_assigned_by_the_server_and_audit_counts_requests(make_app, kit):
    from sqlalchemy import select

    from sameguard.service.audit import summarize
    from sameguard.service.db import audit_log

    app, alice = make_app("monitor")
    _, bob = app.state.sameguard.keys.create("bob")
    with TestClient(app) as c:
        answers = []
        for token in (alice, alice, alice, bob):
            r = c.post("/v1/predict", json={"instances": kit.dark(2).tolist()},
                       headers={"X-API-Key": token, "X-Request-ID": "same-id"})
            assert r.status_code == 200, r.text
            assert r.headers["X-Request-ID"] == r.json()["request_id"] != "same-id"
            assert r.headers["X-Client-Request-ID"] == "same-id"
            answers.append(r.json()["request_id"])
        r = c.post("/v1/predict", json={"instances": kit.dark(1).tolist()}, headers={"X-API-Key": alice})
        assert "X-Client-Request-ID" not in r.headers
    assert len(set(answers)) == 4
    engine = app.state.sameguard.audit.engine
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.request_id, audit_log.c.idx, audit_log.c.client_request_id)).all()
    assert len(rows) == 9 and len({(r[0], r[1]) for r in rows}) == 9  # no duplicate (request_id, index)
    assert [r[2] for r in rows] == ["same-id"] * 8 + [None]
    counts = {s.client: (s.requests, s.queries) for s in summarize(engine)}
    assert counts == {"alice": (4, 7), "bob": (1, 2)}


def test_audit_log_refuses_a_duplicate_request_id_and_index(make_app, kit):
    import sqlalchemy

    from sameguard.guard import Decision

    app, _ = make_app("monitor")
    d = Decision(time=0.0, client="alice", input_sha256="0" * 64, score=0.0, threshold=0.0, flagged=False,
                 action="allow", work_bits=0, request_id="r1", index=0)
    app.state.sameguard.audit.append([d])
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        app.state.sameguard.audit.append([d])


def _pow_guard(victim, kit, max_bits: int = 16):
    from sameguard.actions import ProofOfWork
    from sameguard.guard import Guard

    return Guard(victim, kit.FakeDetector(), ProofOfWork(benign_bits=4, max_bits=max_bits)).calibrate(kit.dark(100))


def test_pow_max_bits_caps_the_cost_of_a_whole_batch(make_app, victim, kit):
    guard = _pow_guard(victim, kit)
    verdict = guard.protect(kit.bright(4), "alice")
    assert [d.work_bits for d in verdict.decisions] == [16] * 4
    assert verdict.work_bits == 16  # was 18: log2(4 * 2^16)
    app, token = make_app(guard=_pow_guard(victim, kit))
    with TestClient(app) as c:
        r = c.post("/v1/predict", json={"instances": kit.bright(4).tolist()}, headers={"X-API-Key": token})
    assert r.status_code == 202 and r.json()["challenge"]["bits"] == 16, r.text


def test_pow_refused_for_too_many_challenges_is_audited_with_its_reason(make_app, victim, kit):
    from sqlalchemy import select

    from sameguard.service.challenges import ChallengeIssuer
    from sameguard.service.db import audit_log, pow_events

    issuer = ChallengeIssuer(b"k" * 32, max_pending_per_client=1)
    app, token = make_app(guard=_pow_guard(victim, kit, max_bits=8), issuer=issuer)
    with TestClient(app) as c:
        first = c.post("/v1/predict", json={"instances": kit.bright(1).tolist()}, headers={"X-API-Key": token})
        second = c.post("/v1/predict", json={"instances": kit.bright(2).tolist()}, headers={"X-API-Key": token})
    assert first.status_code == 202 and second.status_code == 429, second.text
    rid = second.json()["request_id"]
    with app.state.sameguard.audit.engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.idx).where(audit_log.c.request_id == rid)).scalars().all()
        events = conn.execute(select(pow_events.c.outcome, pow_events.c.request_id)).all()
    assert rows == [0, 1]  # the decided queries keep their rows (documented) ...
    assert ("toomany", rid) in [tuple(e) for e in events]  # ... and the log says why they got no answer


def test_multipart_with_more_files_than_the_batch_limit_gets_413(client, kit):
    app, c = client  # max_batch 8
    files = [("images", (f"{i}.png", b"not a png", "image/png")) for i in range(12)]
    r = c.post("/v1/predict", files=files)
    assert r.status_code == 413 and "at most 8 images" in r.json()["detail"], r.text
    assert app.state.sameguard.audit.count() == 0


def test_a_non_ascii_pow_signature_is_refused_not_a_500(make_app, victim, kit):
    """hmac.compare_digest raises TypeError on non-ASCII text: a signature must be refused before it."""
    app, token = make_app(guard=_pow_guard(victim, kit, max_bits=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["X-API-Key"] = token
        challenge = c.post("/v1/predict", json={"instances": kit.bright(1).tolist()}).json()["challenge"]
        r = c.post("/v1/pow/redeem", json={"challenge": challenge["challenge"], "signature": "\u00e9" * 64,
                                           "nonce": "0"})
    assert r.status_code in (400, 403, 422), r.text


def test_a_challenge_with_non_ascii_digits_is_refused_not_a_500(client):
    """``\\d`` in a regular expression matches any Unicode digit: the challenge must be ASCII before it is signed."""
    _, c = client
    forged = "sg-pow-1:\u0661\u0662:1:" + "0" * 32 + ":" + "0" * 16 + ":"
    r = c.post("/v1/pow/redeem", json={"challenge": forged, "signature": "a" * 64, "nonce": "0"})
    assert r.status_code in (400, 403, 422), r.text


@pytest.mark.parametrize("value,kept", [(b"abc-1_Z", "abc-1_Z"), (b"abc\n", None), (b"a" * 65, None),
                                        (b"", None), (b"a b", None)])
def test_only_a_well_formed_client_request_id_is_kept(value, kept):
    from sameguard.service.middleware import client_request_id_from

    assert client_request_id_from({b"x-request-id": value}) == kept
