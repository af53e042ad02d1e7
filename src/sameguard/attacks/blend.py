"""Pixel-level blending: Knockoff queries pulled towards the victim's data manifold.

Two adaptive attackers against per-query out-of-distribution detectors (SAME, MSP, Energy):

* :class:`BlendKnockoff` (``knockoff-blend``): every query is ``x = lam * x_in + (1 - lam) * x_proxy``,
  a convex mix of one of the attacker's few in-distribution images ``x_in`` (drawn uniformly) and
  the next proxy image ``x_proxy`` (without replacement, as Knockoff's random policy). ``lam = 1``
  sends the in-distribution images themselves (undetectable, but only ``num_seeds`` distinct
  images, so little is learnt); ``lam = 0`` is plain Knockoff. Sweeping ``lam`` trades
  detectability against what the answers teach: this is family 2 ("pixel-level blending") of
  the adaptive attacks in ``reference/methods.md`` A6, a design proposal of this benchmark, not an
  established protocol (the sweep ``lam in {0.1, ..., 0.9}`` is suggested there).
* :class:`MixupKnockoff` (``knockoff-mixup``): every query is ``lam * x_a + (1 - lam) * x_b`` for two
  proxy images, with ``lam ~ Beta(alpha, alpha)`` per query (mixup, Zhang, Cisse, Dauphin and
  Lopez-Paz, ICLR 2018, arXiv 1710.09412) or a fixed ``lam``. It needs no in-distribution data;
  mixing two natural images smooths their statistics (reconstruction-based detectors see an
  average of two "unusual" images) and visits the region between proxy images, which mixup-style
  augmentation is known to make informative for distillation.

Both use the answers as Knockoff does (soft-label cross-entropy on the exact images sent, hard
labels on a label-only API: the hard-label variants need nothing else). Images stay in
``[-1, 1]``: a convex mix of two images in ``[-1, 1]`` is in ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..data import ImageDataset
from ..prediction_api import BoundClient
from ..validation import check_positive
from ._pool import PoolAttack, cycling_order

__all__ = ["BlendKnockoff", "MixupKnockoff", "blend"]


def blend(x_in: torch.Tensor, x_proxy: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """``lam * x_in + (1 - lam) * x_proxy`` (pure function).

    Args:
        x_in, x_proxy: ``(N, C, H, W)`` in ``[-1, 1]``, the same shape.
        lam: a float in ``[0, 1]`` or ``(N,)`` weights, one per pair.

    Returns:
        ``(N, C, H, W)`` in ``[-1, 1]``.
    """
    if x_in.shape != x_proxy.shape:
        raise ValueError(f"blend needs two batches of the same shape, got {tuple(x_in.shape)} and "
                         f"{tuple(x_proxy.shape)}.")
    lam_t = torch.as_tensor(lam, dtype=x_in.dtype)
    if bool(((lam_t < 0) | (lam_t > 1)).any()):
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}.")
    if lam_t.dim() == 1:
        lam_t = lam_t.view(-1, *([1] * (x_in.dim() - 1)))
    return lam_t * x_in + (1 - lam_t) * x_proxy


def _check_lam(lam: object, name: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {lam!r}.")
    return float(lam)


class BlendKnockoff(PoolAttack):
    """Knockoff with every proxy query blended towards an in-distribution image (``lam`` of it).

    Args:
        proxy: the attacker's proxy pool (e.g. digits for a Fashion-MNIST victim).
        seed_data: the attacker's in-distribution images (unlabelled use only).
        lam: weight of the in-distribution image, in ``[0, 1]`` (0.5).
        num_seeds: how many in-distribution images it holds (100; ``None``: all of ``seed_data``).
        **kwargs: as :class:`~sameguard.attacks._pool.PoolAttack` (Knockoff's training knobs).
    """

    name: ClassVar[str] = "knockoff-blend"

    def __init__(self, proxy: ImageDataset, seed_data: ImageDataset, *, lam: float = 0.5,
                 num_seeds: int | None = 100, **kwargs: Any) -> None:
        if seed_data is not None and num_seeds is not None and num_seeds > len(seed_data):
            num_seeds = len(seed_data)
        super().__init__(proxy, seed_data, num_seeds=num_seeds, **kwargs)
        self.lam = _check_lam(lam)

    def _queries(self, oracle: BoundClient, budget: int) -> tuple[torch.Tensor, dict[str, Any]]:
        g = self._generator()
        seeds = self._seed_images(oracle.image_shape)
        proxy_idx = cycling_order(len(self.proxy), budget, g)
        seed_idx = torch.randint(len(seeds), (budget,), generator=g)
        x = blend(seeds[seed_idx], self._proxy_images(proxy_idx, oracle.image_shape), self.lam)
        return x, {"lam": self.lam, "seeds_held": len(seeds), "distinct_proxy_images": min(budget, len(self.proxy))}


class MixupKnockoff(PoolAttack):
    """Knockoff whose every query mixes two proxy images (mixup).

    Args:
        proxy: the attacker's proxy pool.
        lam: a fixed weight in ``[0, 1]``; ``None`` (default) draws ``lam ~ Beta(alpha, alpha)`` per query.
        alpha: the Beta parameter (1.0: uniform weights, mixup's common choice).
        **kwargs: as :class:`~sameguard.attacks._pool.PoolAttack`.
    """

    name: ClassVar[str] = "knockoff-mixup"
    data_role: ClassVar[str | None] = "proxy"
    needs_seeds: ClassVar[bool] = False

    def __init__(self, proxy: ImageDataset, *, lam: float | None = None, alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(proxy, None, **kwargs)
        self.lam = None if lam is None else _check_lam(lam)
        self.alpha = check_positive(alpha, "alpha")

    def _queries(self, oracle: BoundClient, budget: int) -> tuple[torch.Tensor, dict[str, Any]]:
        g = self._generator()
        first = cycling_order(len(self.proxy), budget, g)
        second = cycling_order(len(self.proxy), budget, g)
        if self.lam is None:
            # Beta(a, a) from two Gammas, drawn with the attack's generator (reproducible).
            ga = torch._standard_gamma(torch.full((budget,), self.alpha, dtype=torch.float64), generator=g)
            gb = torch._standard_gamma(torch.full((budget,), self.alpha, dtype=torch.float64), generator=g)
            lam = (ga / (ga + gb)).float()
        else:
            lam = torch.full((budget,), self.lam)
        x = blend(self._proxy_images(first, oracle.image_shape), self._proxy_images(second, oracle.image_shape), lam)
        return x, {"lam": self.lam, "alpha": self.alpha, "mean_lam": round(float(lam.mean()), 4)}
