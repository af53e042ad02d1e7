"""Fixtures for the service tests: a tiny untrained victim, a transparent fake detector, app factories.

The fake detector's score is the mean pixel value of the image and its threshold is 0, so a test
decides which queries are flagged by choosing bright (flagged) or dark (benign) images. The
victim is an untrained LeNet-5 (seeded): the service does not care whether it is accurate.
Everything runs single-threaded to leave the shared cores alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from sameguard.models import build_classifier
from sameguard.victim import Victim


class FakeDetector:
    """``score(x) = mean pixel value`` per image (in ``[-1, 1]``), threshold 0: bright = suspicious."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold_ = threshold

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)

    def calibrate(self, x: torch.Tensor, target_fpr: float) -> FakeDetector:
        from sameguard.api import threshold_at_fpr

        self.threshold_ = threshold_at_fpr(self.score(x), target_fpr)
        return self


def make_victim(seed: int = 0) -> Victim:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier("lenet5", 1, 28, 10)
    return Victim(model, arch="lenet5", dataset="test", image_shape=(1, 28, 28), classes=[str(i) for i in range(10)])


@pytest.fixture(scope="session")
def victim() -> Victim:
    return make_victim()


@pytest.fixture
def detector() -> FakeDetector:
    return FakeDetector()


def dark(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` benign images: values in ``[-1, -0.2]`` (mean < 0, never flagged)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 0.8 - 1.0


def bright(n: int, seed: int = 1) -> torch.Tensor:
    """``n`` suspicious images: values in ``[0.2, 1]`` (mean > 0, always flagged)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 0.8 + 0.2


@pytest.fixture
def make_app(tmp_path, victim):
    """``make_app(policy="reject", guard=None, **settings) -> (app, token)`` with a fresh SQLite database."""
    pytest.importorskip("fastapi")
    from sameguard.guard import Guard
    from sameguard.service import ServiceSettings, create_app

    counter = iter(range(1000))

    def factory(policy="reject", guard=None, *, issuer=None, client_name="alice", **overrides):
        if guard is None:
            guard = Guard(victim, FakeDetector(), policy)
        db = tmp_path / f"service-{next(counter)}.db"
        settings = ServiceSettings(db_url=f"sqlite:///{db}", key_cache_s=0, **overrides)
        app = create_app(settings, guard=guard, issuer=issuer)
        _, token = app.state.sameguard.keys.create(client_name)
        return app, token

    return factory


@contextlib.contextmanager
def live(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yields the base URL."""
    from sameguard.service import ServerThread

    with ServerThread(app, "127.0.0.1", 0) as server:
        yield server.url


@pytest.fixture(scope="session")
def kit():
    """The helpers above, as a fixture (test modules must not import ``conftest``: the name is shared)."""
    from types import SimpleNamespace

    return SimpleNamespace(FakeDetector=FakeDetector, dark=dark, bright=bright, live=live, make_victim=make_victim)
