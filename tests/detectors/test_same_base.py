"""What the reconstructor-generic SAME base gives both SAME detectors: params, presets, persistence."""

from __future__ import annotations

import json

import pytest

from sameguard.detectors import ConvAESAMEDetector, ReconstructionDetector, SAMEDetector
from sameguard.models import MAEConfig, mae_config

SAME_CLASSES = [SAMEDetector, ConvAESAMEDetector]


@pytest.mark.parametrize("cls", SAME_CLASSES)
def test_is_a_reconstruction_detector(cls):
    assert issubclass(cls, ReconstructionDetector)
    assert cls.NEEDS == frozenset({"defender-data"})
    assert set(cls.PRESETS) == {"paper", "cpu", "tiny"}


@pytest.mark.parametrize("cls", SAME_CLASSES)
def test_paper_preset_is_the_default(cls):
    assert cls.from_preset("paper").get_params() == cls().get_params()


@pytest.mark.parametrize("cls", SAME_CLASSES)
def test_params_round_trip_through_json(cls):
    detector = cls.from_preset("tiny", alpha=0.5, seed=3)
    params = json.loads(json.dumps(detector.get_params()))
    assert params == detector.get_params()
    assert cls(**cls._params_from_manifest(params)).get_params() == params
    assert "device" not in params
    assert "progress" not in params


@pytest.mark.parametrize("cls", SAME_CLASSES)
def test_repr_shows_changed_params(cls):
    assert repr(cls(alpha=0.5)) == f"{cls.__name__}(alpha=0.5)"
    assert repr(cls()) == f"{cls.__name__}()"


def test_mae_config_params_round_trip():
    config = mae_config("tiny", 28, 1)
    detector = SAMEDetector(mae=config)
    params = json.loads(json.dumps(detector.get_params()))
    assert params["mae"] == config.to_dict()
    restored = SAMEDetector(**SAMEDetector._params_from_manifest(params))
    assert isinstance(restored.mae, MAEConfig)
    assert restored.mae == config


@pytest.mark.parametrize("cls, part", [(SAMEDetector, "mae"), (ConvAESAMEDetector, "ae")])
def test_fitted_state_before_fit(cls, part):
    detector = cls()
    assert not detector.is_fitted()
    assert getattr(detector, f"{part}_") is None
    assert detector.PART == part


@pytest.mark.parametrize("kwargs, message", [
    (dict(latent_dim=0), "latent_dim"), (dict(ae_lr=-1.0), "ae_lr"), (dict(alpha=1.5), "alpha"),
    (dict(max_train_samples=0), "max_train_samples"), (dict(aux_arch=3), "aux_arch"),
])
def test_conv_ae_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvAESAMEDetector(**kwargs)
