"""Interleaving: Knockoff queries hidden among in-distribution cover queries.

Family 1 ("stream-level mixing") of the adaptive attacks in ``reference/methods.md`` A6: the
attacker spends a fraction ``rho`` of its budget on genuinely in-distribution images it already
holds, spread evenly through its stream, to dilute per-client statistics. D-ADD (AAAI 2025)
evaluates such an attacker with a benign share of at most 10 % (1 % on MNIST/FMNIST).

Per-query detectors (SAME, MSP, Energy) are unaffected query by query -- each proxy query is as
suspicious as before -- but a per-client alarm accumulates evidence over the client's stream, and
cover queries add little or none (their conformal p-values are uniform), so the alarm comes later
in the stream: how much later as a function of ``rho`` is what the benchmark measures. The cover
answers are not wasted: they are labelled in-distribution images, and the substitute is trained
on every answer (``train_on_cover=False`` trains on the proxy answers only, to isolate the cost).

Schedule: with ``n = round(rho * B)`` cover queries, query ``i`` (0-based) is a cover query when
``floor((i + 1) n / B) > floor(i n / B)`` (Bresenham's even spread: exactly ``n`` of them, no two
stretches of proxy queries differing by more than one). Cover images are drawn from the
attacker's ``num_seeds`` in-distribution images without replacement, cycling when used up;
proxy images likewise from the proxy pool. Works on label-only APIs (hard labels).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..data import ImageDataset
from ..prediction_api import BoundClient
from ..validation import check_fraction
from ._pool import PoolAttack, cycling_order

__all__ = ["InterleaveKnockoff", "interleave_schedule"]


def interleave_schedule(budget: int, rho: float) -> torch.Tensor:
    """``(budget,)`` bool: which queries are cover queries; exactly ``round(rho * budget)`` are, evenly spread."""
    n = int(round(rho * budget))
    i = torch.arange(budget, dtype=torch.long)
    return (((i + 1) * n) // budget) > ((i * n) // budget)


class InterleaveKnockoff(PoolAttack):
    """Knockoff whose stream hides a fraction ``rho`` of in-distribution cover queries.

    Args:
        proxy: the attacker's proxy pool.
        seed_data: its in-distribution images (the cover).
        rho: fraction of the budget spent on cover queries, in ``[0, 1)`` (0.5).
        num_seeds: how many in-distribution images it holds (``None``, default: all of ``seed_data``).
        train_on_cover: train the substitute on the cover answers too (default ``True``).
        **kwargs: as :class:`~sameguard.attacks._pool.PoolAttack`.
    """

    name: ClassVar[str] = "knockoff-interleave"

    def __init__(self, proxy: ImageDataset, seed_data: ImageDataset, *, rho: float = 0.5,
                 num_seeds: int | None = None, train_on_cover: bool = True, **kwargs: Any) -> None:
        super().__init__(proxy, seed_data, num_seeds=num_seeds, **kwargs)
        self.rho = check_fraction(rho, "rho", include_high=False)
        self.train_on_cover = bool(train_on_cover)

    def _extract(self, oracle: BoundClient, budget: int) -> tuple[Any, dict[str, Any]]:
        g = self._generator()
        cover = interleave_schedule(budget, self.rho)
        n_cover = int(cover.sum())
        seeds = self._seed_images(oracle.image_shape) if n_cover else None
        x = torch.empty(budget, *oracle.image_shape)
        x[~cover] = self._proxy_images(cycling_order(len(self.proxy), budget - n_cover, g), oracle.image_shape)
        if n_cover:
            x[cover] = seeds[cycling_order(len(seeds), n_cover, g)]
        answers = self._send(oracle, x)
        keep = torch.ones(budget, dtype=torch.bool) if self.train_on_cover else ~cover
        model = self._fit_substitute(oracle, x[keep], answers[keep])
        return model, {"rho": self.rho, "cover_queries": n_cover, "proxy_queries": budget - n_cover,
                       "train_on_cover": self.train_on_cover}
