"""The one detector registry and the declared abilities (protocols in ``sameguard.api``)."""

from __future__ import annotations

import json

import pytest
import torch

from sameguard.api import ArtifactError, Detector, SaveableDetector, StatefulDetector
from sameguard.detectors import DETECTOR_KINDS, DETECTORS, build_detector, detector_class, fit_detector, load_detector
from sameguard.detectors.registry import detector_names, is_saveable

#: name -> (stateful, saveable): what each registered detector declares it can do.
ABILITIES = {
    "same": (False, True),
    "same-conv-ae": (False, True),
    "msp": (False, True),
    "energy": (False, True),
    "mahalanobis": (False, True),
    "outlier-exposure": (False, True),
    "prada": (True, False),
    "vardetect": (True, True),
}


def test_every_detector_is_listed():
    assert set(DETECTORS) == set(ABILITIES)
    assert all(issubclass(cls, Detector) for cls in DETECTORS.values())


@pytest.mark.parametrize("name, stateful, saveable", [(n, *a) for n, a in ABILITIES.items()])
def test_abilities_are_declared(name, stateful, saveable):
    detector = DETECTORS[name]()
    assert isinstance(detector, StatefulDetector) == stateful
    assert isinstance(detector, SaveableDetector) == saveable
    assert is_saveable(DETECTORS[name]) == saveable


def test_kinds_map_to_their_classes():
    assert set(DETECTOR_KINDS.values()) == {DETECTORS[n] for n, (_, s) in ABILITIES.items() if s}
    for kind, cls in DETECTOR_KINDS.items():
        assert cls.KIND == kind
    assert detector_names(saveable=True) == sorted(n for n, (_, s) in ABILITIES.items() if s)


_SAME_SCORING = ("alpha", "batch_size", "standardize", "log_terms", "complexity")


@pytest.mark.parametrize("name, expected", [
    ("same", (*_SAME_SCORING, "score_mask_ratio", "score_masks", "score_seed")), ("same-conv-ae", _SAME_SCORING),
    ("msp", ()), ("prada", ())])
def test_scoring_only_params(name, expected):
    assert DETECTORS[name].SCORING_ONLY_PARAMS == expected


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        DETECTORS["mine"] = object  # type: ignore[index]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: detector_class("nope"), "Unknown detector 'nope'"),
        (lambda: build_detector("msp", {"alpha": 0.5}), "has no parameter alpha"),
        (lambda: build_detector("msp", preset="tiny"), "Unknown preset 'tiny' for MSPDetector; it has none"),
        (lambda: fit_detector(DETECTORS["mahalanobis"](), None), "needs the defender's training data"),
        (lambda: fit_detector(DETECTORS["outlier-exposure"](), None, train_data=[]), "needs outlier data"),
    ],
)
def test_registry_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_build_detector_fills_runtime_settings_it_takes():
    same = build_detector("same", {"alpha": 0.5}, preset="tiny", seed=4, device="cpu", progress=False)
    assert (same.alpha, same.seed, same.mae, same.progress) == (0.5, 4, "tiny", False)
    msp = build_detector("msp", seed=4, device="cpu", progress=False)  # takes none of them
    assert msp.get_params() == DETECTORS["msp"]().get_params()


def test_load_detector_reads_the_manifest_kind(tiny_same, tiny_victim, tmp_path):
    path = tiny_same.save(tmp_path / "det")
    loaded = load_detector(path, tiny_victim)
    assert type(loaded) is type(tiny_same)
    x = torch.zeros(2, 1, 28, 28)
    torch.testing.assert_close(loaded.score(x), tiny_same.score(x))


@pytest.mark.parametrize(
    "manifest, message",
    [
        (None, "manifest.json is missing"),
        ("{not json", "not a valid manifest"),
        (json.dumps({"kind": "victim"}), "'victim' artifact, not a detector"),
    ],
)
def test_load_detector_errors(tmp_path, manifest, message):
    (tmp_path / "d").mkdir()
    if manifest is not None:
        (tmp_path / "d" / "manifest.json").write_text(manifest)
    with pytest.raises(ArtifactError, match=message):
        load_detector(tmp_path / "d", None)


def test_load_detector_needs_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="No artifact directory"):
        load_detector(tmp_path / "missing", None)
