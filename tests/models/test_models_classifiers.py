"""The victim classifiers (sameguard.models.classifiers): shapes, features, the authors' layout."""

import pytest
import torch

from sameguard.models import build_classifier


@pytest.mark.parametrize("arch, shape", [("conv3", (1, 28, 28)), ("lenet5", (1, 28, 28)), ("lenet5", (3, 32, 32)),
                                         ("resnet18", (3, 32, 32)), ("conv3", (3, 32, 32))])
def test_classifiers_shapes_and_features(arch, shape):
    torch.manual_seed(0)
    model = build_classifier(arch, shape[0], shape[1], 7).eval()
    x = torch.rand(2, *shape) * 2 - 1
    logits = model(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(model.head(model.forward_features(x)), logits, rtol=1e-5, atol=1e-6)


def test_conv3_matches_authors_layout():
    model = build_classifier("conv3", 1, 28, 10)
    assert model.fc[1].in_features == 2048  # 128 * 4 * 4, as in xythink/SAME


def test_unknown_arch():
    with pytest.raises(ValueError, match="Unknown classifier"):
        build_classifier("vgg99", 1, 28, 10)
