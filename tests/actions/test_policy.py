"""The policy: scores to actions, with escalation, and the action registry."""

from __future__ import annotations

import pytest
import torch

from sameguard.actions import Policy, ProofOfWork, Reject, build_action


@pytest.mark.parametrize(("score", "action"), [(0.1, "allow"), (0.7, "misinform"), (2.0, "reject")])
def test_actions_policy_maps_scores_to_actions_with_escalation(score, action):
    policy = Policy("misinformation", escalate=(1.0, Reject()))
    assert policy.name == "misinformation+reject"
    assert policy.action_for(score, 0.5) == action


def test_actions_policy_decides_a_batch(probs):
    policy = Policy("misinformation", escalate=(1.0, Reject()))
    p = probs(3)
    out = policy.decide(None, p, torch.tensor([0.1, 0.7, 2.0]), 0.5)
    assert out.refused.tolist() == [False, False, True]
    assert torch.equal(out.probabilities[0], p[0])  # benign: passed through
    assert not torch.equal(out.probabilities[1], p[1])  # misinformed


def test_actions_policy_threshold_and_registry():
    assert Policy(Reject(), threshold=0.2).resolve_threshold(None) == 0.2
    with pytest.raises(ValueError, match="no threshold"):
        Policy("reject").resolve_threshold(None)
    with pytest.raises(ValueError, match="Unknown policy"):
        build_action("shout")
    assert isinstance(build_action("pow", benign_bits=4), ProofOfWork)
