"""The HTTP app in process (FastAPI's TestClient): good requests, every bad request's 4xx, keys, audit."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import re

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


def _refused(r, status: int, phrase: str) -> None:
    """The response has ``status`` and its JSON ``detail`` says ``phrase`` (one assertion, a readable failure)."""
    assert (r.status_code, phrase in r.json().get("detail", "")) == (status, True), r.text


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
    assert (body["refused"], body["predictions"][2], body["output"]) == ([2], None, "probabilities")
    assert np.allclose(body["predictions"][0], truth[0].numpy(), atol=1e-6)
    assert r.headers["X-Request-ID"] == body["request_id"]
    r = client.post("/v1/predict", json=_b64(x) | {"output": "labels"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][:2] == truth[:2].argmax(1).tolist()
    files = [("images", (f"{i}.png", _png(x[i]), "image/png")) for i in range(2)]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert (len(r.json()["predictions"]), r.json()["refused"]) == (2, [])
    assert app.state.sameguard.audit.count() == 3 + 3 + 2


def _raw(body, content_type: str = "application/json") -> dict:
    return {"content": body, "headers": {"content-type": content_type}}


def _files(data: bytes, field: str = "images") -> dict:
    return {"files": [(field, ("a.png", data, "image/png"))]}


def _png_of(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb() -> bytes:
    """A tiny file that claims 2**30 x 2**30 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2**30, 2**30, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _chunks():
    """A body with no Content-Length: the limit is enforced while reading."""
    for _ in range(30):
        yield b"x" * 10_000


