"""Victim (and auxiliary / substitute) classifier architectures.

All networks take images ``(N, C, H, W)`` in ``[-1, 1]`` and return logits ``(N, K)``. Each exposes
``forward_features(x) -> (N, D)`` (the penultimate representation, used by white-box baselines)
and ``head`` (the last linear layer), so that ``forward(x) == head(forward_features(x))``.

* :class:`Conv3`: the authors' ``conv3`` for 28x28 grey images (xythink/SAME
  ``ml_models/conv3.py``, ``mult=2``): three 3x3 convolutions with two max-pools and a 512-unit
  hidden layer.
* :class:`LeNet5`: LeCun et al. (1998), with ReLU and max-pooling as in most re-implementations.
* :class:`ResNet18`: He et al. (2016) in its CIFAR form (3x3 stem, no stem max-pool), for 32x32
  colour images.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Conv3", "LeNet5", "ResNet18"]


def _check_geometry(in_channels: int, image_size: int, num_classes: int, min_size: int) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels}.")
    if image_size < min_size:
        raise ValueError(f"image_size must be at least {min_size} pixels, got {image_size}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")


class Conv3(nn.Module):
    """The authors' ``conv3`` network (xythink/SAME, ``Conv3`` with ``mult=2``).

    Conv(C->32, 3) -> ReLU -> MaxPool(2) -> Conv(32->64, 3) -> ReLU -> Conv(64->128, 3) -> ReLU
    -> MaxPool(2) -> Linear(->512) -> ReLU -> Linear(512->K). For 28x28 inputs the flattened
    feature has 128*4*4 = 2048 values, as in the authors' code.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        _check_geometry(in_channels, image_size, num_classes, min_size=12)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = ((image_size - 2) // 2 - 4) // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, 512), nn.ReLU(inplace=True))
        self.head = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class LeNet5(nn.Module):
    """LeNet-5: two 5x5 convolutions (6 and 16 maps) and 120-84 fully connected layers.

    28x28 inputs are zero-padded by 2 in the first convolution so that, as in the original
    32x32 design, the last feature map is 16x5x5.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        _check_geometry(in_channels, image_size, num_classes, min_size=16)
        pad = 2 if image_size < 32 else 0
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(84, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 in its CIFAR form: 3x3 stem without max-pool, stages of 64/128/256/512 channels."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        _check_geometry(in_channels, image_size, num_classes, min_size=8)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
