"""SAMEDetector end to end on a Fashion-MNIST subset: separation, sign, errors, save/load, seeds."""

from __future__ import annotations

import json

import pytest
import torch

from sameguard.api import ArtifactError, IntegrityError, NotCalibratedError, NotFittedError
from sameguard.bench.metrics import auroc
from sameguard.detectors import SAMEDetector


def test_separates_fashion_mnist_from_uniform_noise(tiny_same, fmnist_small, noise):
    _, test = fmnist_small
    benign = tiny_same.score(test.images[:300])
    attack = tiny_same.score(noise)
    assert auroc(benign.numpy(), attack.numpy()) > 0.9
    # The sign: noise scores higher on average, and both terms are non-negative.
    assert attack.mean() > benign.mean()
    parts = tiny_same.score_components(noise[:10])
    assert (parts.s1 >= 0).all()
    assert (parts.s2 >= 0).all()
    torch.testing.assert_close(parts.score, tiny_same.alpha * parts.s1 + (1 - tiny_same.alpha) * parts.s2)


def test_calibration_meets_target_fpr_on_its_data(tiny_same, fmnist_small):
    train, _ = fmnist_small
    _, held_out = train.split_off(500 / len(train), seed=0)
    flagged = tiny_same.predict(held_out.images)
    assert flagged.dtype == torch.bool
    assert flagged.shape == (500,)
    assert flagged.float().mean() <= 0.05


def test_predict_flags_noise(tiny_same, noise):
    assert tiny_same.predict(noise).float().mean() > 0.9


def test_victim_used_as_black_box(tiny_same, tiny_victim, fmnist_small):
    """Only the victim's output probabilities are used: a plain function gives identical scores."""
    _, test = fmnist_small
    x = test.images[:50]
    detector = SAMEDetector.from_preset("tiny")
    detector.__dict__.update({k: v for k, v in tiny_same.__dict__.items()})
    detector.victim_ = lambda batch: tiny_victim.predict_proba(batch)
    torch.testing.assert_close(detector.score(x), tiny_same.score(x))


def test_errors_before_fit():
    detector = SAMEDetector.from_preset("tiny")
    x = torch.zeros(2, 1, 28, 28)
    for call in (lambda: detector.score(x), lambda: detector.predict(x), lambda: detector.calibrate(x, 0.01),
                 lambda: detector.score_components(x), lambda: detector.save("unused")):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


def test_predict_before_calibrate(tiny_same):
    detector = SAMEDetector.from_preset("tiny")
    detector.__dict__.update(tiny_same.__dict__)
    detector.threshold_ = None
    with pytest.raises(NotCalibratedError, match="calibrate"):
        detector.predict(torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(1, 3, 28, 28), r"\(N, 1, 28, 28\)"),
        (torch.zeros(1, 1, 32, 32), r"\(N, 1, 28, 28\)"),
        (torch.zeros(1, 28, 28), "3-D tensor"),
        (torch.zeros(0, 1, 28, 28), "empty"),
        (torch.full((1, 1, 28, 28), float("nan")), "NaN"),
        (torch.full((1, 1, 28, 28), 2.0), r"\[-1, 1\]"),
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "floating-point"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error(tiny_same, x, message):
    with pytest.raises(ValueError, match=message):
        tiny_same.score(x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=2.0), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(mae_loss="l1"), "mae_loss"),
        (dict(mae_loss="masked", mae_mask_ratio=0.0), "nothing to learn"),
        (dict(aux_mask_ratio=1.0), "aux_mask_ratio"),
        (dict(mae_mask_ratio=-0.1), "mae_mask_ratio"),
        (dict(mae_epochs=0), "mae_epochs"),
        (dict(aux_epochs=1.5), "aux_epochs"),
        (dict(mae_lr=0.0), "mae_lr"),
        (dict(mae_weight_decay=-1.0), "mae_weight_decay"),
        (dict(max_train_samples=0), "max_train_samples"),
        (dict(seed=-1), "seed"),
        (dict(mae=3), "mae must be"),
        (dict(aux_arch=5), "aux_arch"),
    ],
)
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAMEDetector(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset .huge. for SAMEDetector"):
        SAMEDetector.from_preset("huge")


def test_save_load_gives_identical_scores(tiny_same, tiny_victim, fmnist_small, noise, tmp_path):
    _, test = fmnist_small
    x = torch.cat([test.images[:20], noise[:20]])
    tiny_same.save(tmp_path / "det")
    loaded = SAMEDetector.load(tmp_path / "det", tiny_victim)
    torch.testing.assert_close(loaded.score(x), tiny_same.score(x))
    assert loaded.threshold_ == tiny_same.threshold_
    assert loaded.calibration_fpr_ == tiny_same.calibration_fpr_
    manifest = json.loads((tmp_path / "det" / "manifest.json").read_text())
    assert manifest["config"]["victim_weights_sha256"] == tiny_victim.weights_sha256
    assert set(manifest["files"]) == {"mae.safetensors", "aux.safetensors"}
    assert manifest["config"]["normalisation"].startswith("x = 2 * pixel / 255 - 1")


def test_tampered_weights_are_refused(tiny_same, tiny_victim, tmp_path):
    path = tiny_same.save(tmp_path / "det")
    weights = path / "aux.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="aux.safetensors"):
        SAMEDetector.load(path, tiny_victim)


def test_pickle_files_are_refused(tiny_same, tiny_victim, tmp_path):
    path = tiny_same.save(tmp_path / "det")
    (path / "mae.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ArtifactError, match="pickle"):
        SAMEDetector.load(path, tiny_victim)


def test_load_refuses_another_victim(tiny_same, fmnist_small, tmp_path):
    from sameguard.victim import train_victim

    train, test = fmnist_small
    other = train_victim(train.take(200, seed=1), arch="lenet5", epochs=1, seed=1, progress=False)
    path = tiny_same.save(tmp_path / "det")
    with pytest.raises(ArtifactError, match="different|fitted for a victim"):
        SAMEDetector.load(path, other)
    assert SAMEDetector.load(path, other, check_victim=False).is_fitted()


def test_same_seed_same_detector(tiny_victim, fmnist_small, noise):
    train, _ = fmnist_small
    data = train.take(400, seed=3)
    a = SAMEDetector.from_preset("tiny", mae_epochs=1, aux_epochs=1, seed=7, progress=False).fit(tiny_victim, data)
    b = SAMEDetector.from_preset("tiny", mae_epochs=1, aux_epochs=1, seed=7, progress=False).fit(tiny_victim, data)
    c = SAMEDetector.from_preset("tiny", mae_epochs=1, aux_epochs=1, seed=8, progress=False).fit(tiny_victim, data)
    x = noise[:16]
    torch.testing.assert_close(a.score(x), b.score(x), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a.score(x), c.score(x), rtol=1e-4, atol=1e-6)
