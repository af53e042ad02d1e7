"""A small convolutional variational auto-encoder (Kingma & Welling, ICLR 2014), for VarDetect.

The encoder and decoder are those of :mod:`sameguard.models.autoencoder` (two stride-2
convolutions and a linear bottleneck); the encoder outputs the mean ``mu`` and log-variance
``logvar`` of a diagonal Gaussian posterior ``q(z | x)`` over ``latent_dim`` dimensions, and the
prior is ``N(0, I)``. :func:`vae_loss` is the negative ELBO with a Gaussian decoder of fixed
variance (a summed squared error) and a weight ``beta`` on the KL term.

Shapes: images ``(N, C, H, W)`` float32 in ``[-1, 1]``; codes ``(N, latent_dim)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import ConvAEConfig, ConvDecoder, ConvEncoder

__all__ = ["ConvVAE", "vae_loss"]


class ConvVAE(nn.Module):
    """Convolutional VAE. ``forward(x, generator)`` returns ``(x_hat, mu, logvar)``.

    Args:
        config: the architecture (:class:`~sameguard.models.autoencoder.ConvAEConfig`); the
            latent space has ``config.latent_dim`` dimensions.
    """

    def __init__(self, config: ConvAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config, 2 * config.latent_dim)
        self.decoder = ConvDecoder(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``, each ``(N, latent_dim)``, of the posterior of ``(N, C, H, W)`` images."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in ``[-1, 1]`` from ``(N, latent_dim)`` codes."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``z = mu + sigma * eps`` (reparameterisation) and decode it."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, latent_dim)`` posterior means ``mu(x)`` without gradient (use in eval mode)."""
        return self.encode(x)[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0) -> torch.Tensor:
    """Negative ELBO per image, averaged over the batch (a scalar).

    ``sum_pixels (x_hat - x)^2 + beta * KL(N(mu, exp(logvar)) || N(0, I))`` with
    ``KL = -1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))``.
    """
    recon = ((x_hat - x) ** 2).flatten(1).sum(1)
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return (recon + beta * kl).mean()
