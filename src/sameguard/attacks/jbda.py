"""JBDA: Jacobian-based dataset augmentation around a few in-distribution seed images.

Papernot, McDaniel, Goodfellow, Jha, Celik and Swami, "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017 (arXiv 1602.02697). Reference implementations: cleverhans
``examples/.../mnist_blackbox.py`` (the authors'), tribhuvanesh/prediction-poisoning
``defenses/adversary/jacobian.py`` and sanjaykariyappa/MAZE ``src/attacks/jbda.py``.

Algorithm:

1. Take ``num_seeds`` (150) in-distribution images ``S_0`` (e.g. a held-out part of the victim's
   data) and label them with the API.
2. For each substitute round ``rho = 0, 1, ...``: train the substitute ``F`` **from scratch** on
   ``S_rho``; pick the points to augment -- all of ``S_rho``, or, from round ``sigma`` on, a random
   sample of ``kappa`` of them (the paper's reservoir sampling, which caps the query growth); make
   ``x' = clip(x + lambda_rho * sign(d F_{O(x)}(x) / dx), -1, 1)`` where ``O(x)`` is the API's
   label of ``x`` and ``F_c`` the substitute's logit for class ``c``; label the new points with the
   API and add them: ``S_{rho+1} = S_rho U {x'}``.
3. The step is periodic: ``lambda_rho = lambda * (-1) ** floor(rho / tau)`` (``lambda = 0.1``,
   ``tau = 3``); ``tau=None`` keeps it constant.
4. When the budget is spent (the last augmentation is cut to the queries left, as in
   prediction-poisoning's ``jacobian.py``), the substitute is trained from scratch once more on
   everything collected (``final_epochs``).

Without ``max_rounds`` the rounds continue until the budget is spent exactly; with it, the attack
stops after that many augmentations and spends the rest of the budget on fresh seed images
(:attr:`JBDA.seed_data` permitting), so that ``run`` still uses its budget exactly.

Works with probabilities (soft-label cross-entropy) or labels (hard-label cross-entropy). The
images are in ``[-1, 1]`` (the package's convention), hence the clip to ``[-1, 1]``. Defaults:
150 seeds, ``lambda = 0.1``, ``tau = 3``, ``sigma = 3``, ``kappa = 400`` (Papernot et al.), 10
substitute epochs per round with SGD lr 0.01 (adaptive_misinformation's README:
``--epochs=10 --lr 0.01 --substitute_init_size=150``). The Jacobian row is taken on the
substitute's logits (MAZE, cleverhans-lab); the cleverhans tutorial takes it on the output layer.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageDataset, adapt_to
from ..prediction_api import BoundClient
from ..training import show_progress
from ..validation import check_int, check_positive
from .base import ExtractionAttack

logger = logging.getLogger(__name__)

__all__ = ["JBDA"]


class JBDA(ExtractionAttack):
    """Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017).

    Args:
        seed_data: in-distribution images the attacker holds (an :class:`~sameguard.data.ImageDataset`,
            converted to the victim's shape with :func:`~sameguard.data.adapt_to`; labels unused).
        num_seeds: size of the initial seed set (150).
        step_size: ``lambda`` (0.1) in the ``[-1, 1]`` image range.
        tau: sign-flip period of the step (3); ``None`` for a constant step.
        sigma: first round that augments a random sample of ``kappa`` points only (3).
        kappa: reservoir size (400); ``None`` disables reservoir sampling (the set doubles).
        max_rounds: most augmentation rounds; ``None`` (default) augments until the budget is spent.
        epochs: substitute epochs per round (10).
        final_epochs: epochs of the final training on everything collected (default: ``epochs``).
        batch_size, lr, momentum, weight_decay: substitute SGD (64, 0.01, 0.9, 5e-4).
        **kwargs: the shared knobs of :class:`~sameguard.attacks.base.ExtractionAttack`.
    """

    name: ClassVar[str] = "jbda"
    data_role: ClassVar[str | None] = "seeds"

    def __init__(
        self,
        seed_data: ImageDataset,
        *,
        num_seeds: int = 150,
        step_size: float = 0.1,
        tau: int | None = 3,
        sigma: int = 3,
        kappa: int | None = 400,
        max_rounds: int | None = None,
        epochs: int = 10,
        final_epochs: int | None = None,
        batch_size: int = 64,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        query_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, query_batch_size=query_batch_size, **kwargs)
        if not isinstance(seed_data, ImageDataset) or len(seed_data) == 0:
            raise ValueError(f"seed_data must be a non-empty ImageDataset of in-distribution images, got {seed_data!r}.")
        self.seed_data = seed_data
        self.num_seeds = check_int(num_seeds, "num_seeds")
        if self.num_seeds > len(seed_data):
            raise ValueError(f"num_seeds ({num_seeds}) is larger than seed_data ({len(seed_data)} images).")
        self.step_size = check_positive(step_size, "step_size")
        self.tau = None if tau is None else check_int(tau, "tau")
        self.sigma = check_int(sigma, "sigma", minimum=0)
        self.kappa = None if kappa is None else check_int(kappa, "kappa")
        self.max_rounds = None if max_rounds is None else check_int(max_rounds, "max_rounds", minimum=0)
        self.final_epochs = self.epochs if final_epochs is None else check_int(final_epochs, "final_epochs")

    # -- the perturbation (JBDA-TR overrides it) -------------------------------------------------
    def _step(self, rho: int) -> float:
        """``lambda_rho = lambda * (-1) ** floor(rho / tau)``."""
        if self.tau is None:
            return self.step_size
        return self.step_size * (-1.0) ** math.floor(rho / self.tau)

    def _augment(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, rho: int,
                 generator: torch.Generator) -> torch.Tensor:
        """``clip(x + lambda_rho * sign(d F_{O(x)}(x) / dx), -1, 1)`` for a batch, ``labels = O(x)``."""
        model.eval()
        xg = x.to(self.device).requires_grad_(True)
        logits = model(xg)
        (grad,) = torch.autograd.grad(logits.gather(1, labels.to(self.device)[:, None]).sum(), xg)
        return (x + self._step(rho) * grad.sign().cpu()).clamp(-1.0, 1.0)

    # -- the attack -----------------------------------------------------------------------------
    def _query_all(self, oracle: BoundClient, x: torch.Tensor, bar: tqdm) -> torch.Tensor:
        out = []
        for start in range(0, len(x), self.query_batch_size):
            out.append(oracle.query(x[start:start + self.query_batch_size]))
            bar.update(len(out[-1]))
        return torch.cat(out)

    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        g = self._generator()
        k = oracle.num_classes
        pool_order = torch.randperm(len(self.seed_data), generator=g)
        n0 = min(self.num_seeds, budget)
        bar = tqdm(total=budget, desc=f"{self.name} queries", disable=not show_progress(self.progress), leave=False)
        xs = adapt_to(self.seed_data.images[pool_order[:n0]], oracle.image_shape)
        ys = self._query_all(oracle, xs, bar)
        used_seeds = n0
        rho = 0
        sizes = [n0]
        while oracle.used < budget and (self.max_rounds is None or rho < self.max_rounds):
            model = self._new_substitute(oracle.image_shape, k, seed_offset=rho)
            self._train(model, xs, self._targets(ys), seed_offset=rho, desc=f"{self.name} round {rho}")
            if self.kappa is not None and rho >= self.sigma and len(xs) > self.kappa:
                pick = torch.randperm(len(xs), generator=g)[: self.kappa].sort().values
            else:
                pick = torch.arange(len(xs))
            pick = pick[: budget - oracle.used]  # cut the last augmentation to the queries left
            labels = ys[pick] if ys.dim() == 1 else ys[pick].argmax(1)
            new_x = torch.cat([
                self._augment(model, xs[pick[s:s + 256]], labels[s:s + 256], rho, g)
                for s in range(0, len(pick), 256)
            ]).detach()
            new_y = self._query_all(oracle, new_x, bar)
            xs, ys = torch.cat([xs, new_x]), torch.cat([ys, new_y])
            sizes.append(len(new_x))
            rho += 1
        if oracle.used < budget:  # max_rounds reached: spend the rest on more seed images
            extra = pool_order[used_seeds:used_seeds + budget - oracle.used]
            if len(extra) < budget - oracle.used:
                raise ValueError(
                    f"{self.name} stopped after max_rounds={self.max_rounds} with {budget - oracle.used} queries "
                    f"left and only {len(extra)} unused seed images; raise max_rounds or give more seed_data."
                )
            new_x = adapt_to(self.seed_data.images[extra], oracle.image_shape)
            xs, ys = torch.cat([xs, new_x]), torch.cat([ys, self._query_all(oracle, new_x, bar)])
            used_seeds += len(extra)
        bar.close()
        model = self._new_substitute(oracle.image_shape, k, seed_offset=10_000)
        self._train(model, xs, self._targets(ys), epochs=self.final_epochs, seed_offset=10_000,
                    desc=f"{self.name} final")
        return model, {"rounds": rho, "seed_images": used_seeds, "added_per_round": sizes,
                       "training_set": len(xs)}
