"""What the adaptive attackers share: a Knockoff-style attacker holding a proxy pool (and, for most,
a few in-distribution images), which decides *which* images to send, sends them in batches and
trains its substitute on every answer.

The adaptive attacks of issue 13 (``blend``, ``mixup``, ``interleave``, ``filtered``, ``wide``)
differ from Knockoff Nets (random policy; :mod:`sameguard.attacks.knockoff`) only in the images
they send; querying, budgeting and substitute training are the same, so the comparison of
substitute accuracy against Knockoff isolates the price of evasion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageDataset, adapt_to
from ..prediction_api import BoundClient
from ..training import show_progress
from ..validation import check_int
from .base import ExtractionAttack

__all__ = ["PoolAttack", "cycling_order"]


def cycling_order(n_pool: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices into a pool of ``n_pool``: without replacement, a fresh permutation each time
    the pool runs out (as Knockoff's random policy)."""
    rounds = -(-n // n_pool) if n > 0 else 0
    if rounds == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.randperm(n_pool, generator=generator) for _ in range(rounds)])[:n]


def _check_dataset(data: object, what: str) -> ImageDataset:
    if not isinstance(data, ImageDataset) or len(data) == 0:
        raise ValueError(f"{what} must be a non-empty ImageDataset, got {data!r}.")
    return data


class PoolAttack(ExtractionAttack):
    """Base of the adaptive Knockoff-style attacks: a proxy pool, optional in-distribution images.

    Args:
        proxy: the attacker's unlabelled image pool (converted to the victim's shape).
        seed_data: the attacker's in-distribution images (``None`` where the attack needs none).
        num_seeds: how many of ``seed_data`` it holds (``None``: all), drawn with the attack's seed.
        query_batch_size, epochs, batch_size, lr, momentum, weight_decay: as
            :class:`~sameguard.attacks.knockoff.KnockoffNets` (8, 100, 64, 0.01, 0.5, 5e-4).
        **kwargs: the shared knobs of :class:`~sameguard.attacks.base.ExtractionAttack`.
    """

    data_role: ClassVar[str | None] = "proxy+seeds"
    #: Whether ``seed_data`` is required.
    needs_seeds: ClassVar[bool] = True

    def __init__(self, proxy: ImageDataset, seed_data: ImageDataset | None = None, *, num_seeds: int | None = None,
                 query_batch_size: int = 8, epochs: int = 100, batch_size: int = 64, lr: float = 0.01,
                 momentum: float = 0.5, weight_decay: float = 5e-4, **kwargs: Any) -> None:
        super().__init__(query_batch_size=query_batch_size, epochs=epochs, batch_size=batch_size, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, **kwargs)
        self.proxy = _check_dataset(proxy, "proxy (the attacker's image pool)")
        if seed_data is None and self.needs_seeds:
            raise ValueError(f"The {self.name} attack needs seed_data: the attacker's in-distribution images.")
        self.seed_data = None if seed_data is None else _check_dataset(seed_data, "seed_data")
        if num_seeds is not None:
            num_seeds = check_int(num_seeds, "num_seeds")
            if self.seed_data is not None and num_seeds > len(self.seed_data):
                raise ValueError(f"num_seeds ({num_seeds}) is larger than seed_data ({len(self.seed_data)} images).")
        self.num_seeds = num_seeds

    def _seed_images(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The in-distribution images the attacker holds, ``(S, C, H, W)``, adapted to the victim."""
        assert self.seed_data is not None
        data = self.seed_data if self.num_seeds is None else self.seed_data.take(self.num_seeds, seed=self.seed)
        return adapt_to(data.images, image_shape)

    def _proxy_images(self, idx: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
        return adapt_to(self.proxy.images[idx], image_shape)

    def _send(self, oracle: Any, x: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """Send ``x`` in batches of ``query_batch_size``, in order; the answers, concatenated."""
        answers = []
        bar = tqdm(total=len(x), desc=desc or f"{self.name} queries", disable=not show_progress(self.progress),
                   leave=False)
        for start in range(0, len(x), self.query_batch_size):
            batch = x[start:start + self.query_batch_size]
            answers.append(oracle.query(batch))
            bar.update(len(batch))
        bar.close()
        return torch.cat(answers) if answers else torch.zeros(0)

    def _fit_substitute(self, oracle: Any, x: torch.Tensor, answers: torch.Tensor, *,
                        epochs: int | None = None, seed_offset: int = 0) -> nn.Module:
        """A fresh substitute trained on ``(x, answers)`` (soft or hard labels)."""
        model = self._new_substitute(oracle.image_shape, oracle.num_classes, seed_offset=seed_offset)
        self._train(model, x, self._targets(answers), epochs=epochs, seed_offset=seed_offset)
        return model.eval()

    # -- subclasses: which images, in which order ------------------------------------------------
    def _queries(self, oracle: BoundClient, budget: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Exactly ``budget`` images to send (in order) and the details to report."""
        raise NotImplementedError

    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        x, details = self._queries(oracle, budget)
        if len(x) != budget:
            raise RuntimeError(f"{self.name} prepared {len(x)} queries for a budget of {budget}.")
        answers = self._send(oracle, x)
        return self._fit_substitute(oracle, x, answers), details


#: ``images (N, C, H, W) -> scores (N,)``, larger = more suspicious.
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
