"""MSP and Energy save and load (manifest only: parameters, threshold, the victim's SHA-256)."""

from __future__ import annotations

import pytest
import torch

from sameguard.api import ArtifactError
from sameguard.detectors import EnergyDetector, MSPDetector, load_detector
from sameguard.models import build_classifier
from sameguard.victim import Victim


def victim(seed: int) -> Victim:
    torch.manual_seed(seed)
    return Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="x", image_shape=(1, 28, 28),
                  classes=[str(i) for i in range(10)])


@pytest.mark.parametrize("cls, params", [(MSPDetector, {"batch_size": 7}), (EnergyDetector, {"temperature": 2.0})])
def test_round_trip_keeps_params_threshold_and_scores(cls, params, tmp_path):
    v = victim(0)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    det = cls(**params).fit(v).calibrate(torch.rand(50, 1, 28, 28) * 2 - 1, 0.1)
    det.save(tmp_path / "det")
    loaded = load_detector(tmp_path / "det", v)
    assert type(loaded) is cls
    assert loaded.get_params() == det.get_params()
    assert loaded.threshold_ == det.threshold_
    torch.testing.assert_close(loaded.score(x), det.score(x))
    with pytest.raises(ArtifactError, match="victim"):
        load_detector(tmp_path / "det", victim(1))
