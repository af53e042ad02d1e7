"""One service worker process for the multi-worker tests: ``python _worker_app.py PORT POLICY`` with the
settings in ``SAMEGUARD_*`` variables (database, state store, secret, limits).

It serves the same tiny victim and fake detector as ``conftest.py`` (an untrained seeded LeNet-5;
score = mean pixel, threshold 0), so every worker answers alike.
"""

from __future__ import annotations

import sys

import torch


class FakeDetector:
    def __init__(self) -> None:
        self.threshold_ = 0.0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def main(port: int, policy: str) -> None:
    import uvicorn

    from sameguard.actions import ProofOfWork
    from sameguard.guard import Guard
    from sameguard.models import build_classifier
    from sameguard.service import create_app
    from sameguard.victim import Victim

    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_classifier("lenet5", 1, 28, 10)
    victim = Victim(model, arch="lenet5", dataset="test", image_shape=(1, 28, 28), classes=[str(i) for i in range(10)])
    action = ProofOfWork(benign_bits=2, bits_per_spread=2, max_bits=12) if policy == "pow" else policy
    guard = Guard(victim, FakeDetector(), action)
    if policy == "pow":
        g = torch.Generator().manual_seed(0)
        guard.calibrate(torch.rand(100, 1, 28, 28, generator=g) * 0.8 - 1.0)
    app = create_app(guard=guard)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
