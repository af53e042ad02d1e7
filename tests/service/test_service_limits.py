"""Rate limits count every request of a key (issue 12, finding 6), and revocation through the state store (finding 8)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("limits")
from fastapi.testclient import TestClient

from sameguard.service.db import init_db, make_engine
from sameguard.service.keys import KeyStore
from sameguard.service.store import MemoryServiceStore, RedisServiceStore


def _b64(x):
    import base64

    return {"b64": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), "shape": list(x.shape)}


def test_invalid_requests_count_against_the_key_request_limit(make_app, kit):
    app, token = make_app("monitor", request_burst=3, request_rate_per_second=0.01)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        for body in (b"{not json", b"[]", b"\x00" * 10):
            r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code in (400, 422), r.text
        r = client.post("/v1/predict", json=_b64(kit.dark(1)))
        assert r.status_code == 429
        assert "Request rate limit" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        assert client.get("/v1/model").status_code == 429  # every endpoint of the key counts
    assert app.state.sameguard.audit.count() == 0


def test_request_limits_are_per_key(make_app, kit):
    app, token = make_app("monitor", request_burst=2, request_rate_per_second=0.01)
    _, other = app.state.sameguard.keys.create("bob")
    with TestClient(app) as client:
        for _ in range(2):
            assert client.get("/v1/model", headers={"X-API-Key": token}).status_code == 200
        assert client.get("/v1/model", headers={"X-API-Key": token}).status_code == 429
        assert client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": other}).status_code == 200


def test_unknown_keys_are_refused_before_any_limit(make_app):
    app, _ = make_app("monitor", request_burst=1, request_rate_per_second=0.01)
    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/v1/model", headers={"X-API-Key": "sg_nope"}).status_code == 401


def _keys(tmp_path, store, cache_s):
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    init_db(engine)
    return KeyStore(engine, cache_s=cache_s, store=store)


def test_revocation_through_a_shared_store_is_immediate(tmp_path, redis_server):
    worker = _keys(tmp_path, RedisServiceStore(redis_server.url, prefix=redis_server.prefix), cache_s=60)
    _, token = worker.create("alice")
    assert worker.verify(token) is not None  # now cached for 60 s
    operator = _keys(tmp_path, RedisServiceStore(redis_server.url, prefix=redis_server.prefix), cache_s=0)
    assert operator.revoke(name="alice") == 1
    assert worker.verify(token) is None


def test_without_a_shared_store_a_revoked_key_is_served_until_its_cache_entry_expires(tmp_path):
    worker = _keys(tmp_path, MemoryServiceStore(), cache_s=60)
    _, token = worker.create("alice")
    assert worker.verify(token) is not None
    operator = _keys(tmp_path, None, cache_s=0)  # another process (the CLI): it cannot reach the worker's memory
    assert operator.revoke(name="alice") == 1
    assert worker.verify(token) is not None  # the documented delay (key_cache_s)
    worker._cache.clear()
    assert worker.verify(token) is None


def test_the_app_runs_on_a_redis_state_store(make_app, kit, redis_server):
    app, token = make_app("reject", state_url=redis_server.url, state_prefix=redis_server.prefix, rate_burst=3,
                          rate_per_second=0.01)
    assert app.state.sameguard.store.shared
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        assert client.post("/v1/predict", json=_b64(kit.dark(3))).status_code == 200
        assert client.post("/v1/predict", json=_b64(kit.dark(1))).status_code == 429


def test_refusals_come_before_the_body_is_read(make_app, kit):
    app, token = make_app("monitor", rate_burst=2, rate_per_second=0.01)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        assert client.post("/v1/predict", json=_b64(kit.dark(2))).status_code == 200
        # The key's image window is empty: even a malformed body is answered 429 (it is never decoded).
        r = client.post("/v1/predict", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 429 and "Rate limit" in r.json()["detail"]
        assert r.headers["X-Request-ID"] == r.json()["request_id"]
        assert client.get("/v1/model").status_code == 200  # other endpoints only count requests


def test_with_a_shared_store_a_refusal_that_empties_the_window_turns_the_next_bodies_away_unread(make_app, kit,
                                                                                                   redis_server):
    app, token = make_app("monitor", state_url=redis_server.url, state_prefix=redis_server.prefix, rate_burst=2,
                          rate_per_second=0.01)
    limiter = app.state.sameguard.limiter
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        assert client.post("/v1/predict", json=_b64(kit.dark(2))).status_code == 200
        assert not limiter.exhausted("alice")  # emptied by a grant: no round trip tells this worker
        bad = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
        assert client.post("/v1/predict", **bad).status_code in (400, 422)  # decoded, so refused as malformed
        r = client.post("/v1/predict", json=_b64(kit.dark(1)))  # the image charge refuses: the window is empty
        assert r.status_code == 429
        assert limiter.exhausted("alice")
        r = client.post("/v1/predict", **bad)  # now turned away before its body is read
        assert r.status_code == 429 and "Rate limit" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        limiter._empty_until["alice"] = 0.0  # the remembered wait is over
        assert not limiter.exhausted("alice") and "alice" not in limiter._empty_until
    assert app.state.sameguard.audit.count() == 2


def test_a_refused_batch_that_leaves_room_is_not_remembered(make_app, kit, redis_server):
    app, token = make_app("monitor", state_url=redis_server.url, state_prefix=redis_server.prefix, rate_burst=3,
                          rate_per_second=0.01)
    with TestClient(app) as client:
        client.headers["X-API-Key"] = token
        assert client.post("/v1/predict", json=_b64(kit.dark(2))).status_code == 200
        assert client.post("/v1/predict", json=_b64(kit.dark(2))).status_code == 429  # 1 image left, 2 asked
        assert not app.state.sameguard.limiter.exhausted("alice")
        assert client.post("/v1/predict", json=_b64(kit.dark(1))).status_code == 200  # the one image left


def test_a_prediction_verifies_its_key_once(make_app, kit, monkeypatch):
    app, token = make_app("monitor")
    keys = app.state.sameguard.keys
    calls = []
    verify = keys.verify
    monkeypatch.setattr(keys, "verify", lambda t: calls.append(t) or verify(t))
    with TestClient(app) as client:
        r = client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": token})
        assert r.status_code == 200
        assert calls == [token]
        assert client.post("/v1/predict", json=_b64(kit.dark(1)), headers={"X-API-Key": "sg_nope"}).status_code == 401
