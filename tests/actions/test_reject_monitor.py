"""Reject and Monitor on hand-made cases."""

from __future__ import annotations

import torch

from sameguard.actions import Monitor, Reject


def test_actions_reject_refuses_exactly_the_flagged_queries(probs):
    p = probs(4)
    out = Reject().apply(None, p, torch.tensor([0.1, 0.5, 0.5000001, float("nan")]), 0.5)
    assert out.refused.tolist() == [False, False, True, True]  # score > tau, and NaN fails closed
    assert out.actions == ("allow", "allow", "reject", "reject")
    assert torch.equal(out.probabilities, p)  # the same tensor passed through, unchanged


def test_actions_monitor_changes_nothing(probs):
    p = probs(3)
    out = Monitor().apply(None, p, torch.tensor([9.0, 9.0, 9.0]), 0.0)
    assert torch.equal(out.probabilities, p)  # the same tensor passed through, unchanged
    assert not out.refused.any()
    assert out.actions == ("allow",) * 3
