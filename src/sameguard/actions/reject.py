"""Reject: refuse to answer the queries whose score is above the calibrated threshold.

The simplest response to a detector (e.g. PRADA, Juuti et al., EuroS&P 2019, stops answering a
client it flags; SAME, Xie et al., AAAI 2024, leaves the response to the provider). Here the
refusal is **per query**: in a batch, only the flagged images are refused and the others are
answered. A NaN score fails closed (refused).

What a refused query looks like to the caller is decided by whoever serves the answer: the HTTP
service sends ``null`` for the row and lists it in ``refused``; the in-process
:class:`~sameguard.guard.Guard` answers the uniform vector ``1/K`` (no information about the
model) or raises, as configured.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..api import flag_scores
from .base import Action, ActionOutcome, check_batch

__all__ = ["Reject"]


class Reject(Action):
    """Withhold the answer of every query with ``score > threshold``."""

    name: ClassVar[str] = "reject"

    def apply(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
              threshold: float) -> ActionOutcome:
        probs, scores, threshold = check_batch(probs, scores, threshold)
        refused = flag_scores(scores, threshold)
        labels = tuple("reject" if r else "allow" for r in refused.tolist())
        n = probs.shape[0]
        return ActionOutcome(probabilities=probs, refused=refused, actions=labels,
                             work_bits=torch.zeros(n, dtype=torch.int64), alpha=torch.zeros(n, dtype=torch.float32))
