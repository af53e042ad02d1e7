"""The service for real: uvicorn on a free loopback port, concurrent clients, PoW, ART attacks over HTTP."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
import httpx
from sqlalchemy import func, select

from sameguard.actions import ProofOfWork
from sameguard.guard import Guard
from sameguard.prediction_api import PredictionAPI
from sameguard.service import SameguardClient
from sameguard.service.db import audit_log, pow_events


def test_service_live_concurrent_clients_leave_exactly_one_audit_row_per_query(make_app, victim, kit):
    n_clients, m_requests = 4, 8
    app, _ = make_app("reject")
    state = app.state.sameguard
    tokens = {f"client{i}": state.keys.create(f"client{i}")[1] for i in range(n_clients)}
    errors: list[BaseException] = []
    with kit.live(app) as url:
        assert httpx.get(url + "/healthz").json()["status"] == "ok"

        def run(name: str, token: str, seed: int) -> None:
            try:
                with SameguardClient(url, token) as api:
                    for j in range(m_requests):
                        x = kit.dark(1, seed=seed * 100 + j) if j % 2 else kit.bright(1, seed=seed * 100 + j)
                        out = api.query(x, name)
                        assert out.shape == (1, 10)
                    assert api.queries_used(name) == m_requests
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(name, tok, i)) for i, (name, tok) in enumerate(tokens.items())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    engine = state.audit.engine
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
        per_client = dict(conn.execute(select(audit_log.c.client, func.count()).group_by(audit_log.c.client)).all())
        requests = conn.execute(select(func.count(func.distinct(audit_log.c.request_id)))).scalar_one()
        actions = dict(conn.execute(select(audit_log.c.action, func.count()).group_by(audit_log.c.action)).all())
    assert total == n_clients * m_requests
    assert per_client == {name: m_requests for name in tokens}
    assert requests == n_clients * m_requests
    assert actions == {"allow": n_clients * m_requests // 2, "reject": n_clients * m_requests // 2}


def test_service_live_client_is_a_prediction_api_and_solves_pow(make_app, victim, kit):
    guard = Guard(victim, kit.FakeDetector(), ProofOfWork(benign_bits=2, bits_per_spread=2, max_bits=12))
    guard.calibrate(kit.dark(100))
    app, token = make_app(guard=guard)
    with kit.live(app) as url, SameguardClient(url, token, encoding="json") as api:
        assert isinstance(api, PredictionAPI)
        assert (api.image_shape, api.num_classes, api.output) == ((1, 28, 28), 10, "probabilities")
        x = torch.cat([kit.dark(3), kit.bright(2)])
        out = api.query(x)
        assert torch.allclose(out, victim.predict_proba(x), atol=1e-6)
        assert api.pow_solved == 1
        assert api.pow_hashes >= 1
        with SameguardClient(url, token, output="labels") as labels_api:
            assert torch.equal(labels_api.query(x), victim.predict(x))
        # A replayed redemption over HTTP is refused.
        r = httpx.post(url + "/v1/predict", headers={"X-API-Key": token}, json={"instances": x.tolist()})
        ch = r.json()["challenge"]
        from sameguard.actions import solve

        body = {"challenge": ch["challenge"], "signature": ch["signature"], "nonce": solve(ch["challenge"], ch["bits"])}
        assert httpx.post(url + "/v1/pow/redeem", headers={"X-API-Key": token}, json=body).status_code == 200
        again = httpx.post(url + "/v1/pow/redeem", headers={"X-API-Key": token}, json=body)
        assert (again.status_code, "single use" in again.json()["detail"]) == (409, True), again.text
    with app.state.sameguard.audit.engine.connect() as conn:
        outcomes = dict(conn.execute(select(pow_events.c.outcome, func.count()).group_by(pow_events.c.outcome)).all())
    assert outcomes == {"issued": 3, "redeemed": 3, "replayed": 1}


def test_service_live_art_attacks_run_against_the_service(make_app, victim, kit):
    pytest.importorskip("art")
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    from sameguard.models import build_classifier
    from sameguard.service.art import to_art_classifier

    app, token = make_app("misinformation")
    pool = torch.cat([kit.dark(24, seed=3), kit.bright(8, seed=4)]).numpy()

    def thief() -> PyTorchClassifier:
        torch.manual_seed(0)
        net = build_classifier("lenet5", 1, 28, 10)
        return PyTorchClassifier(net, loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
                                 input_shape=(1, 28, 28), nb_classes=10, clip_values=(-1.0, 1.0), device_type="cpu")

    np.random.seed(0)  # ART samples with the global NumPy RNG
    with kit.live(app) as url, SameguardClient(url, token) as api:
        art_victim = to_art_classifier(api)
        assert art_victim.predict(pool[:2]).shape == (2, 10)
        stolen = CopycatCNN(art_victim, batch_size_fit=16, batch_size_query=16, nb_epochs=1, nb_stolen=32,
                            use_probability=True).extract(pool, thieved_classifier=thief())
        assert stolen.predict(pool[:4]).shape == (4, 10)
        knock = KnockoffNets(art_victim, batch_size_fit=16, batch_size_query=16, nb_epochs=1, nb_stolen=16,
                             sampling_strategy="random", verbose=False).extract(pool, thieved_classifier=thief())
        assert knock.predict(pool[:4]).shape == (4, 10)
    audit = app.state.sameguard.audit
    assert audit.count("alice") == 2 + 32 + 16  # every image ART sent went through the guard
    with audit.engine.connect() as conn:
        actions = set(conn.execute(select(audit_log.c.action).distinct()).scalars())
    assert actions == {"allow", "misinform"}


def test_service_live_serve_command_in_a_subprocess(tmp_path, kit):
    """``sameguard serve`` for real: keys created by the command, the server in its own process, then stopped."""
    import argparse
    import contextlib
    import io
    import os
    import socket
    import subprocess
    import sys
    import time

    from sameguard.service.commands import keys_main

    kit.make_victim().save(tmp_path / "victim")
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        keys_main(argparse.Namespace(keys_command="create", name="carol", db=db))
    token = out.getvalue().strip().splitlines()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sameguard.cli", "serve", "--victim", str(tmp_path / "victim"),
           "--policy", "off", "--db", db, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.2)
        with SameguardClient(url, token) as api:
            x = kit.dark(3)
            assert torch.allclose(api.query(x), kit.make_victim().predict_proba(x), atol=1e-6)
        assert httpx.get(url + "/v1/model").status_code == 401
        assert httpx.get(url + "/healthz").json()["policy"] == "off"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    from sameguard.service.audit import summarize
    from sameguard.service.db import make_engine

    engine = make_engine(db)
    [summary] = summarize(engine)
    engine.dispose()
    assert (summary.client, summary.queries, summary.mean_score) == ("carol", 3, None)
