"""Adaptive Misinformation: answer suspicious queries with a misleading probability vector.

Kariyappa & Qureshi, "Defending Against Model Stealing Attacks With Adaptive Misinformation",
CVPR 2020 (arXiv 1911.07100). Reference implementation: sanjaykariyappa/adaptive_misinformation
(``admis/utils/defense.py``, class ``selectiveMisinformation``).

The paper answers every query with

    y' = (1 - alpha) * y + alpha * y_mis,        alpha = sigmoid(nu * (tau - max_k y_k))

where ``y`` is the victim's answer, ``y_mis = softmax(F_hat(x))`` is the answer of a separate
*misinformation model* ``F_hat`` trained to minimise the probability of the correct class
(``CE(log(1 - softmax(F_hat(x)) + 1e-7), t)``), the out-of-distribution score is the maximum
softmax probability (low = suspicious) and ``nu = 10000`` is hard-coded in the authors' code,
which makes the switch almost a step.

Here the OOD score is any detector's score (larger = more suspicious, e.g. SAME), so the switch
is written with the sign flipped, and two deviations are made on purpose (documented, and each
can be turned back to the paper's form):

* **Switch** (``switch="onesided"``, default): ``alpha = tanh(nu * max(score - tau, 0) / 2)``,
  which equals ``2 * sigmoid(nu * max(score - tau, 0)) - 1``. It is continuous, increasing, as
  steep as the paper's at ``nu = 1e4``, and exactly ``0`` at and below the threshold, so benign
  answers (``score <= tau``) are returned **bit for bit unchanged**; the paper's
  ``sigmoid(nu * (score - tau))`` (``switch="paper"``) perturbs every answer a little and gives
  ``alpha = 0.5`` at the threshold.
* **Misleading vector** (``misleading="reverse"``, default): a training-free stand-in for the
  misinformation model: the victim's own answer reversed, ``y_mis = softmax(-log(y) / T)``, i.e.
  ``y_mis_k`` proportional to ``y_k^(-1/T)``. It puts most of its mass on the classes the victim
  finds *least* likely and the least on the true argmax, so it is confidently wrong like the
  paper's ``F_hat`` (``"least_likely"`` is its one-hot limit). A trained misinformation model can
  be plugged in as ``misleading=callable(x, probs) -> (N, K) probabilities``.

The answer ``y'`` is a convex combination of two points of the simplex and is renormalised in
``float32``, so every row is on the simplex (non-negative, sums to 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch

from .base import Action, ActionOutcome, check_batch

__all__ = ["Misinformation", "misinformation_weight", "reverse_probabilities", "least_likely", "mislead", "SWITCHES",
           "MISLEADING"]

SWITCHES = ("onesided", "paper")
MISLEADING = ("reverse", "least_likely")

#: ``(x (N, C, H, W), probs (N, K)) -> misleading probabilities (N, K)``.
MisleadingFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def misinformation_weight(scores: torch.Tensor, threshold: float, nu: float = 1e4,
                          switch: Literal["onesided", "paper"] = "onesided") -> torch.Tensor:
    """``(N,)`` float64 weight ``alpha`` of the misleading answer, in ``[0, 1]``.

    * ``"onesided"``: ``alpha = tanh(nu * max(score - tau, 0) / 2)`` (0 at and below ``tau``);
    * ``"paper"``: ``alpha = sigmoid(nu * (score - tau))`` (Kariyappa & Qureshi's switch with the
      score's sign flipped: there the score is the maximum softmax probability, low = suspicious).

    NaN and infinite scores get ``alpha = 1`` (fail closed).
    """
    if switch not in SWITCHES:
        raise ValueError(f"switch must be one of {SWITCHES}, got {switch!r}.")
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if switch == "onesided":
        alpha = torch.tanh(nu * torch.clamp(s - threshold, min=0.0) / 2.0)
    else:
        alpha = torch.sigmoid(nu * (s - threshold))
    return torch.where(torch.isfinite(s), alpha, torch.ones_like(alpha))


def reverse_probabilities(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(-log(probs) / T)``: the answer reversed, most mass on the least likely classes.

    Args:
        probs: ``(N, K)`` probabilities.
        temperature: ``T > 0``; larger is smoother, ``T -> 0`` tends to :func:`least_likely`.

    Returns:
        ``(N, K)`` float32 rows on the simplex; ``argmax`` is the victim's ``argmin``.
    """
    log_p = torch.log(probs.to(torch.float64).clamp_min(1e-300))
    return torch.softmax(-log_p / temperature, dim=1).to(torch.float32)


def least_likely(probs: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` float32 one-hot vectors on the victim's least likely class."""
    out = torch.zeros_like(probs, dtype=torch.float32)
    return out.scatter_(1, probs.argmin(dim=1, keepdim=True), 1.0)


def mislead(probs: torch.Tensor, misleading: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(1 - alpha) * probs + alpha * misleading``, renormalised onto the simplex; ``(N, K)`` float32.

    Rows with ``alpha == 0`` are returned exactly as given (no renormalisation touches them).
    """
    a = alpha.to(torch.float64).reshape(-1, 1)
    mixed = (1.0 - a) * probs.to(torch.float64) + a * misleading.to(torch.float64)
    mixed = mixed.clamp_min(0.0)
    mixed = (mixed / mixed.sum(dim=1, keepdim=True)).to(torch.float32)
    untouched = (alpha == 0).reshape(-1, 1)
    return torch.where(untouched, probs.to(torch.float32), mixed)


class Misinformation(Action):
    """Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) driven by a detector's score.

    Args:
        nu: steepness of the switch in ``1 / score units`` (authors' code: ``10000``). With SAME
            scores of order ``1e-2``, ``nu = 1e4`` is a near step just above ``tau``.
        switch: ``"onesided"`` (default; benign answers unchanged bit for bit) or ``"paper"``.
        misleading: ``"reverse"`` (default, ``softmax(-log y / T)``), ``"least_likely"``, or a
            callable ``(x, probs) -> (N, K)`` probabilities, e.g. a trained misinformation model.
        temperature: ``T`` of ``"reverse"``, positive (default 1).
    """

    name: ClassVar[str] = "misinformation"

    def __init__(self, *, nu: float = 1e4, switch: Literal["onesided", "paper"] = "onesided",
                 misleading: Literal["reverse", "least_likely"] | MisleadingFn = "reverse",
                 temperature: float = 1.0) -> None:
        if isinstance(nu, bool) or not isinstance(nu, (int, float)) or not math.isfinite(nu) or nu <= 0:
            raise ValueError(f"nu must be a positive finite number (the switch's steepness), got {nu!r}.")
        if switch not in SWITCHES:
            raise ValueError(f"switch must be one of {SWITCHES}, got {switch!r}.")
        if not callable(misleading) and misleading not in MISLEADING:
            raise ValueError(f"misleading must be one of {MISLEADING} or a callable (x, probs) -> probabilities, "
                             f"got {misleading!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
        self.nu = float(nu)
        self.switch = switch
        self.misleading = misleading
        self.temperature = float(temperature)

    def describe(self) -> dict[str, object]:
        kind = self.misleading if isinstance(self.misleading, str) else getattr(
            self.misleading, "__name__", type(self.misleading).__name__)
        return {"action": self.name, "nu": self.nu, "switch": self.switch, "misleading": kind,
                "temperature": self.temperature}

    def misleading_answers(self, x: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` float32 misleading probabilities for the given answers."""
        if self.misleading == "reverse":
            return reverse_probabilities(probs, self.temperature)
        if self.misleading == "least_likely":
            return least_likely(probs)
        out = torch.as_tensor(self.misleading(x, probs)).detach().to("cpu", torch.float32)  # type: ignore[operator]
        if out.shape != probs.shape or not torch.isfinite(out).all() or (out < 0).any():
            raise ValueError(f"The misleading function must return finite non-negative probabilities of shape "
                             f"{tuple(probs.shape)}, got shape {tuple(out.shape)}.")
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-30)

    def apply(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
              threshold: float) -> ActionOutcome:
        probs, scores, threshold = check_batch(probs, scores, threshold)
        alpha = misinformation_weight(scores, threshold, self.nu, self.switch)
        n = probs.shape[0]
        if not bool((alpha > 0).any()):
            return ActionOutcome.passthrough(probs)
        rows = torch.nonzero(alpha > 0).flatten()
        answers = probs.clone()
        sub_x = x[rows] if x is not None else None
        answers[rows] = mislead(probs[rows], self.misleading_answers(sub_x, probs[rows]), alpha[rows])
        labels = tuple("misinform" if a > 0 else "allow" for a in alpha.tolist())
        return ActionOutcome(probabilities=answers, refused=torch.zeros(n, dtype=torch.bool), actions=labels,
                             work_bits=torch.zeros(n, dtype=torch.int64), alpha=alpha.to(torch.float32))