_X = torch.zeros(1, 1, 28, 28) - 0.5  # one valid (benign) image
#: case -> (request keyword arguments, expected status, phrase the detail must contain)
BAD_REQUESTS = {
    "missing_key": ({"json": {"instances": _X.tolist()}, "headers": {"X-API-Key": ""}}, 401, "Missing API key"),
    "unknown_key": ({"json": {"instances": _X.tolist()}, "headers": {"X-API-Key": "sg_" + "0" * 16 + "_" + "1" * 64}},
                    401, "Unknown or revoked"),
    "malformed_json": (_raw(b'{"instances": [1, 2'), 400, "Malformed JSON"),
    "not_utf8": (_raw(b'{"a": "\x80"}'), 400, "not UTF-8"),
    "deep_json": (_raw(b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply"),
    "wrong_shape": ({"json": {"instances": torch.zeros(1, 1, 20, 20).tolist()}}, 422, "shape"),
    "nan": (_raw(json.dumps({"instances": [[[[float("nan")] * 28] * 28]]}).encode()), 422, "NaN"),
    "out_of_range": ({"json": {"instances": (torch.ones(1, 1, 28, 28) * 255).tolist()}}, 422, "[-1, 1]"),
    "ragged": ({"json": {"instances": [[[[0.0] * 28] * 28], [[[0.0] * 27] * 28]]}}, 422, "rectangular"),
    "strings": ({"json": {"instances": [[[["0.5"] * 28] * 28]]}}, 422, "numbers"),
    "both_encodings": ({"json": {"instances": _X.tolist()} | _b64(_X)}, 422, "exactly one"),
    "neither_encoding": ({"json": {"output": "labels"}}, 422, "exactly one"),
    "unknown_field": ({"json": {"instances": _X.tolist(), "temperature": 2}}, 422, "Extra inputs"),
    "bad_base64": ({"json": {"b64": "not base64!", "shape": [1, 1, 28, 28]}}, 422, "base64"),
    "b64_wrong_length": ({"json": _b64(_X) | {"shape": [2, 1, 28, 28]}}, 422, "bytes"),
    "b64_bad_shape": ({"json": _b64(_X) | {"shape": [1, 784]}}, 422, "shape"),
    "empty_batch": ({"json": {"b64": "", "shape": [1, 1, 28, 28]}}, 422, "bytes"),
    "too_many_images": ({"json": _b64(torch.zeros(9, 1, 28, 28))}, 413, "at most 8"),
    "oversize_declared": (_raw(b"x" * 200_001), 413, "at most 200000 bytes"),
    "oversize_streamed": (_raw(None), 413, "exceeds 200000 bytes"),
    "content_type": (_raw(b"hello", "text/plain"), 415, "Unsupported content type"),
    "png_wrong_size": (_files(_png_of((20, 20))), 422, "expects 28x28"),
    "png_not_png": (_files(b"GIF89a not really"), 422, "not a readable PNG"),
    "png_bomb": (_files(_png_bomb()), 422, "not a readable PNG"),
    "multipart_no_images": (_files(_png(_X[0]), field="other"), 422, "no 'images'"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_service_bad_requests_get_a_4xx_that_says_why(app_client, case):
    app, client, _ = app_client
    kwargs, status, phrase = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    if case == "oversize_streamed":
        kwargs["content"] = _chunks()  # a fresh generator for each run
    r = client.post("/v1/predict", **kwargs)
    _refused(r, status, phrase)
    assert app.state.sameguard.audit.count() == 0  # nothing was answered, nothing was logged


def test_service_rate_limit_answers_429_with_retry_after(make_app, kit):
    app, token = make_app("monitor", rate_per_second=0.5, rate_burst=3)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        r = client.post("/v1/predict", json=_b64(kit.dark(4)))  # never grantable: 413, nothing charged
        _refused(r, 413, "burst")
        assert client.post("/v1/predict", json=_b64(kit.dark(3))).status_code == 200
        r = client.post("/v1/predict", json=_b64(kit.dark(1)))  # refused before its body is read
        _refused(r, 429, "Rate limit")
        assert int(r.headers["Retry-After"]) >= 1


def test_service_labels_only_service_refuses_probabilities(make_app, victim, kit):
    app, token = make_app(guard=Guard(victim, kit.FakeDetector(), "monitor", output="labels"))
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        r = client.post("/v1/predict", json=_b64(kit.dark(1)) | {"output": "probabilities"})
        _refused(r, 422, "labels only")
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
        assert 4 < ch["bits"] <= 11
        assert ch["scheme"] == "sg-pow-1"
        nonce = solve(ch["challenge"], ch["bits"])
        bad = next(str(i) for i in range(10**6) if not verify_solution(ch["challenge"], ch["bits"], str(i)))
        redeem = {"challenge": ch["challenge"], "signature": ch["signature"]}
        r = client.post("/v1/pow/redeem", json=redeem | {"nonce": bad})
        _refused(r, 403, "does not solve")
        forged = ch["challenge"].replace(f"sg-pow-1:{ch['bits']}:", "sg-pow-1:0:", 1)
        r = client.post("/v1/pow/redeem", json={"challenge": forged, "signature": ch["signature"], "nonce": "0"})
        _refused(r, 403, "signature")
        r = client.post("/v1/pow/redeem", json=redeem | {"nonce": nonce})
        assert r.status_code == 200
        assert np.allclose(r.json()["predictions"], victim.predict_proba(x).numpy(), atol=1e-6)
        r = client.post("/v1/pow/redeem", json=redeem | {"nonce": nonce})
        _refused(r, 409, "already redeemed")
        # Stale: a new challenge, solved after its expiry.
        ch2 = client.post("/v1/predict", json=_b64(x)).json()["challenge"]
        clock.now += 31
        r = client.post("/v1/pow/redeem", json={"challenge": ch2["challenge"], "signature": ch2["signature"],
                                                "nonce": solve(ch2["challenge"], ch2["bits"])})
        _refused(r, 410, "expired")
        r = client.post("/v1/pow/redeem", json={"challenge": "x", "signature": "y", "nonce": "z"})
        _refused(r, 400, "not a proof-of-work challenge")
        r = client.post("/v1/pow/redeem", json={"challenge": "x"})
        _refused(r, 422, "signature")
        r = client.post("/v1/pow/redeem", content=b"{", headers={"content-type": "application/json"})
        _refused(r, 400, "Malformed JSON")
        info = client.get("/v1/pow/info").json()
        assert (info["enabled"], info["calibration"]["benign_bits"]) == (True, 4)


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
    assert "/v1/pow/redeem" in spec["paths"]
    assert "202" in spec["paths"]["/v1/predict"]["post"]["responses"]
    info = client.get("/v1/model").json()
    assert {k: info[k] for k in ("image_shape", "num_classes", "max_batch")} == {
        "image_shape": [1, 28, 28], "num_classes": 10, "max_batch": 8}
    assert client.get("/v1/model", headers={"X-API-Key": "nope"}).status_code == 401


def test_service_audit_log_is_append_only_and_complete(app_client, kit):
    app, client, _ = app_client
    x = torch.cat([kit.dark(2), kit.bright(1)])
    rid = client.post("/v1/predict", json=_b64(x)).json()["request_id"]
    engine = app.state.sameguard.audit.engine
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.idx)).mappings().all()
    assert [(r["idx"], r["request_id"], r["action"], r["flagged"]) for r in rows] == [
        (0, rid, "allow", 0), (1, rid, "allow", 0), (2, rid, "reject", 1)]
    assert (rows[0]["client"], rows[0]["policy"], rows[0]["threshold"]) == ("alice", "reject", 0.0)
    assert rows[0]["input_sha256"] == hashlib.sha256(b"float32le:1:28:28:" + x[0].numpy().tobytes()).hexdigest()
    assert rows[0]["victim_sha256"]
    assert rows[0]["sameguard_version"]
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
            assert r.status_code == 503
            assert "challenge" not in r.json()
            return
        ch = r.json()["challenge"]
        r = client.post("/v1/pow/redeem", json={"challenge": ch["challenge"], "signature": ch["signature"],
                                                "nonce": solve(ch["challenge"], ch["bits"])})
        assert r.status_code == 503
        assert "predictions" not in r.json()


def test_service_keys_are_hashed_never_logged_and_revocable(make_app, caplog, kit):
    caplog.set_level(logging.DEBUG)
    app, token = make_app("monitor")
    store = app.state.sameguard.keys
    with store.engine.connect() as conn:
        row = conn.execute(select(api_keys)).mappings().one()
    assert row["key_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(dict(row))
    with TestClient(app) as client:
        assert client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token}).status_code == 200
        assert store.revoke(name="alice") == 1
        r = client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token})
        assert r.status_code == 401
        assert client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token[:-1] + "0"}).status_code == 401
    assert token not in caplog.text
    assert token[-64:] not in caplog.text
    with pytest.raises(ValueError, match="key name"):
        store.create("bad name!")


