"""The HTTP app in process (FastAPI's TestClient): good requests, every bad request's 4xx, keys, audit."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from sameguard.actions import ProofOfWork, solve, verify_solution
from sameguard.guard import Guard
from sameguard.service.challenges import ChallengeIssuer
from sameguard.service.db import api_keys, audit_log


def _b64(x: torch.Tensor) -> dict:
    return {"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), "shape": list(x.shape)}


def _png(x: torch.Tensor) -> bytes:
    pixels = ((x[0].numpy() + 1) * 127.5).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def app_client(make_app):
    app, token = make_app("reject", max_batch=8, rate_burst=100, max_request_bytes=200_000)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        yield app, client, token


def test_service_predict_json_b64_and_png(app_client, victim, kit):
    app, client, _ = app_client
    x = torch.cat([kit.dark(2), kit.bright(1)])
    truth = victim.predict_proba(x)
    r = client.post("/v1/predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["refused"] == [2] and body["predictions"][2] is None and body["output"] == "probabilities"
    assert np.allclose(body["predictions"][0], truth[0].numpy(), atol=1e-6)
    assert r.headers["X-Request-ID"] == body["request_id"]
    r = client.post("/v1/predict", json=_b64(x) | {"output": "labels"})
    assert r.status_code == 200 and r.json()["predictions"][:2] == truth[:2].argmax(1).tolist()
    files = [("images", (f"{i}.png", _png(x[i]), "image/png")) for i in range(2)]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2 and r.json()["refused"] == []
    assert app.state.sameguard.audit.count() == 3 + 3 + 2


@pytest.mark.parametrize("case", [
    "missing_key", "unknown_key", "malformed_json", "not_utf8", "wrong_shape", "nan", "out_of_range", "ragged",
    "strings", "both_encodings", "neither_encoding", "bad_base64", "b64_wrong_length", "b64_bad_shape",
    "too_many_images", "oversize_declared", "oversize_streamed", "content_type", "empty_batch", "png_wrong_size",
    "png_not_png", "png_bomb", "multipart_no_images", "unknown_field", "deep_json"])
def test_service_bad_requests_get_a_4xx_that_says_why(app_client, case, kit):
    app, client, _ = app_client
    x = kit.dark(1)
    headers = {}
    kwargs: dict = {"json": {"instances": x.tolist()}}
    expected, phrase = {
        "missing_key": (401, "Missing API key"),
        "unknown_key": (401, "Unknown or revoked"),
        "malformed_json": (400, "Malformed JSON"),
        "not_utf8": (400, "Malformed JSON"),
        "wrong_shape": (422, "shape"),
        "nan": (422, "NaN"),
        "out_of_range": (422, "[-1, 1]"),
        "ragged": (422, "rectangular"),
        "strings": (422, "numbers"),
        "both_encodings": (422, "exactly one"),
        "neither_encoding": (422, "exactly one"),
        "bad_base64": (422, "base64"),
        "b64_wrong_length": (422, "bytes"),
        "b64_bad_shape": (422, "shape"),
        "too_many_images": (413, "at most 8"),
        "oversize_declared": (413, "at most 200000 bytes"),
        "oversize_streamed": (413, "exceeds 200000 bytes"),
        "content_type": (415, "Unsupported content type"),
        "empty_batch": (422, "empty batch"),
        "png_wrong_size": (422, "expects 28x28"),
        "png_not_png": (422, "not a readable PNG"),
        "multipart_no_images": (422, "no 'images'"),
        "unknown_field": (422, "Extra inputs"),
        "png_bomb": (422, "not a readable PNG"),
        "deep_json": (400, "nested too deeply"),
    }[case]
    if case == "missing_key":
        headers = {"X-API-Key": ""}
    elif case == "unknown_key":
        headers = {"X-API-Key": "sg_" + "0" * 16 + "_" + "1" * 64}
    elif case == "malformed_json":
        kwargs = {"content": b'{"instances": [1, 2', "headers": {"content-type": "application/json"}}
    elif case == "not_utf8":
        kwargs = {"content": b"\xff\xfe{}", "headers": {"content-type": "application/json"}}
    elif case == "wrong_shape":
        kwargs = {"json": {"instances": torch.zeros(1, 1, 20, 20).tolist()}}
    elif case == "nan":
        kwargs = {"content": json.dumps({"instances": [[[[float("nan")] * 28] * 28]]}).encode(),
                  "headers": {"content-type": "application/json"}}
    elif case == "out_of_range":
        kwargs = {"json": {"instances": (torch.ones(1, 1, 28, 28) * 255).tolist()}}
    elif case == "ragged":
        kwargs = {"json": {"instances": [[[[0.0] * 28] * 28], [[[0.0] * 27] * 28]]}}
    elif case == "strings":
        kwargs = {"json": {"instances": [[[["0.5"] * 28] * 28]]}}
    elif case == "both_encodings":
        kwargs = {"json": {"instances": x.tolist()} | _b64(x)}
    elif case == "neither_encoding":
        kwargs = {"json": {"output": "labels"}}
    elif case == "bad_base64":
        kwargs = {"json": {"b64": "not base64!", "shape": [1, 1, 28, 28]}}
    elif case == "b64_wrong_length":
        kwargs = {"json": _b64(x) | {"shape": [2, 1, 28, 28]}}
    elif case == "b64_bad_shape":
        kwargs = {"json": _b64(x) | {"shape": [1, 784]}}
    elif case == "too_many_images":
        kwargs = {"json": _b64(kit.dark(9))}
    elif case == "oversize_declared":
        kwargs = {"content": b"x" * 200_001, "headers": {"content-type": "application/json"}}
    elif case == "oversize_streamed":  # no Content-Length: the limit is enforced while reading

        def chunks():
            for _ in range(30):
                yield b"x" * 10_000

        kwargs = {"content": chunks(), "headers": {"content-type": "application/json"}}
    elif case == "content_type":
        kwargs = {"content": b"hello", "headers": {"content-type": "text/plain"}}
    elif case == "empty_batch":
        kwargs = {"json": {"b64": "", "shape": [1, 1, 28, 28]}}
        expected, phrase = 422, "bytes"
    elif case == "png_wrong_size":
        buf = io.BytesIO()
        Image.new("L", (20, 20)).save(buf, format="PNG")
        kwargs = {"files": [("images", ("a.png", buf.getvalue(), "image/png"))]}
    elif case == "png_not_png":
        kwargs = {"files": [("images", ("a.png", b"GIF89a not really", "image/png"))]}
    elif case == "multipart_no_images":
        kwargs = {"files": [("other", ("a.png", _png(x[0]), "image/png"))]}
    elif case == "png_bomb":  # a tiny file that claims 2**30 x 2**30 pixels
        import struct
        import zlib

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2**30, 2**30, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
        kwargs = {"files": [("images", ("bomb.png", bomb, "image/png"))]}
    elif case == "deep_json":
        kwargs = {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}
    elif case == "unknown_field":
        kwargs = {"json": {"instances": x.tolist(), "temperature": 2}}
    headers = headers | kwargs.pop("headers", {})
    r = client.post("/v1/predict", headers=headers, **kwargs)
    assert r.status_code == expected, (r.status_code, r.text)
    assert phrase in r.json()["detail"], r.json()
    assert app.state.sameguard.audit.count() == 0  # nothing was answered, nothing was logged


def test_service_rate_limit_answers_429_with_retry_after(make_app, kit):
    app, token = make_app("monitor", rate_per_second=0.5, rate_burst=3)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        assert client.post("/v1/predict", json=_b64(kit.dark(3))).status_code == 200
        r = client.post("/v1/predict", json=_b64(kit.dark(1)))
        assert r.status_code == 429 and "Rate limit" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
        r = client.post("/v1/predict", json=_b64(kit.dark(4)))
        assert r.status_code == 413 and "burst" in r.json()["detail"]


def test_service_labels_only_service_refuses_probabilities(make_app, victim, kit):
    app, token = make_app(guard=Guard(victim, kit.FakeDetector(), "monitor", output="labels"))
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        r = client.post("/v1/predict", json=_b64(kit.dark(1)) | {"output": "probabilities"})
        assert r.status_code == 422 and "labels only" in r.json()["detail"]
        assert client.post("/v1/predict", json=_b64(kit.dark(1))).json()["output"] == "labels"


def test_service_pow_over_http_round_trip_stale_forged_replayed(make_app, victim, kit):
    class Clock:
        now = 1_000_000.0

        def __call__(self):
            return self.now

    clock = Clock()
    guard = Guard(victim, kit.FakeDetector(), ProofOfWork(benign_bits=4, max_bits=10)).calibrate(kit.dark(100))
    app, token = make_app(guard=guard, issuer=ChallengeIssuer(b"s" * 32, ttl_s=30, clock=clock))
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        x = kit.bright(2)
        r = client.post("/v1/predict", json=_b64(x))
        assert r.status_code == 202, r.text
        ch = r.json()["challenge"]
        assert 4 < ch["bits"] <= 11 and ch["scheme"] == "sg-pow-1"
        nonce = solve(ch["challenge"], ch["bits"])
        bad = next(str(i) for i in range(10**6) if not verify_solution(ch["challenge"], ch["bits"], str(i)))
        redeem = {"challenge": ch["challenge"], "signature": ch["signature"]}
        r = client.post("/v1/pow/redeem", json=redeem | {"nonce": bad})
        assert r.status_code == 403 and "does not solve" in r.json()["detail"]
        forged = ch["challenge"].replace(f"sg-pow-1:{ch['bits']}:", "sg-pow-1:0:", 1)
        r = client.post("/v1/pow/redeem", json={"challenge": forged, "signature": ch["signature"], "nonce": "0"})
        assert r.status_code == 403 and "signature" in r.json()["detail"]
        r = client.post("/v1/pow/redeem", json=redeem | {"nonce": nonce})
        assert r.status_code == 200
        assert np.allclose(r.json()["predictions"], victim.predict_proba(x).numpy(), atol=1e-6)
        r = client.post("/v1/pow/redeem", json=redeem | {"nonce": nonce})
        assert r.status_code == 409 and "already redeemed" in r.json()["detail"]
        # Stale: a new challenge, solved after its expiry.
        ch2 = client.post("/v1/predict", json=_b64(x)).json()["challenge"]
        clock.now += 31
        r = client.post("/v1/pow/redeem", json={"challenge": ch2["challenge"], "signature": ch2["signature"],
                                                "nonce": solve(ch2["challenge"], ch2["bits"])})
        assert r.status_code == 410 and "expired" in r.json()["detail"]
        r = client.post("/v1/pow/redeem", json={"challenge": "x", "signature": "y", "nonce": "z"})
        assert r.status_code == 400 and "not a proof-of-work challenge" in r.json()["detail"]
        r = client.post("/v1/pow/redeem", json={"challenge": "x"})
        assert r.status_code == 422 and "signature" in r.json()["detail"]
        r = client.post("/v1/pow/redeem", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "Malformed JSON" in r.json()["detail"]
        info = client.get("/v1/pow/info").json()
        assert info["enabled"] and info["calibration"]["benign_bits"] == 4


def test_service_health_metrics_openapi_and_model_info(app_client, kit):
    _, client, _ = app_client
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/predict", json=_b64(kit.bright(1)))
    metrics = client.get("/metrics").text
    assert 'sameguard_queries_total{action="reject"} 1.0' in metrics
    assert "sameguard_http_request_seconds_bucket" in metrics
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "/v1/pow/redeem" in spec["paths"] and "202" in spec["paths"]["/v1/predict"]["post"]["responses"]
    info = client.get("/v1/model").json()
    assert info["image_shape"] == [1, 28, 28] and info["num_classes"] == 10 and info["max_batch"] == 8
    assert client.get("/v1/model", headers={"X-API-Key": "nope"}).status_code == 401


def test_service_audit_log_is_append_only_and_complete(app_client, kit):
    app, client, _ = app_client
    x = torch.cat([kit.dark(2), kit.bright(1)])
    rid = client.post("/v1/predict", json=_b64(x)).json()["request_id"]
    engine = app.state.sameguard.audit.engine
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.idx)).mappings().all()
    assert [r["idx"] for r in rows] == [0, 1, 2] and {r["request_id"] for r in rows} == {rid}
    assert [r["action"] for r in rows] == ["allow", "allow", "reject"] and [r["flagged"] for r in rows] == [0, 0, 1]
    assert rows[0]["client"] == "alice" and rows[0]["policy"] == "reject" and rows[0]["threshold"] == 0.0
    assert rows[0]["input_sha256"] == hashlib.sha256(b"float32le:1:28:28:" + x[0].numpy().tobytes()).hexdigest()
    assert rows[0]["victim_sha256"] and rows[0]["sameguard_version"]
    for statement in ("UPDATE sg_audit_log SET action='allow'", "DELETE FROM sg_audit_log"):
        with pytest.raises(SQLAlchemyError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))


@pytest.mark.parametrize("error", [OperationalError("INSERT", {}, Exception("database is locked")),
                                   OSError("disk full")], ids=["database_locked", "disk_full"])
def test_service_unaudited_queries_are_not_answered(app_client, monkeypatch, caplog, kit, error):
    """Fail closed: when the audit rows cannot be written, the answer is 503 and holds no prediction."""
    app, client, _ = app_client
    state = app.state.sameguard

    def fail(decisions):
        raise error

    monkeypatch.setattr(state.audit, "append", fail)
    r = client.post("/v1/predict", json=_b64(kit.dark(1)))
    assert r.status_code == 503, r.text
    assert r.json() == {"detail": "The audit log is unavailable, so the query was not answered; retry later.",
                        "request_id": r.headers["X-Request-ID"]}
    assert "Audit log write failed" in caplog.text
    assert 'sameguard_queries_total{action="allow"}' not in client.get("/metrics").text


@pytest.mark.parametrize("failing_event", ["issued", "redeemed"])
def test_service_unaudited_proof_of_work_is_not_answered(make_app, victim, monkeypatch, kit, failing_event):
    """Fail closed on the proof-of-work path: no challenge, and no held answers, without their audit event."""
    guard = Guard(victim, kit.FakeDetector(), ProofOfWork(benign_bits=2, max_bits=6)).calibrate(kit.dark(100))
    app, token = make_app(guard=guard)
    audit = app.state.sameguard.audit
    original = audit.pow_event

    def pow_event(client, outcome, **fields):
        if outcome == failing_event:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        original(client, outcome, **fields)

    monkeypatch.setattr(audit, "pow_event", pow_event)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        r = client.post("/v1/predict", json=_b64(kit.bright(1)))
        if failing_event == "issued":
            assert r.status_code == 503 and "challenge" not in r.json()
            return
        ch = r.json()["challenge"]
        r = client.post("/v1/pow/redeem", json={"challenge": ch["challenge"], "signature": ch["signature"],
                                                "nonce": solve(ch["challenge"], ch["bits"])})
        assert r.status_code == 503 and "predictions" not in r.json()


def test_service_keys_are_hashed_never_logged_and_revocable(make_app, caplog, kit):
    caplog.set_level(logging.DEBUG)
    app, token = make_app("monitor")
    store = app.state.sameguard.keys
    with store.engine.connect() as conn:
        row = conn.execute(select(api_keys)).mappings().one()
    assert row["key_sha256"] == hashlib.sha256(token.encode()).hexdigest() and token not in str(dict(row))
    with TestClient(app) as client:
        assert client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token}).status_code == 200
        assert store.revoke(name="alice") == 1
        r = client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token})
        assert r.status_code == 401
        assert client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token[:-1] + "0"}).status_code == 401
    assert token not in caplog.text and token[-64:] not in caplog.text
    with pytest.raises(ValueError, match="key name"):
        store.create("bad name!")


def test_service_keys_and_audit_commands(tmp_path, capsys, make_app, kit):
    from sameguard.service.commands import audit_main, keys_main

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    assert keys_main(argparse.Namespace(keys_command="create", name="bob", db=db)) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("sg_") and len(token) == 3 + 16 + 1 + 64
    keys_main(argparse.Namespace(keys_command="list", db=db))
    listing = capsys.readouterr().out
    assert "| bob |" in listing and "active" in listing and token not in listing
    guard = Guard(kit.make_victim(), kit.FakeDetector(), "reject")
    from sameguard.service import ServiceSettings, create_app

    app = create_app(ServiceSettings(db_url=db, key_cache_s=0), guard=guard)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        client.post("/v1/predict", json=_b64(torch.cat([kit.dark(3), kit.bright(1)])))
    assert audit_main(argparse.Namespace(db=db, since_hours=None, json=False)) == 0
    table = capsys.readouterr().out
    assert "| bob | 4 | 1 | 1 | 25.0 |" in table
    audit_main(argparse.Namespace(db=db, since_hours=1.0, json=True))
    summary = json.loads(capsys.readouterr().out)
    assert summary[0]["actions"] == {"allow": 3, "reject": 1}
    assert keys_main(argparse.Namespace(keys_command="revoke", name="bob", key_id=None, db=db)) == 0
    with pytest.raises(ValueError, match="No active key"):
        keys_main(argparse.Namespace(keys_command="revoke", name="bob", key_id=None, db=db))
