"""A masked auto-encoder (MAE, He et al., CVPR 2022) with a ViT encoder and decoder.

This follows the MAE used by SAME (xythink/SAME ``ml_models/mae.py``, itself adapted from
IcarusWizard/MAE): a convolutional patch embedding, a learnable CLS token and learnable
positional embeddings, pre-norm transformer blocks (MLP ratio 4, GELU), a random per-sample
patch shuffle that keeps ``int(T * (1 - mask_ratio))`` of the ``T`` patches, and a decoder that
predicts **every** patch (visible ones included) from the visible tokens plus mask tokens.

With ``mask_ratio = 0`` every patch is visible and the network is a plain auto-encoder: this is
how SAME reconstructs a query. (The authors shuffle patches even at ratio 0; that is equivalent
up to floating point, so here the order is simply left unchanged and the pass is deterministic.)

Shapes: images ``(N, C, H, W)`` in ``[-1, 1]``; ``H == W == image_size``, divisible by
``patch_size``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MAEConfig", "MaskedAutoencoder", "MAE_PRESETS"]


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of a :class:`MaskedAutoencoder`.

    Attributes:
        image_size: side of the square input, pixels.
        in_channels: image channels (1 grey, 3 colour).
        patch_size: side of a square patch; ``image_size`` must be divisible by it.
        emb_dim: token width of encoder and decoder.
        encoder_depth / encoder_heads: transformer blocks and attention heads of the encoder.
        decoder_depth / decoder_heads: the same for the decoder.
        mask_ratio: default fraction of patches hidden in training, in ``[0, 1)``.
    """

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 2
    emb_dim: int = 192
    encoder_depth: int = 12
    encoder_heads: int = 3
    decoder_depth: int = 4
    decoder_heads: int = 3
    mask_ratio: float = 0.75

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "emb_dim", "encoder_depth",
                     "encoder_heads", "decoder_depth", "decoder_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MAEConfig.{name} must be a positive integer, got {value!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        for heads in (self.encoder_heads, self.decoder_heads):
            if self.emb_dim % heads:
                raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by the number of heads ({heads}).")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


