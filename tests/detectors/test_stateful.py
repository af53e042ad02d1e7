"""Per-client detectors see each client's queries as one stream behind the APIs (the guard)."""

import torch

from sameguard.api import StatefulDetector
from sameguard.guard import Guard, detector_scores


class CountingDetector:
    """Scores each query with its position in its client's stream: 1, 2, 3, ..."""

    threshold_ = 100.0

    def __init__(self):
        self.seen = {}

    def observe(self, x, client):
        start = self.seen.get(client, 0)
        self.seen[client] = start + len(x)
        return torch.arange(start + 1, start + len(x) + 1, dtype=torch.float32)

    def reset(self, client):
        self.seen.pop(client, None)

    def score(self, x):  # the stateless path, which must not be used when observe exists
        return torch.zeros(len(x))


def test_counting_detector_declares_its_per_client_state():
    assert isinstance(CountingDetector(), StatefulDetector)


def victim(x):
    return torch.full((len(x), 3), 1 / 3)


def test_detector_scores_prefers_observe_and_keeps_streams_apart():
    det = CountingDetector()
    x = torch.zeros(2, 1, 4, 4)
    assert detector_scores(det, x, "a").tolist() == [1.0, 2.0]
    assert detector_scores(det, x, "b").tolist() == [1.0, 2.0]
    assert detector_scores(det, x, "a").tolist() == [3.0, 4.0]


def test_guarded_api_streams_per_client():
    api = Guard(victim, CountingDetector(), image_shape=(1, 4, 4), num_classes=3)
    x = torch.zeros(2, 1, 4, 4)
    for client in ("a", "b", "a"):
        api.query(x, client)
    assert api.scores("a").tolist() == [1.0, 2.0, 3.0, 4.0]
    assert api.scores("b").tolist() == [1.0, 2.0]


def test_guard_streams_per_client():
    guard = Guard(victim, CountingDetector(), "monitor", image_shape=(1, 4, 4), num_classes=3)
    x = torch.zeros(3, 1, 4, 4)
    guard.query(x, "a")
    guard.query(x, "b")
    verdict = guard.protect(x, "a")
    assert [d.score for d in verdict.decisions] == [4.0, 5.0, 6.0]
