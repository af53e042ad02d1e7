"""A plain convolutional auto-encoder: the reconstruction model of the SAME ablation without masking.

The encoder halves the resolution twice with strided 4x4 convolutions and ends in a linear
bottleneck of ``latent_dim`` units; the decoder mirrors it with transposed convolutions and a
``tanh`` output, so reconstructions are in the package's ``[-1, 1]`` range. It is sized for the
two input families of the benchmark, ``1 x 28 x 28`` (MNIST-like: 28 -> 14 -> 7) and
``3 x 32 x 32`` (CIFAR-like: 32 -> 16 -> 8), and works for any square side divisible by 4.

:class:`ConvEncoder` and :class:`ConvDecoder` are shared with the variational auto-encoder of
:mod:`sameguard.models.vae` (VarDetect).

Shapes: images ``(N, C, H, W)`` float32 in ``[-1, 1]`` with ``H == W == image_size``; codes
``(N, latent_dim)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["ConvAEConfig", "ConvAutoencoder", "ConvEncoder", "ConvDecoder"]


@dataclass(frozen=True)
class ConvAEConfig:
    """Architecture of a :class:`ConvAutoencoder` (and of :class:`~sameguard.models.vae.ConvVAE`).

    Attributes:
        image_size: side of the square input in pixels, divisible by 4 (28 or 32 in the benchmark).
        in_channels: image channels (1 grey, 3 colour).
        width: channels of the first convolution; the second has ``2 * width``.
        latent_dim: size of the bottleneck code.
    """

    image_size: int = 28
    in_channels: int = 1
    width: int = 32
    latent_dim: int = 64

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "width", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvAEConfig.{name} must be a positive integer, got {value!r}.")
        if self.image_size % 4 or self.image_size < 8:
            raise ValueError(
                f"ConvAEConfig.image_size must be a multiple of 4 and at least 8 (the encoder halves "
                f"the side twice), got {self.image_size}."
            )

    @property
    def feature_side(self) -> int:
        """Side of the last convolutional feature map (``image_size / 4``)."""
        return self.image_size // 4

    def to_dict(self) -> dict:
        return asdict(self)


class ConvEncoder(nn.Module):
    """``(N, C, S, S)`` images -> ``(N, out_dim)``: two stride-2 convolutions and a linear layer."""

    def __init__(self, config: ConvAEConfig, out_dim: int) -> None:
        super().__init__()
        w, side = config.width, config.feature_side
        self.conv = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(2 * w * side * side, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


class ConvDecoder(nn.Module):
    """``(N, latent_dim)`` codes -> ``(N, C, S, S)`` images in ``[-1, 1]`` (mirror of the encoder)."""

    def __init__(self, config: ConvAEConfig) -> None:
        super().__init__()
        w, side = config.width, config.feature_side
        self.shape = (2 * w, side, side)
        self.fc = nn.Sequential(nn.Linear(config.latent_dim, 2 * w * side * side), nn.ReLU(inplace=True))
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, config.in_channels, 4, stride=2, padding=1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(len(z), *self.shape))


class ConvAutoencoder(nn.Module):
    """A deterministic convolutional auto-encoder: ``forward(x) = decode(encode(x))``.

    Args:
        config: the architecture; see :class:`ConvAEConfig`.
    """

    def __init__(self, config: ConvAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config, config.latent_dim)
        self.decoder = ConvDecoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, latent_dim)`` bottleneck codes of ``(N, C, H, W)`` images."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in ``[-1, 1]`` from ``(N, latent_dim)`` codes."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``(N, C, H, W)`` images without gradient (the model should be in eval mode)."""
        return self(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
