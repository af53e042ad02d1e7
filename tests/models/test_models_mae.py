import pytest
import torch

from sameguard.models import MAEConfig, MaskedAutoencoder, build_classifier, mae_config


@pytest.mark.parametrize("arch, shape", [("conv3", (1, 28, 28)), ("lenet5", (1, 28, 28)), ("lenet5", (3, 32, 32)),
                                         ("resnet18", (3, 32, 32)), ("conv3", (3, 32, 32))])
def test_classifiers_shapes_and_features(arch, shape):
    torch.manual_seed(0)
    model = build_classifier(arch, shape[0], shape[1], 7).eval()
    x = torch.rand(2, *shape) * 2 - 1
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.allclose(model.head(model.forward_features(x)), logits, atol=1e-6)


def test_conv3_matches_authors_layout():
    model = build_classifier("conv3", 1, 28, 10)
    assert model.fc[1].in_features == 2048  # 128 * 4 * 4, as in xythink/SAME


def test_unknown_arch():
    with pytest.raises(ValueError, match="Unknown classifier"):
        build_classifier("vgg99", 1, 28, 10)


def test_paper_mae_size():
    mae = MaskedAutoencoder(mae_config("paper", 28, 1))
    assert mae.config.num_patches == 196
    assert 7.1e6 < mae.num_parameters() < 7.3e6  # about 7.19 M, as the authors' MAE_ViT


def test_mae_masking_and_reconstruction_shapes():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(mae_config("tiny", 28, 1))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    out, mask = mae(x, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and mask.shape == (3, 1, 28, 28)
    # 16 patches of 7x7; int(16 * 0.25) = 4 kept, 12 hidden per image.
    assert torch.equal(mask.flatten(1).sum(1), torch.full((3,), 12.0 * 49))
    _, none_hidden = mae(x, mask_ratio=0.0)
    assert none_hidden.sum() == 0


def test_mae_ratio_zero_is_deterministic_and_masks_use_generator():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(mae_config("tiny", 28, 1)).eval()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(mae.reconstruct(x), mae.reconstruct(x))
    a = mae(x, 0.5, generator=torch.Generator().manual_seed(1))[1]
    b = mae(x, 0.5, generator=torch.Generator().manual_seed(1))[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=28, patch_size=5), "divisible"),
    (dict(emb_dim=10, encoder_heads=3), "divisible"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(encoder_depth=0), "positive"),
])
def test_mae_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAEConfig(**kwargs)


def test_mae_rejects_bad_ratio_in_forward():
    mae = MaskedAutoencoder(mae_config("tiny", 28, 1))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae(torch.zeros(1, 1, 28, 28), mask_ratio=1.0)
