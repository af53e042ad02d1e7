"""The policy: maps each query's score to an action, with the calibrated threshold it compares to.

A :class:`Policy` holds one :class:`~sameguard.actions.Action` and the threshold ``tau``
(``None``: the detector's calibrated ``threshold_``, read by the guard). ``Policy.decide`` runs
the action on a batch; ``Policy.action_for(score)`` says, for one score, what the action does
(``"allow"``, ``"reject"``, ``"misinform"`` or ``"pow"``), e.g. to explain a decision.

Optionally, ``escalate=(tau2, action2)`` hands every query with ``score > tau2`` to a second
action (e.g. misinformation above ``tau``, refusal above a much larger ``tau2``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..api import flag_scores
from .base import Action, ActionOutcome, check_batch
from .misinformation import Misinformation
from .monitor import Monitor
from .proof_of_work import ProofOfWork
from .reject import Reject

__all__ = ["Policy", "POLICIES", "build_action"]

#: Action constructors by policy name.
POLICIES: dict[str, type[Action]] = {
    "monitor": Monitor,
    "reject": Reject,
    "misinformation": Misinformation,
    "pow": ProofOfWork,
}


def build_action(name: str, **kwargs: Any) -> Action:
    """Construct the action named ``name`` (see :data:`POLICIES`) with its keyword arguments."""
    if name not in POLICIES:
        raise ValueError(f"Unknown policy {name!r}; choose one of {sorted(POLICIES)}.")
    return POLICIES[name](**kwargs)


def _check_threshold(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{what} must be a number or None, got {value!r}.")
    return float(value)


class Policy:
    """Score -> action.

    Args:
        action: an :class:`Action` or a policy name (``"monitor"``, ``"reject"``,
            ``"misinformation"``, ``"pow"``); a name is built with ``**action_kwargs``.
        threshold: ``tau``; ``None`` (default) uses the detector's calibrated ``threshold_``.
        escalate: optional ``(tau2, action2)``: queries with ``score > tau2`` get ``action2``
            instead (``tau2`` should be above ``tau``).
    """

    def __init__(self, action: Action | str = "monitor", *, threshold: float | None = None,
                 escalate: tuple[float, Action] | None = None, **action_kwargs: Any) -> None:
        if isinstance(action, str):
            action = build_action(action, **action_kwargs)
        elif action_kwargs:
            raise ValueError("Keyword arguments for the action are only accepted with an action name.")
        if not isinstance(action, Action):
            raise ValueError(f"action must be an Action or a policy name, got {type(action).__name__}.")
        self.action = action
        self.threshold = _check_threshold(threshold, "threshold")
        if escalate is not None:
            tau2, action2 = escalate
            if not isinstance(action2, Action):
                raise ValueError(f"escalate must be (threshold, Action), got {escalate!r}.")
            escalate = (_check_threshold(tau2, "The escalation threshold"), action2)  # type: ignore[assignment]
        self.escalate = escalate

    @property
    def name(self) -> str:
        """The action's policy name (with the escalation's, e.g. ``"misinformation+reject"``)."""
        return self.action.name if self.escalate is None else f"{self.action.name}+{self.escalate[1].name}"

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"policy": self.name, "threshold": self.threshold, **self.action.describe()}
        if self.escalate is not None:
            d["escalate"] = {"threshold": self.escalate[0], **self.escalate[1].describe()}
        return d

    def __repr__(self) -> str:
        esc = "" if self.escalate is None else f", escalate=({self.escalate[0]!r}, {self.escalate[1]!r})"
        return f"Policy({self.action!r}, threshold={self.threshold!r}{esc})"

    def max_work_bits(self) -> int:
        """The most proof-of-work bits one request (one batch puzzle) may cost: the largest ``max_bits``
        of this policy's actions (64, the puzzle's own limit, when none has one)."""
        actions = [self.action] + ([] if self.escalate is None else [self.escalate[1]])
        caps = [int(a.max_bits) for a in actions if isinstance(getattr(a, "max_bits", None), int)]
        return max(caps) if caps else 64

    def resolve_threshold(self, detector_threshold: float | None) -> float:
        """The ``tau`` in force: this policy's, else the detector's.

        Raises:
            ValueError: neither is set (calibrate the detector or pass ``threshold=``).
        """
        tau = self.threshold if self.threshold is not None else detector_threshold
        if tau is None:
            raise ValueError("The policy has no threshold: calibrate the detector (detector.calibrate(benign_x, "
                             "target_fpr)) or give the policy threshold=...")
        return float(tau)

    def decide(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
               threshold: float) -> ActionOutcome:
        """Run the action (and the escalation) on one batch; see :meth:`Action.apply`."""
        probs, scores64, threshold = check_batch(probs, scores, threshold)
        outcome = self.action.apply(x, probs, scores64, threshold)
        if self.escalate is None:
            return outcome
        tau2, action2 = self.escalate
        high = flag_scores(scores64, tau2)
        if not bool(high.any()):
            return outcome
        rows = torch.nonzero(high).flatten()
        sub = action2.apply(None if x is None else x[rows], probs[rows], scores64[rows], tau2)
        return outcome.replace_rows(rows, sub)

    def action_for(self, score: float, threshold: float | None = None) -> str:
        """The label of what this policy does to a query with ``score`` (``threshold`` as in :meth:`decide`)."""
        tau = self.resolve_threshold(threshold)
        probs = torch.full((1, 2), 0.5)
        return self.decide(None, probs, torch.tensor([float(score)]), tau).actions[0]
