"""Validation anomalies for choosing a detector configuration without looking at the benchmark's attacks.

Every kind is made from the defender's own held-out images or from noise, so none comes from an
attack's query pool (digits, EMNIST, KMNIST...) or from an attack's queries: a configuration chosen
on them has not seen what it will be tested on. The kinds span what makes a query unlike the
training data: no structure at all (noise), lost detail (blur), small dense perturbations, wrong
global structure with natural local statistics (shuffled patches) and inverted intensities.

All functions take and return ``(N, C, H, W)`` float32 images in ``[-1, 1]`` and are deterministic
for a given ``seed``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..validation import check_images, check_int, check_positive

__all__ = ["VALIDATION_KINDS", "validation_anomalies", "gaussian_blur", "shuffle_patches"]

#: The kinds, in report order.
VALIDATION_KINDS = ("uniform noise", "gaussian noise", "salt and pepper", "blurred", "sign-perturbed",
                    "shuffled patches", "inverted")


def gaussian_blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Each channel convolved with a normalised Gaussian of standard deviation ``sigma`` pixels
    (kernel radius ``ceil(3 sigma)``, reflect padding)."""
    x = check_images(x, name="x")
    sigma = check_positive(sigma, "sigma")
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c).clamp(-1, 1)


def shuffle_patches(x: torch.Tensor, grid: int = 4, seed: int = 0) -> torch.Tensor:
    """Cut each image into ``grid x grid`` tiles (H and W divisible by ``grid``) and permute the tiles
    at random (one permutation per image)."""
    x = check_images(x, name="x")
    grid = check_int(grid, "grid", minimum=2)
    n, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"Images of {h}x{w} pixels cannot be cut into a {grid}x{grid} grid of equal tiles.")
    th, tw = h // grid, w // grid
    tiles = x.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(grid * grid, generator=g) for _ in range(n)])
    tiles = tiles[torch.arange(n)[:, None], order]
    return tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w).contiguous()


def validation_anomalies(held_out: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """One anomalous set per kind in :data:`VALIDATION_KINDS`, each the size of ``held_out``.

    Args:
        held_out: ``(N, C, H, W)`` benign defender images in ``[-1, 1]`` that no detector trained on.
        seed: for the noise and the permutations.
    """
    x = check_images(held_out, name="held_out")
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g)
    signs = torch.sign(torch.rand(x.shape, generator=g) - 0.5)
    return {
        "uniform noise": noise * 2 - 1,
        "gaussian noise": (torch.randn(x.shape, generator=g) * 0.5).clamp(-1, 1),
        "salt and pepper": torch.where(salt < 0.1, torch.sign(salt - 0.05), x),
        "blurred": gaussian_blur(x, 1.5),
        "sign-perturbed": (x + 0.1 * signs).clamp(-1, 1),
        "shuffled patches": shuffle_patches(x, 4 if x.shape[-1] % 4 == 0 else 2, seed=seed),
        "inverted": -x,
    }
