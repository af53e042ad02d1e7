"""NaN and infinite detector scores are flagged everywhere: the library, the actions, the guard, the CLI, the service.

A score that is not finite comes from a broken detector (corrupted weights, overflow), never from a
working one, so every place that compares a score with the threshold treats it as flagged (issue 12,
finding 5: ``sameguard score`` wrote ``flagged=0`` for NaN scores).
"""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import safetensors.torch
import torch

from sameguard.actions import Misinformation, Policy, ProofOfWork, Reject
from sameguard.artifacts import sha256_file
from sameguard.guard import Guard

BAD = [math.nan, math.inf, -math.inf]


def test_flag_scores_flags_every_non_finite_score():
    from sameguard.api import flag_scores

    scores = torch.tensor([0.1, 0.9, *BAD], dtype=torch.float64)
    assert flag_scores(scores, 0.5).tolist() == [False, True, True, True, True]


def test_actions_fail_closed_on_non_finite_scores():
    probs = torch.full((3, 4), 0.25)
    scores = torch.tensor(BAD, dtype=torch.float64)
    assert Reject().apply(None, probs, scores, 0.5).refused.tolist() == [True, True, True]
    mis = Misinformation().apply(None, probs, scores, 0.5)
    assert torch.allclose(mis.alpha.double(), torch.ones(3, dtype=torch.float64))
    pow_ = ProofOfWork(max_bits=20).calibrate(torch.linspace(0, 1, 100))
    assert pow_.bits_for(scores).tolist() == [20, 20, 20]


class _ConstantDetector:
    def __init__(self, value: float) -> None:
        self.value, self.threshold_ = value, 0.0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x),), self.value)


@pytest.mark.parametrize("value", BAD)
def test_guard_flags_and_refuses_non_finite_scores(value):
    from sameguard.models import build_classifier
    from sameguard.victim import Victim

    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="test", image_shape=(1, 28, 28),
                    classes=[str(i) for i in range(10)])
    guard = Guard(victim, _ConstantDetector(value), Policy("reject"))
    verdict = guard.protect(torch.zeros(2, 1, 28, 28) - 0.5, "alice")
    assert verdict.refused.tolist() == [True, True]
    assert [d.flagged for d in verdict.decisions] == [True, True]


def _nan_weights(folder, part: str) -> None:
    """Corrupt one weight file of an artifact with NaNs and fix its hash in the manifest (loads cleanly)."""
    path = folder / f"{part}.safetensors"
    state = safetensors.torch.load_file(str(path))
    first = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[first] = torch.full_like(state[first], float("nan"))
    safetensors.torch.save_file(state, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][path.name] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_cli_score_flags_nan_scores(tiny_victim, tiny_same, tmp_path, capsys):
    import numpy as np

    from sameguard.cli import main

    tiny_victim.save(tmp_path / "victim")
    tiny_same.save(tmp_path / "det")
    _nan_weights(tmp_path / "det", "aux")
    np.save(tmp_path / "x.npy", (torch.zeros(3, 1, 28, 28) - 0.5).numpy())
    code = main(["score", "--detector", str(tmp_path / "det"), "--victim", str(tmp_path / "victim"),
                 "--images", str(tmp_path / "x.npy"), "--out", "-"])
    assert code == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out[out.index("image,"):])))
    assert len(rows) == 3
    assert all(math.isnan(float(r["score"])) for r in rows)
    assert [r["flagged"] for r in rows] == ["1", "1", "1"]
