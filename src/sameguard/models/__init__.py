"""Network definitions: classifiers (victim, auxiliary, substitute) and the masked auto-encoder."""

from __future__ import annotations

from torch import nn

from .autoencoder import ConvAEConfig, ConvAutoencoder
from .classifiers import Conv3, LeNet5, ResNet18
from .generator import GeneratorA
from .mae import MAE_PRESETS, MAEConfig, MaskedAutoencoder
from .vae import ConvVAE, vae_loss

__all__ = [
    "CLASSIFIERS",
    "ConvAEConfig",
    "ConvAutoencoder",
    "ConvVAE",
    "vae_loss",
    "Conv3",
    "GeneratorA",
    "LeNet5",
    "ResNet18",
    "MAEConfig",
    "MAE_PRESETS",
    "MaskedAutoencoder",
    "build_classifier",
    "mae_config",
]

#: Classifier architectures by name.
CLASSIFIERS: dict[str, type[nn.Module]] = {"conv3": Conv3, "lenet5": LeNet5, "resnet18": ResNet18}


def build_classifier(arch: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A freshly initialised classifier ``arch`` for ``(in_channels, image_size, image_size)`` inputs."""
    try:
        cls = CLASSIFIERS[arch]
    except KeyError:
        raise ValueError(
            f"Unknown classifier architecture {arch!r}; choose one of {sorted(CLASSIFIERS)}."
        ) from None
    return cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def mae_config(preset: str, image_size: int, in_channels: int, **overrides) -> MAEConfig:
    """An :class:`MAEConfig` from a named preset (a key of :data:`MAE_PRESETS`) and overrides."""
    try:
        base = dict(MAE_PRESETS[preset])
    except KeyError:
        raise ValueError(f"Unknown MAE preset {preset!r}; choose one of {sorted(MAE_PRESETS)}.") from None
    base.update(overrides)
    return MAEConfig(image_size=image_size, in_channels=in_channels, **base)
