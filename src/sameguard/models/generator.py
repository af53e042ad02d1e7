"""The DFME generator: ``GeneratorA`` from DFAD, as used by data-free model extraction.

Fang et al., "Data-Free Adversarial Distillation" (DFAD, arXiv 1912.11006) introduced it;
Truong, Maini, Walls and Papernot, "Data-Free Model Extraction", CVPR 2021 (arXiv 2011.14779),
use it unchanged. Reference implementation: cake-lab/datafree-model-extraction
``dfme/network/gan.py::GeneratorA``.

``z ~ N(0, I_nz)`` -> ``Linear(nz -> 2*ngf * (S/4)^2)`` -> reshape ``(2*ngf, S/4, S/4)`` -> BN ->
x2 nearest upsample -> Conv3x3(2ngf -> 2ngf) -> BN -> LeakyReLU(0.2) -> x2 upsample ->
Conv3x3(2ngf -> ngf) -> BN -> LeakyReLU(0.2) -> Conv3x3(ngf -> C) -> ``BatchNorm2d(C, affine=False)``
gives the pre-activation ``x_pre`` ``(N, C, S, S)``; the image is ``tanh(x_pre)`` in ``(-1, 1)``
(the package's range). ``S`` must be a multiple of 4: 32 (CIFAR, the reference) and 28
(Fashion-MNIST, initial 7x7 map) both work, with any number of channels ``C`` (1 or 3).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GeneratorA"]


class GeneratorA(nn.Module):
    """DFAD/DFME ``GeneratorA``: noise ``(N, nz)`` -> images ``(N, C, S, S)`` in ``(-1, 1)``.

    Args:
        nz: noise dimension (256 in DFME).
        ngf: base width (64).
        out_channels: image channels ``C``.
        image_size: side ``S``, a multiple of 4 (e.g. 28 or 32).
        final_bn: end with ``BatchNorm2d(C, affine=False)`` before ``tanh`` (the reference default).
    """

    def __init__(self, nz: int = 256, ngf: int = 64, out_channels: int = 3, image_size: int = 32,
                 final_bn: bool = True) -> None:
        super().__init__()
        for name, value in (("nz", nz), ("ngf", ngf), ("out_channels", out_channels), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4 (two x2 upsamplings), got {image_size}.")
        self.nz, self.ngf, self.out_channels, self.image_size = nz, ngf, out_channels, image_size
        self.init_size = image_size // 4
        self.l1 = nn.Linear(nz, ngf * 2 * self.init_size ** 2)
        self.conv_blocks0 = nn.BatchNorm2d(ngf * 2)
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
        )
        last: list[nn.Module] = [
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, out_channels, 3, stride=1, padding=1),
        ]
        if final_bn:
            last.append(nn.BatchNorm2d(out_channels, affine=False))
        self.conv_blocks2 = nn.Sequential(*last)

    def forward(self, z: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        """Images ``tanh(x_pre)`` ``(N, C, S, S)``, or ``x_pre`` itself with ``pre_activation=True``."""
        out = self.l1(z.reshape(z.shape[0], -1))
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        img = self.conv_blocks0(out)
        img = F.interpolate(img, scale_factor=2)
        img = self.conv_blocks1(img)
        img = F.interpolate(img, scale_factor=2)
        img = self.conv_blocks2(img)
        return img if pre_activation else torch.tanh(img)
