"""Monitor: answer every query unchanged; the score and the flag are only recorded.

This is the detection-only deployment (what the SAME paper evaluates): the provider learns who is
stealing without changing any answer, and acts on it out of band (revoking a key, raising a
price). Flagged queries are labelled ``"allow"`` like the others; the decision records carry the
flag.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Action, ActionOutcome, check_batch

__all__ = ["Monitor"]


class Monitor(Action):
    """Answer everything unchanged (detection only)."""

    name: ClassVar[str] = "monitor"

    def apply(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
              threshold: float) -> ActionOutcome:
        probs, _, _ = check_batch(probs, scores, threshold)
        return ActionOutcome.passthrough(probs)
