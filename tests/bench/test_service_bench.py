"""The service benchmark's timing part, for real on loopback, with a tiny untrained victim."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from sameguard.bench.service_bench import measure_service
from sameguard.models import build_classifier
from sameguard.victim import Victim


class _MeanScore:
    """Score = mean pixel value, threshold 0 (the service tests' fake detector, in small)."""

    threshold_ = 0.0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def test_measure_service_rows(tmp_path):
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="test", image_shape=(1, 28, 28),
                    classes=[str(i) for i in range(10)])
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    lines: list[str] = []
    rows = measure_service(victim, _MeanScore(), images, settings=("off", "monitor"), batch_sizes=(1, 3), requests=5,
                           requests_large=5, concurrency=2, workdir=tmp_path, echo=lines.append)
    assert [(r.setting, r.batch, r.requests, r.errors) for r in rows] == [
        ("off", 1, 5, 0), ("off", 3, 5, 0), ("monitor", 1, 5, 0), ("monitor", 3, 5, 0)]
    assert all(r.p99_ms >= r.p50_ms > 0 and r.images_per_s == pytest.approx(r.requests_per_s * r.batch) for r in rows)
    assert len(lines) == 4
    with pytest.raises(ValueError, match="positive"):
        measure_service(victim, None, images, settings=("off",), requests=0)


def test_measure_service_bare_and_batched_rows(tmp_path):
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="test", image_shape=(1, 28, 28),
                    classes=[str(i) for i in range(10)])
    detector = _MeanScore()
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    rows = measure_service(victim, detector, images, settings=("bare", "monitor-batched"), batch_sizes=(1,),
                           requests=6, requests_large=1, concurrency=3, workdir=tmp_path, echo=lambda _: None)
    assert [(r.setting, r.batch, r.requests, r.errors) for r in rows] == [("bare", 1, 6, 0), ("monitor-batched", 1, 6, 0)]
    assert "logits" not in vars(victim) and "score" not in vars(detector)  # batching undone for the next setting
