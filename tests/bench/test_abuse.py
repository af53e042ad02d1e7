"""The abusive-key measurement runs against a live service and counts what the abuser got."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("limits")

from sameguard.bench.abuse import markdown, measure_abuse
from sameguard.guard import Guard
from sameguard.models import build_classifier
from sameguard.service import ServerThread, ServiceSettings, create_app
from sameguard.victim import Victim


def test_measure_abuse_on_a_live_service(tmp_path):
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="test", image_shape=(1, 28, 28),
                    classes=[str(i) for i in range(10)])
    app = create_app(ServiceSettings(db_url=f"sqlite:///{tmp_path / 'a.db'}", request_burst=10,
                                     request_rate_per_second=5),
                     guard=Guard(victim, None, "monitor", keep_decisions=0))
    keys = app.state.sameguard.keys
    victim_key, abuser_key = keys.create("victim")[1], keys.create("abuser")[1]
    with ServerThread(app) as server:
        rows = measure_abuse(server.url, victim_key, abuser_key, seconds=1.0, pace=4, threads=2,
                             scenarios=("alone", "invalid"))
    alone, invalid = rows
    assert alone["ratio_to_alone"] == 1.0 and alone["victim_ok"] == alone["victim_requests"] >= 3
    assert invalid["abuser_429"] > 0 and invalid["abuser_ok"] == 0
    assert invalid["victim_ok"] == invalid["victim_requests"]  # the victim's key is not the abuser's
    assert "| invalid |" in markdown(rows)