#: Named configurations. ``paper`` is the authors' (patch 2, dim 192, depth 12/4, 3 heads,
#: about 7.2 M parameters); ``medium`` (width 64, 4+2 blocks, about 0.3 M parameters), ``shallow``
#: (width 64, 2+1 blocks, about 0.16 M parameters, the ``cpu`` SAME preset's since 0.3.0) and ``small``
#: (width 32) train in minutes on two CPU cores; ``tiny`` is for tests.
MAE_PRESETS: dict[str, dict] = {
    "paper": dict(patch_size=2, emb_dim=192, encoder_depth=12, encoder_heads=3, decoder_depth=4, decoder_heads=3),
    "medium": dict(patch_size=4, emb_dim=64, encoder_depth=4, encoder_heads=4, decoder_depth=2, decoder_heads=4),
    "shallow": dict(patch_size=4, emb_dim=64, encoder_depth=2, encoder_heads=4, decoder_depth=1, decoder_heads=4),
    "small": dict(patch_size=4, emb_dim=32, encoder_depth=4, encoder_heads=4, decoder_depth=2, decoder_heads=4),
    "tiny": dict(patch_size=7, emb_dim=32, encoder_depth=1, encoder_heads=2, decoder_depth=1, decoder_heads=2),
}


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block (as timm's ``Block(dim, heads)``: MLP ratio 4, GELU)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder(nn.Module):
    """ViT masked auto-encoder. ``forward(x, mask_ratio)`` returns ``(reconstruction, mask)``.

    Args:
        config: the architecture; see :class:`MAEConfig` and :data:`MAE_PRESETS`.
    """

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        c, p, d, t = config.in_channels, config.patch_size, config.emb_dim, config.num_patches
        self.patchify = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.enc_pos = nn.Parameter(torch.zeros(1, t, d))
        self.encoder = nn.Sequential(*[_Block(d, config.encoder_heads) for _ in range(config.encoder_depth)])
        self.enc_norm = nn.LayerNorm(d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dec_pos = nn.Parameter(torch.zeros(1, t + 1, d))
        self.decoder = nn.Sequential(*[_Block(d, config.decoder_heads) for _ in range(config.decoder_depth)])
        self.dec_head = nn.Linear(d, c * p * p)
        for param in (self.cls_token, self.enc_pos, self.mask_token, self.dec_pos):
            nn.init.trunc_normal_(param, std=0.02)

    def _keep_indices(self, n: int, mask_ratio: float, generator: torch.Generator | None,
                      device: torch.device, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample permutation of patch indices and its inverse, ``(N, T)`` each."""
        t = self.config.num_patches
        if mask_ratio == 0.0:
            order = torch.arange(t, device=device).expand(n, t)
            return order, order
        if noise is None:
            noise = torch.rand(n, t, generator=generator, device=device)
        else:
            noise = torch.as_tensor(noise, device=device)
            if noise.shape not in ((t,), (n, t)):
                raise ValueError(f"noise must have shape ({t},) or ({n}, {t}) (one value per patch), "
                                 f"got {tuple(noise.shape)}.")
            noise = noise.expand(n, t)
        order = torch.argsort(noise, dim=1)
        return order, torch.argsort(order, dim=1)

    def forward(self, x: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` from a random subset of its patches.

        Args:
            x: ``(N, C, H, W)`` images in ``[-1, 1]``.
            mask_ratio: fraction of patches hidden, in ``[0, 1)``; ``None`` uses the config's
                (0.75 by default). ``0`` is pure reconstruction.
            generator: source of the random masks (for reproducible training).
            noise: optional ``(T,)`` or ``(N, T)`` per-patch values that replace the random draw:
                the ``int(T * (1 - mask_ratio))`` patches with the smallest values stay visible.
                A ``(T,)`` vector hides the same patches in every image (SAME's masked scoring,
                :class:`~sameguard.detectors.same.SAMEDetector`, uses this to be batch-invariant).

        Returns:
            ``(reconstruction, mask)``: ``(N, C, H, W)`` reconstruction of every pixel, and a
            ``(N, 1, H, W)`` float mask with 1 on hidden pixels.
        """
        ratio = self.config.mask_ratio if mask_ratio is None else float(mask_ratio)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}.")
        n = x.shape[0]
        t, d, p = self.config.num_patches, self.config.emb_dim, self.config.patch_size
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.enc_pos  # (N, T, D)
        order, inverse = self._keep_indices(n, ratio, generator, x.device, noise)
        keep = max(1, int(t * (1.0 - ratio)))
        visible = torch.gather(tokens, 1, order[:, :keep, None].expand(-1, -1, d))
        h = torch.cat([self.cls_token.expand(n, -1, -1), visible], dim=1)
        h = self.enc_norm(self.encoder(h))

        # Decoder: visible tokens + mask tokens, back in the original patch order.
        patches = torch.cat([h[:, 1:], self.mask_token.expand(n, t - keep, -1)], dim=1)
        patches = torch.gather(patches, 1, inverse[:, :, None].expand(-1, -1, d))
        h = torch.cat([h[:, :1], patches], dim=1) + self.dec_pos
        out = self.dec_head(self.decoder(h)[:, 1:])  # (N, T, C*p*p)

        side = self.config.image_size // p
        c = self.config.in_channels
        img = out.reshape(n, side, side, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, side * p, side * p)
        hidden = torch.zeros(n, t, device=x.device)
        hidden[:, keep:] = 1.0
        hidden = torch.gather(hidden, 1, inverse)
        mask = hidden.reshape(n, 1, side, side)
        mask = mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        return img, mask

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pure reconstruction (``mask_ratio = 0``) of ``(N, C, H, W)`` images, no gradient."""
        return self(x, mask_ratio=0.0)[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def cosine_warmup_factor(epoch: int, total_epochs: int, warmup_epochs: int) -> float:
    """The authors' MAE schedule: ``min((e + 1) / warmup, 0.5 * (cos(pi * e / total) + 1))``."""
    warm = (epoch + 1) / max(1, warmup_epochs)
    return min(warm, 0.5 * (math.cos(math.pi * epoch / max(1, total_epochs)) + 1.0))