def test_service_keys_and_audit_commands(tmp_path, capsys, make_app, kit):
    from sameguard.service.commands import audit_main, keys_main

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    assert keys_main(argparse.Namespace(keys_command="create", name="bob", db=db)) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"sg_[0-9a-f]{16}_[0-9a-f]{64}", token), token
    keys_main(argparse.Namespace(keys_command="list", db=db))
    listing = capsys.readouterr().out
    assert "| bob |" in listing
    assert "active" in listing
    assert token not in listing
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


def test_start_up_objects_are_frozen_for_the_garbage_collector_while_serving(make_app):
    """A full collection would walk the models' and libraries' objects: the service freezes them at start-up
    (gc.freeze) and unfreezes them at shutdown."""
    import gc

    app, _ = make_app("monitor")
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # torch, FastAPI and the models at least
    assert gc.get_freeze_count() == 0


def test_no_gc_freeze_leaves_the_collector_as_it_is(make_app):
    import gc

    app, _ = make_app("monitor", gc_freeze=False)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0


def test_metrics_time_garbage_collections_while_serving(make_app):
    import gc

    app, _ = make_app("monitor")
    hook = app.state.sameguard.metrics._gc_timer.hook
    with TestClient(app) as client:
        assert hook in gc.callbacks
        gc.collect()
        text = client.get("/metrics").text
        count = next(line for line in text.splitlines() if line.startswith('sameguard_gc_pause_seconds_count{generation="2"}'))
        assert float(count.rsplit(" ", 1)[1]) >= 1
    assert hook not in gc.callbacks  # unhooked at shutdown
