"""Fixtures for the baseline detectors: a tiny real victim, real and noise queries, fitted detectors.

Everything is trained once per session, on 1000 Fashion-MNIST images (from the session's
``fmnist_small`` fixture of ``tests/conftest.py``, which also makes torch single-threaded: the tiny networks are
fastest that way, and two torch threads crawl when the two CPU cores are shared.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sameguard.data import uniform_noise
from sameguard.detectors.energy import EnergyDetector
from sameguard.detectors.mahalanobis import MahalanobisDetector
from sameguard.detectors.msp import MSPDetector
from sameguard.detectors.outlier_exposure import OutlierExposureDetector
from sameguard.detectors.prada import PRADADetector
from sameguard.detectors.same_conv_ae import ConvAESAMEDetector
from sameguard.detectors.vardetect import VarDetectDetector
from sameguard.victim import Victim, train_victim


@pytest.fixture(scope="session")
def fmnist_tiny(fmnist_small):
    """(train, test): 1000 training and 300 test Fashion-MNIST images."""
    train, test = fmnist_small
    return train.take(1000, seed=0), test.take(300, seed=0)


@pytest.fixture(scope="session")
def baseline_victim(fmnist_tiny):
    """LeNet-5, 5 epochs on 1000 images (about 70 % test accuracy; a couple of seconds)."""
    train, test = fmnist_tiny
    return train_victim(train, test, arch="lenet5", epochs=5, lr=0.05, batch_size=16, seed=0, progress=False)


class PrototypeNet(nn.Module):
    """A hand-made, confident classifier: cosine similarity to the K class-mean images, times ``scale``.

    ``forward_features(x)`` is the ``(N, K)`` vector of cosine similarities between the
    flattened image and each class's mean training image; the head multiplies it by ``scale``.
    A real image resembles its class's mean (large, peaked logits); uniform noise is nearly
    orthogonal to every mean (logits near 0, a near-uniform softmax). This pins the sign of
    the confidence and feature-space baselines without depending on how a tiny trained network
    happens to treat noise.
    """

    def __init__(self, prototypes: torch.Tensor, scale: float = 20.0) -> None:
        super().__init__()
        k = len(prototypes)
        self.register_buffer("prototypes", prototypes / prototypes.norm(dim=1, keepdim=True))
        self.head = nn.Linear(k, k, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(scale * torch.eye(k))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)
        return (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ self.prototypes.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@pytest.fixture(scope="session")
def prototype_victim(fmnist_tiny) -> Victim:
    """A :class:`Victim` around :class:`PrototypeNet` built from the 1000 training images."""
    train, _ = fmnist_tiny
    prototypes = torch.stack([train.images[train.labels == k].flatten(1).mean(0) for k in range(train.num_classes)])
    return Victim(PrototypeNet(prototypes), arch="prototype", dataset=train.name, image_shape=train.image_shape,
                  classes=train.classes)


@pytest.fixture(scope="session")
def noise_queries() -> torch.Tensor:
    """200 uniform-noise images, the obvious attack."""
    return uniform_noise(200, (1, 28, 28), seed=1)


@pytest.fixture(scope="session")
def outlier_set() -> torch.Tensor:
    """The outliers OE is exposed to: uniform noise from another seed than :func:`noise_queries`."""
    return uniform_noise(500, (1, 28, 28), seed=7)


def _fit(name: str, victim, train, outliers):
    if name == "msp":
        return MSPDetector().fit(victim)
    if name == "energy":
        return EnergyDetector().fit(victim)
    if name == "mahalanobis":
        return MahalanobisDetector().fit(victim, train)
    if name == "prada":
        return PRADADetector(window_size=150, min_distances=50).fit(victim)
    if name == "vardetect":
        return VarDetectDetector(epochs=2, window_size=20, reference_size=200, seed=0,
                                 progress=False).fit(victim, train)
    if name == "outlier_exposure":
        return OutlierExposureDetector(epochs=1, batch_size=64, outlier_batch_size=64, seed=0,
                                       progress=False).fit(victim, train, outliers)
    if name == "same_conv_ae":
        return ConvAESAMEDetector.from_preset("tiny", seed=0, progress=False).fit(victim, train)
    raise KeyError(name)


#: Baselines whose sign is pinned on the hand-made :class:`PrototypeNet` victim; the others use
#: the trained LeNet-5 (OE fine-tunes it, and the rest do not depend on its confidence).
ON_PROTOTYPE_VICTIM = frozenset({"msp", "energy", "mahalanobis"})


@pytest.fixture(scope="session")
def fitted_baselines(baseline_victim, prototype_victim, fmnist_tiny, outlier_set):
    """Lazily fitted baselines by name (each fitted at most once per session).

    ``get(name)`` returns the fitted detector and ``victim_for(name)`` the victim it was fitted on.
    """
    train, _ = fmnist_tiny
    cache: dict[str, object] = {}

    def victim_for(name: str) -> Victim:
        return prototype_victim if name in ON_PROTOTYPE_VICTIM else baseline_victim

    def get(name: str):
        if name not in cache:
            cache[name] = _fit(name, victim_for(name), train, outlier_set)
        return cache[name]

    return SimpleNamespace(get=get, victim_for=victim_for)


@pytest.fixture(scope="session")
def baseline_classes():
    """The detector class of each baseline, by name."""
    return {
        "msp": MSPDetector, "energy": EnergyDetector, "mahalanobis": MahalanobisDetector,
        "prada": PRADADetector, "vardetect": VarDetectDetector, "outlier_exposure": OutlierExposureDetector,
        "same_conv_ae": ConvAESAMEDetector,
    }
