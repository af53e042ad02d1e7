"""The masked auto-encoder of SAME (sameguard.models.mae): size, masking, reconstruction, config errors."""

import pytest
import torch

from sameguard.models import MAEConfig, MaskedAutoencoder, mae_config


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
    ({"image_size": 28, "patch_size": 5}, "divisible"),
    ({"emb_dim": 10, "encoder_heads": 3}, "divisible"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"encoder_depth": 0}, "positive"),
])
def test_mae_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAEConfig(**kwargs)


def test_mae_rejects_bad_ratio_in_forward():
    mae = MaskedAutoencoder(mae_config("tiny", 28, 1))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae(torch.zeros(1, 1, 28, 28), mask_ratio=1.0)
