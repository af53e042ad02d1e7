"""Per-client alarms through the HTTP service: the 403 for an alarmed key, audit rows and events, admin clearing.

The alarms are calibrated on dark images with the transparent fake detector (score = mean pixel), so
every bright image gets the smallest p-value and a client sending bright images is alarmed within a
few queries. The guard's per-query threshold is set out of reach (2.0), so a refusal here can only
come from the alarm.
"""

from __future__ import annotations

import argparse
import base64
import re

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from sqlalchemy import select

from sameguard.alarms import ClientAlarms
from sameguard.guard import Guard
from sameguard.service import SameguardClient
from sameguard.service.db import alarm_events, audit_log

ADMIN_ENV = "SAMEGUARD_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "0123456789abcdef0123456789abcdef"


def _b64(x: torch.Tensor) -> dict:
    return {"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), "shape": list(x.shape)}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture
def alarmed_app(make_app, victim, kit, monkeypatch):
    """``make(policy) -> (app, tokens)``: a service with alarms (delta 1e-3) and keys for mallory and alice."""
    monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)

    def make(policy: str = "reject", **settings):
        detector = kit.FakeDetector(threshold=2.0)
        alarms = ClientAlarms.calibrate(victim, {"fake": detector}, kit.dark(600, seed=3), delta=1e-3)
        guard = Guard(victim, detector, policy, alarms=alarms)
        app, mallory = make_app(guard=guard, client_name="mallory", admin_token_env=ADMIN_ENV, **settings)
        _, alice = app.state.sameguard.keys.create("alice")
        return app, {"mallory": mallory, "alice": alice}

    return make


def _alarm_mallory(client: TestClient, token: str, kit, limit: int = 30) -> int:
    """Send mallory's bright images one per request until one is refused; returns how many were sent."""
    for i in range(limit):
        r = client.post("/v1/predict", json=_b64(kit.bright(1, seed=100 + i)), headers={"X-API-Key": token})
        if r.status_code == 403:
            return i + 1
        assert (r.status_code, r.json()["refused"]) == (200, []), r.text
    raise AssertionError(f"mallory was not alarmed within {limit} queries")


def test_alarmed_key_gets_403_while_another_key_is_served(alarmed_app, kit):
    app, tokens = alarmed_app("reject")
    with TestClient(app) as client:
        n = _alarm_mallory(client, tokens["mallory"], kit)
        assert 2 <= n <= 15
        r = client.post("/v1/predict", json=_b64(kit.dark(3, seed=9)), headers={"X-API-Key": tokens["mallory"]})
        body = r.json()
        assert (r.status_code, body["error"]) == (403, "client_alarmed"), r.text
        assert f"flagged as a model-extraction attacker after {n} queries" in body["detail"]
        assert "Contact the provider" in body["detail"]
        assert body["alarm"]["queries_at_alarm"] == n
        assert body["alarm"]["evidence_log10"] >= body["alarm"]["threshold_log10"] == pytest.approx(3.0)
        for x in (kit.dark(2, seed=4), kit.dark(5, seed=5)):  # alice asks benign questions
            r = client.post("/v1/predict", json=_b64(x), headers={"X-API-Key": tokens["alice"]})
            assert (r.status_code, r.json()["refused"]) == (200, []), r.text
        metrics = client.get("/metrics").text
        model = client.get("/v1/model", headers={"X-API-Key": tokens["alice"]}).json()
        health = client.get("/healthz").json()
    assert _metric(metrics, "sameguard_alarms_total") == 1.0
    assert _metric(metrics, "sameguard_alarm_refused_queries_total") == 1 + 3
    assert model["alarms"]["delta"] == health["alarms"]["delta"] == 1e-3
    assert (model["alarms"]["scorers"], model["alarms"]["mode"]) == (["fake"], "ville")

    engine = app.state.sameguard.audit.engine
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.id)).mappings().all()
        events = conn.execute(select(alarm_events)).mappings().all()
    mallory = [r for r in rows if r["client"] == "mallory"]
    assert [r["alarmed"] for r in mallory] == [False] * (n - 1) + [True] * 4
    assert [r["action"] for r in mallory] == ["allow"] * (n - 1) + ["reject"] * 4
    assert all(r["evidence"] is not None for r in rows)
    assert mallory[n - 1]["evidence"] >= 3.0 > mallory[n - 2]["evidence"]
    assert [(e["client"], e["event"], e["queries"]) for e in events] == [("mallory", "raised", n)]
    assert events[0]["evidence"] == pytest.approx(mallory[n - 1]["evidence"])


def test_alarm_raised_within_a_batch_answers_200_with_the_notice(alarmed_app, kit):
    app, tokens = alarmed_app("reject")
    with TestClient(app) as client:
        r = client.post("/v1/predict", json=_b64(kit.bright(20, seed=7)), headers={"X-API-Key": tokens["mallory"]})
    body = r.json()
    assert r.status_code == 200, r.text
    first = body["refused"][0]
    assert 1 <= first and body["refused"] == list(range(first, 20))
    assert body["predictions"][first] is None and body["predictions"][0] is not None
    assert body["alarm"]["queries_at_alarm"] == first + 1


