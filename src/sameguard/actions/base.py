"""What every action shares: the :class:`Action` base class and the :class:`ActionOutcome` it returns.

An action is what the provider does with a detector's score (larger = more suspicious) once the
victim has answered. It sees, for one batch:

* ``x``: the queries ``(N, C, H, W)`` in ``[-1, 1]``;
* ``probs``: the victim's true answers ``(N, K)``, rows on the probability simplex;
* ``scores``: the detector's scores ``(N,)``;
* ``threshold``: the calibrated threshold ``tau`` (a query is *flagged* when ``score > tau``).

and returns, per query, the probability vector to send, whether the answer is withheld, the name
of what was done and, for proof-of-work, the puzzle difficulty the query costs. Actions are
stateless per query (proof-of-work keeps only its calibration), so one action object can serve
many threads.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["Action", "ActionOutcome", "ACTION_LABELS", "check_batch"]

#: The per-query action labels written to decisions and the audit log.
ACTION_LABELS: tuple[str, ...] = ("allow", "reject", "misinform", "pow")


@dataclass(frozen=True)
class ActionOutcome:
    """What an action decided for one batch of ``N`` queries.

    Attributes:
        probabilities: ``(N, K)`` float32 answers to send, every row on the simplex. Rows that are
            refused hold the victim's answer unchanged here; it is never sent (see ``refused``).
        refused: ``(N,)`` bool, True where the answer is withheld.
        actions: ``N`` labels from :data:`ACTION_LABELS`, what was done to each query.
        work_bits: ``(N,)`` int64 proof-of-work difficulty (leading zero bits) each query costs;
            zeros for actions other than proof-of-work.
        alpha: ``(N,)`` float32 weight of the misleading answer in ``[0, 1]`` (zeros for actions
            other than misinformation).
    """

    probabilities: torch.Tensor
    refused: torch.Tensor
    actions: tuple[str, ...]
    work_bits: torch.Tensor
    alpha: torch.Tensor

    @classmethod
    def passthrough(cls, probs: torch.Tensor, actions: Sequence[str] | None = None) -> ActionOutcome:
        """The victim's answers unchanged, nothing refused, no work."""
        n = probs.shape[0]
        labels = tuple(actions) if actions is not None else ("allow",) * n
        return cls(probabilities=probs, refused=torch.zeros(n, dtype=torch.bool), actions=labels,
                   work_bits=torch.zeros(n, dtype=torch.int64), alpha=torch.zeros(n, dtype=torch.float32))

    def replace_rows(self, rows: torch.Tensor, sub: ActionOutcome) -> ActionOutcome:
        """This outcome with the rows ``rows`` (``(M,)`` int64 indices) taken from ``sub`` (``M`` rows)."""
        answers, refused = self.probabilities.clone(), self.refused.clone()
        bits, alpha, labels = self.work_bits.clone(), self.alpha.clone(), list(self.actions)
        answers[rows], refused[rows], bits[rows], alpha[rows] = sub.probabilities, sub.refused, sub.work_bits, sub.alpha
        for j, i in enumerate(rows.tolist()):
            labels[i] = sub.actions[j]
        return ActionOutcome(probabilities=answers, refused=refused, actions=tuple(labels), work_bits=bits,
                             alpha=alpha)


def check_batch(probs: object, scores: object, threshold: object) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate an action's inputs; returns ``(probs (N, K) float32, scores (N,) float64, threshold)``.

    Raises:
        ValueError: with a sentence saying what was expected.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be a (N, K) tensor of probabilities with K >= 2, got "
                         f"{tuple(getattr(probs, 'shape', ())) or type(probs).__name__}.")
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    if scores.numel() != probs.shape[0]:
        raise ValueError(f"Got {scores.numel()} scores for {probs.shape[0]} answers; one score per query is needed.")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (the calibrated tau), got {threshold!r}.")
    probs = probs.detach().to("cpu", torch.float32)
    return probs, scores, float(threshold)


class Action(abc.ABC):
    """Base class of the actions: ``apply(x, probs, scores, threshold) -> ActionOutcome``.

    Subclasses set :attr:`name` (the policy name, e.g. ``"reject"``) and implement :meth:`apply`.
    """

    #: The policy name of the action (``"monitor"``, ``"reject"``, ``"misinformation"``, ``"pow"``).
    name: ClassVar[str] = "action"

    @abc.abstractmethod
    def apply(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
              threshold: float) -> ActionOutcome:
        """Decide what to answer for a batch.

        Args:
            x: ``(N, C, H, W)`` queries in ``[-1, 1]`` (may be ``None`` for actions that do not
                look at the images).
            probs: ``(N, K)`` the victim's probabilities.
            scores: ``(N,)`` detector scores, larger = more suspicious.
            threshold: the calibrated threshold ``tau``.
        """

    def apply_alarmed(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
                      evidence: torch.Tensor) -> ActionOutcome:
        """Decide for queries of a client that is alarmed (per-client evidence reached ``1/delta``).

        Every such query gets the action, whatever its own score: by default :meth:`apply` with
        the threshold at ``-inf`` (refuse everything, mislead at full weight). ``evidence`` is
        ``(N,)`` log10 of the client's test martingale after each query (``>= log10(1/delta)``);
        proof-of-work uses it to grow the difficulty.
        """
        return self.apply(x, probs, scores, float("-inf"))

    def describe(self) -> dict[str, object]:
        """JSON-serialisable parameters, for health checks and logs."""
        return {"action": self.name}

    def __repr__(self) -> str:
        params = {k: v for k, v in self.describe().items() if k != "action"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
