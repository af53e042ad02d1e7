"""JBDA-TR: Jacobian-based augmentation with T-RND, perturbations targeted at a random class.

T-RND comes from PRADA: Juuti, Szyller, Marchal and Asokan, "PRADA: Protecting against DNN Model
Stealing Attacks", EuroS&P 2019 (arXiv 1805.02628); the name JBDA-TR from its use as a baseline
attack in Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020), EDM (ICLR 2021) and
Calibrated Proof-of-Work (Dziedzic et al., ICLR 2022). Reference implementation:
cleverhans-lab/model-extraction-iclr ``jacobian.py::jaugment2``.

Everything is as in :class:`~sameguard.attacks.jbda.JBDA` (seeds, rounds, substitute retrained from
scratch, reservoir sampling, exact budget) except the new point made from ``x``:

    c  ~ uniform over the classes other than O(x)         (O(x): the API's label of x)
    x' = clip(x - lambda * sign(grad_x CE(F(x), c)), -1, 1)

a targeted FGSM step that moves ``x`` **towards** the random class ``c`` (it equals
``x + lambda * sign(grad_x log softmax(F(x))_c)``). The reference code instead computes
``x - lambda * sign(d F_c / dx)`` on the *logit* of ``c``, which moves the input away from the
target -- a sign slip, not copied here.

Defaults follow the reference: ``lambda = 0.1``, no periodic sign flip (``tau=None``: flipping a
targeted step would aim away from the target) and a reservoir of ``kappa = 500`` points per round
(``jaugment2`` samples 500 points once the set is larger than 1000) from round ``sigma = 3``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..data import ImageDataset
from .jbda import JBDA

logger = logging.getLogger(__name__)

__all__ = ["JBDATR"]


class JBDATR(JBDA):
    """JBDA with T-RND targeted steps (PRADA, EuroS&P 2019); see the module docstring.

    Args:
        seed_data: in-distribution images the attacker holds.
        tau: sign-flip period; ``None`` (default) keeps the step pointing at the target.
        kappa: reservoir size (500, as ``jaugment2``).
        **kwargs: every other knob of :class:`~sameguard.attacks.jbda.JBDA`.
    """

    name: ClassVar[str] = "jbda-tr"

    def __init__(self, seed_data: ImageDataset, *, tau: int | None = None, kappa: int | None = 500,
                 **kwargs: Any) -> None:
        super().__init__(seed_data, tau=tau, kappa=kappa, **kwargs)

    def _augment(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, rho: int,
                 generator: torch.Generator) -> torch.Tensor:
        """``clip(x - lambda_rho * sign(grad_x CE(F(x), c)), -1, 1)`` with ``c != O(x)`` random."""
        model.eval()
        xg = x.to(self.device).requires_grad_(True)
        logits = model(xg)
        k = logits.shape[1]
        # A uniformly random class other than the label: label + 1 + U{0, ..., K-2} (mod K).
        shift = torch.randint(1, k, (len(x),), generator=generator)
        targets = (labels.cpu() + shift) % k
        loss = F.cross_entropy(logits, targets.to(self.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
        return (x - self._step(rho) * grad.sign().cpu()).clamp(-1.0, 1.0)
