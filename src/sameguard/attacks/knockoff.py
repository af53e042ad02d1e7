"""Knockoff Nets: steal a classifier by querying it with natural images from another distribution.

Orekondy, Schiele and Fritz, "Knockoff Nets: Stealing Functionality of Black-Box Models",
CVPR 2019 (arXiv 1812.02766). Reference implementations: tribhuvanesh/knockoffnets
(``knockoff/adversary/transfer.py`` and ``train.py``, random policy only -- the adaptive policy
was never released) and Trusted-AI/adversarial-robustness-toolbox
``art/attacks/extraction/knockoff_nets.py`` (random and adaptive policies).

* ``strategy="random"``: draw ``B`` images uniformly without replacement from the proxy pool
  (starting over with a fresh permutation when the pool runs out, as the official code re-uses
  images), query the victim, then train the knockoff from scratch on the answers with soft-label
  cross-entropy ``-sum_k y_k log softmax(F_A(x))_k`` (hard labels when the API returns labels
  only, or with ``use_probabilities=False``, the official ``--argmaxed``).
* ``strategy="adaptive"``: a gradient bandit over the proxy's classes (the paper samples over a
  class hierarchy; ART, and this module, over the flat classes). Each step samples an action
  ``z ~ softmax(H)``, queries a batch of proxy images of class ``z``, takes one SGD step of the
  knockoff on it, computes the reward, updates the baseline ``r_bar += (r - r_bar) / t`` and
  ``H(z) += (r - r_bar)(1 - pi(z)) / N(z)``, ``H(z') -= (r - r_bar) pi(z') / N(z)``. Rewards, as
  in ART: ``cert`` (margin between the two largest victim probabilities), ``div``
  (``sum_k max(0, y_k - y_bar_k)`` with the running mean ``y_bar`` of the answers), ``loss``
  (cross-entropy between the victim's answer and the knockoff's prediction) and ``all`` (the
  three, each normalised by its running mean and variance, averaged; clipped to ``[0, 1]`` on the
  first step). After the budget is spent the knockoff is trained on all collected pairs.

Adaptations, documented:

* ART queries one image per step (``batch_size_query=1``); here a step queries
  ``query_batch_size`` images of the sampled class and the step's reward is the batch mean of the
  per-image rewards (``query_batch_size=1`` is exactly ART's loop). ART computes the ``loss``
  reward on ``softmax`` of what is already a probability vector; here the victim's answer is used
  as the distribution it is.
* Label-only APIs: the random policy and the ``div`` and ``loss`` rewards work on one-hot answers.
  ``cert`` (and therefore ``all``, the default) needs the victim's confidence, so the adaptive
  policy with those rewards refuses a label-only API with
  :class:`~sameguard.attacks.base.UnsupportedOutputError`.
* The official training recipe (batch 64, lr 0.01, momentum 0.5, 100 epochs, step schedule at
  60) is kept except for the schedule: :func:`~sameguard.training.train_classifier` anneals with a
  cosine. The paper's knockoff is an ImageNet-pretrained ResNet-34; the default here is the
  victim's architecture, trained from scratch.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data import ImageDataset, adapt_to
from ..prediction_api import BoundClient
from ..training import show_progress
from .base import ExtractionAttack

logger = logging.getLogger(__name__)

__all__ = ["KnockoffNets", "STRATEGIES", "REWARDS"]

STRATEGIES = ("random", "adaptive")
REWARDS = ("cert", "div", "loss", "all")


class KnockoffNets(ExtractionAttack):
    """Knockoff Nets (Orekondy et al., CVPR 2019) with the random or the adaptive (bandit) policy.

    Args:
        proxy: the attacker's image pool (any :class:`~sameguard.data.ImageDataset`; images are
            converted to the victim's shape with :func:`~sameguard.data.adapt_to`). The adaptive
            policy uses its class labels as the bandit's actions; the random policy ignores them.
        strategy: ``"random"`` (default, the paper's main setting) or ``"adaptive"``.
        reward: adaptive reward, ``"cert"``, ``"div"``, ``"loss"`` or ``"all"`` (default, ART's).
        query_batch_size: images per API call (8, the official ``transfer.py``); for the adaptive
            policy, images per bandit step.
        epochs, batch_size, lr, momentum, weight_decay: knockoff training (official ``train.py``:
            100 epochs, batch 64, lr 0.01, momentum 0.5, weight decay 5e-4).
        **kwargs: the shared knobs of :class:`~sameguard.attacks.base.ExtractionAttack`
            (``substitute_arch``, ``use_probabilities``, ``augment``, ``seed``, ``device``, ...).
    """

    data_role: ClassVar[str | None] = "proxy"

    def __init__(
        self,
        proxy: ImageDataset,
        *,
        strategy: Literal["random", "adaptive"] = "random",
        reward: Literal["cert", "div", "loss", "all"] = "all",
        query_batch_size: int = 8,
        epochs: int = 100,
        batch_size: int = 64,
        lr: float = 0.01,
        momentum: float = 0.5,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(query_batch_size=query_batch_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, **kwargs)
        if not isinstance(proxy, ImageDataset) or len(proxy) == 0:
            raise ValueError(f"proxy must be a non-empty ImageDataset (the attacker's image pool), got {proxy!r}.")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}.")
        self.proxy = proxy
        self.strategy = strategy
        self.reward = reward

    @property
    def name(self) -> str:  # type: ignore[override]
        return "knockoff" if self.strategy == "random" else "knockoff-adaptive"

    def requires_probabilities(self) -> bool:
        return self.strategy == "adaptive" and self.reward in ("cert", "all")

    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        if self.strategy == "random":
            return self._random(oracle, budget)
        return self._adaptive(oracle, budget)

    # -- random policy --------------------------------------------------------------------------
    def _random(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        g = self._generator()
        n_pool = len(self.proxy)
        # Without replacement; a fresh permutation each time the pool runs out.
        order = torch.cat([torch.randperm(n_pool, generator=g) for _ in range(-(-budget // n_pool))])[:budget]
        images, answers = [], []
        bar = tqdm(total=budget, desc=f"{self.name} queries", disable=not show_progress(self.progress), leave=False)
        for start in range(0, budget, self.query_batch_size):
            idx = order[start:start + self.query_batch_size]
            x = adapt_to(self.proxy.images[idx], oracle.image_shape)
            answers.append(oracle.query(x))
            images.append(x)
            bar.update(len(idx))
        bar.close()
        x_all, y_all = torch.cat(images), torch.cat(answers)
        model = self._new_substitute(oracle.image_shape, oracle.num_classes)
        self._train(model, x_all, self._targets(y_all))
        return model, {"strategy": "random", "distinct_images": min(budget, n_pool)}

    # -- adaptive policy ------------------------------------------------------------------------
    def _adaptive(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        g = self._generator()
        k = oracle.num_classes
        pools = _ClassPools(self.proxy.labels, g)
        model = self._new_substitute(oracle.image_shape, k)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        n_actions = len(pools)
        h = torch.zeros(n_actions, dtype=torch.float64)
        counts = torch.zeros(n_actions, dtype=torch.float64)
        probs = torch.full((n_actions,), 1.0 / n_actions, dtype=torch.float64)
        baseline = 0.0
        state = _RewardState(k)
        images, answers = [], []
        bar = tqdm(total=budget, desc=f"{self.name} queries", disable=not show_progress(self.progress), leave=False)
        spent, t = 0, 0
        while spent < budget:
            t += 1
            action = int(torch.multinomial(probs.float(), 1, generator=g))
            n = min(self.query_batch_size, budget - spent)
            x = adapt_to(self.proxy.images[pools.draw(action, n)], oracle.image_shape)
            y = oracle.query(x)
            spent += n
            images.append(x)
            answers.append(y)
            y_dist = self._as_distribution(y, k)
            q = self._online_step(model, optimizer, x, y)
            r = state.reward(self.reward, y_dist, q)
            baseline += (r - baseline) / t
            h, probs = _gradient_bandit_step(h, probs, counts, action, r, baseline)
            bar.update(n)
        bar.close()
        x_all, y_all = torch.cat(images), torch.cat(answers)
        self._train(model, x_all, self._targets(y_all))  # final training, continuing from the online model
        names = [str(self.proxy.classes[int(a)]) for a in pools.actions]
        return model, {"strategy": "adaptive", "reward": self.reward, "steps": t,
                       "policy": {name: round(float(p), 4) for name, p in zip(names, probs)},
                       "pulls": {name: int(c) for name, c in zip(names, counts)}}

    def _online_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        """One SGD step of the knockoff on the new batch ``(x, answers y)``; its softmax on ``x`` afterwards."""
        target = self._targets(y)
        model.train()
        loss = F.cross_entropy(model(x.to(self.device)), target.to(self.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            return torch.softmax(model(x.to(self.device)), dim=1).cpu()


class _ClassPools:
    """The proxy's indices per class (the adaptive policy's arms), drawn without replacement per class.

    A class whose images are used up starts over with a fresh permutation. ``generator`` is shared
    with the policy, so the draws interleave with its choices exactly as in one loop.
    """

    def __init__(self, labels: torch.Tensor, generator: torch.Generator) -> None:
        self.actions = torch.unique(labels)  # the proxy's classes present
        self.pools = [torch.nonzero(labels == a).flatten() for a in self.actions.tolist()]
        self.cursors = [0] * len(self.pools)
        self.generator = generator
        self.perms = [p[torch.randperm(len(p), generator=generator)] for p in self.pools]

    def __len__(self) -> int:
        return len(self.pools)

    def draw(self, action: int, n: int) -> torch.Tensor:
        """``n`` proxy indices of class number ``action``."""
        out = []
        while n > 0:
            if self.cursors[action] >= len(self.perms[action]):  # class exhausted: start over
                pool = self.pools[action]
                self.perms[action] = pool[torch.randperm(len(pool), generator=self.generator)]
                self.cursors[action] = 0
            take = self.perms[action][self.cursors[action]:self.cursors[action] + n]
            self.cursors[action] += len(take)
            n -= len(take)
            out.append(take)
        return torch.cat(out)


def _gradient_bandit_step(h: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, action: int, reward: float,
                          baseline: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient-bandit update after pulling ``action`` (``counts`` updated in place); new (preferences, policy)."""
    counts[action] += 1
    step = (reward - baseline) / counts[action]
    chosen_mask = torch.zeros(len(h), dtype=torch.bool)
    chosen_mask[action] = True
    h = torch.where(chosen_mask, h + step * (1 - probs), h - step * probs)
    return h, torch.softmax(h, dim=0)


class _RewardState:
    """Running statistics of the adaptive policy's rewards (ART's ``_reward_*``, batched).

    Per image: ``cert = y_(1) - y_(2)``; ``div = sum_k max(0, y_k - y_bar_k)`` after updating the
    running mean ``y_bar`` with ``y``; ``loss = -sum_k y_k log q_k``. A step's reward is the batch
    mean; with ``"all"`` the three step rewards are normalised by their running mean and variance
    (clipped to ``[0, 1]`` on the first step) and averaged.
    """

    def __init__(self, num_classes: int) -> None:
        self.y_avg = torch.zeros(num_classes, dtype=torch.float64)
        self.n_images = 0
        self.n_steps = 0
        self.avg = torch.zeros(3, dtype=torch.float64)
        self.var = torch.zeros(3, dtype=torch.float64)

    @staticmethod
    def cert(y: torch.Tensor) -> torch.Tensor:
        top2 = torch.topk(y.double(), 2, dim=1).values
        return top2[:, 0] - top2[:, 1]

    def div(self, y: torch.Tensor) -> torch.Tensor:
        out = []
        for row in y.double():
            self.n_images += 1
            self.y_avg += (row - self.y_avg) / self.n_images
            out.append(torch.clamp(row - self.y_avg, min=0).sum())
        return torch.stack(out)

    @staticmethod
    def loss(y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return -(y.double() * torch.log(q.double().clamp_min(1e-12))).sum(1)

    def reward(self, kind: str, y: torch.Tensor, q: torch.Tensor) -> float:
        if kind == "cert":
            return float(self.cert(y).mean())
        if kind == "div":
            return float(self.div(y).mean())
        if kind == "loss":
            return float(self.loss(y, q).mean())
        self.n_steps += 1
        n = self.n_steps
        r = torch.stack([self.cert(y).mean(), self.div(y).mean(), self.loss(y, q).mean()])
        self.avg += (r - self.avg) / n
        self.var += ((r - self.avg) ** 2 - self.var) / n
        if n > 1:
            r = (r - self.avg) / torch.sqrt(self.var).clamp_min(1e-12)
        else:
            r = r.clamp(0, 1)
        return float(r.mean())