def test_misinformation_after_the_alarm_looks_like_an_answer(alarmed_app, victim, kit):
    app, tokens = alarmed_app("misinformation")
    with TestClient(app) as client:
        client.post("/v1/predict", json=_b64(kit.bright(20, seed=7)), headers={"X-API-Key": tokens["mallory"]})
        x = kit.dark(2, seed=8)
        r = client.post("/v1/predict", json=_b64(x), headers={"X-API-Key": tokens["mallory"]})
    body = r.json()
    assert (r.status_code, body["refused"], "alarm" in body) == (200, [], False), r.text
    answers = torch.tensor(body["predictions"])
    assert torch.allclose(answers.sum(1), torch.ones(2), atol=1e-5)
    assert not torch.equal(answers.argmax(1), victim.predict(x))  # misled (the reversed answer)


def test_admin_clears_an_alarm_with_the_right_token_only(alarmed_app, kit, caplog):
    app, tokens = alarmed_app("reject")
    path = "/v1/admin/clients/mallory/clear-alarm"
    with TestClient(app) as client:
        n = _alarm_mallory(client, tokens["mallory"], kit)
        assert client.post(path).status_code == 401
        assert client.post(path, headers={"Authorization": "Bearer " + "f" * 32}).status_code == 403
        assert client.post(path, headers={"X-API-Key": tokens["alice"]}).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        listed = client.get("/v1/admin/alarms", headers=admin).json()
        assert [(a["client"], a["queries_at_alarm"]) for a in listed] == [("mallory", n)]
        r = client.post("/v1/admin/clients/nobody/clear-alarm", headers=admin)
        assert (r.status_code, "Unknown client" in r.json()["detail"]) == (404, True)
        r = client.post(path, headers=admin)
        assert (r.status_code, r.json()["was_alarmed"], r.json()["queries"]) == (200, True, n), r.text
        r = client.post("/v1/predict", json=_b64(kit.dark(1, seed=30)), headers={"X-API-Key": tokens["mallory"]})
        assert (r.status_code, r.json()["refused"]) == (200, []), r.text
        assert client.get("/v1/admin/alarms", headers=admin).json() == []
        metrics = client.get("/metrics").text
    assert _metric(metrics, "sameguard_alarms_cleared_total") == 1.0
    with app.state.sameguard.audit.engine.connect() as conn:
        events = conn.execute(select(alarm_events.c.client, alarm_events.c.event)).all()
    assert [tuple(e) for e in events] == [("mallory", "raised"), ("mallory", "cleared")]
    assert ADMIN_TOKEN not in caplog.text


def test_admin_routes_are_off_without_a_token(make_app, victim, kit):
    app, _ = make_app("reject")
    with TestClient(app) as client:
        r = client.post("/v1/admin/clients/alice/clear-alarm", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert (r.status_code, "disabled" in r.json()["detail"]) == (403, True)


def test_admin_token_variable_must_be_set(make_app, monkeypatch):
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    with pytest.raises(ValueError, match=ADMIN_ENV):
        make_app("reject", admin_token_env=ADMIN_ENV)


def test_audit_command_lists_the_alarmed_client(alarmed_app, kit, capsys):
    from sameguard.service.commands import audit_main

    app, tokens = alarmed_app("reject")
    with TestClient(app) as client:
        n = _alarm_mallory(client, tokens["mallory"], kit)
    db = str(app.state.sameguard.audit.engine.url)
    assert audit_main(argparse.Namespace(db=db, since_hours=None, json=False)) == 0
    out = capsys.readouterr().out
    assert "Per-client alarms" in out
    assert re.search(rf"^\| mallory \| \d{{4}}-\d\d-\d\d [\d:]+ \| {n} \| [\d.]+ \| - \|$", out, re.MULTILINE), out
    assert audit_main(argparse.Namespace(db=db, since_hours=1.0, json=True)) == 0
    import json

    summary = {s["client"]: s for s in json.loads(capsys.readouterr().out)}
    assert [e["event"] for e in summary["mallory"]["alarm_events"]] == ["raised"]


def test_live_client_sees_refusals_after_the_alarm(alarmed_app, kit):
    app, tokens = alarmed_app("reject")
    with kit.live(app) as url, SameguardClient(url, tokens["mallory"], batch_size=1) as api:
        out = api.query(kit.bright(20, seed=40), "mallory")
        assert api.alarm is not None
        first = api.alarm["queries_at_alarm"] - 1
        assert torch.allclose(out[first:], torch.full((20 - first, 10), 0.1))
        assert not torch.allclose(out[:first], torch.full((first, 10), 0.1))
