"""torch.compile of a victim and its detectors in place (``serve --compile``)."""

from __future__ import annotations

import copy

import pytest
import torch

from sameguard.artifacts import fitted_networks, fitted_state_sha256
from sameguard.compilation import compile_networks
from sameguard.detectors import MSPDetector


@pytest.fixture
def compiled_pair(tiny_victim, tiny_same):
    """Copies of the session's tiny victim and SAME (the detector's victim is the copied victim)."""
    torch._dynamo.reset()
    return copy.deepcopy((tiny_victim, tiny_same))


def test_compile_networks_compiles_in_place_keeps_weights_and_outputs(compiled_pair, tiny_victim, tiny_same, noise):
    victim, same = compiled_pair
    assert same.victim_ is victim
    sha = fitted_state_sha256(same)
    msp = MSPDetector().fit(victim)  # no fitted network: nothing of its own to compile
    compiled = compile_networks(victim, [same, msp, same], backend="aot_eager")
    assert compiled == ["victim.model", "SAMEDetector.aux_", "SAMEDetector.reconstructor_"]  # each network once
    for module in (victim.model, *fitted_networks(same).values()):
        assert module._compiled_call_impl is not None
    assert fitted_state_sha256(same) == sha  # the same modules, parameters and state dicts
    assert fitted_networks(tiny_same)["aux_"]._compiled_call_impl is None  # the originals untouched
    # Every batch size after the warm-up (1, 2, 64) runs without compiling again, with eager's outputs.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 3, 17, 100):
            x = noise[:n]
            torch.testing.assert_close(victim.predict_proba(x), tiny_victim.predict_proba(x), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(same.score(x), tiny_same.score(x), atol=1e-4, rtol=1e-4)


def test_compile_networks_rejects_what_it_cannot_compile(compiled_pair):
    victim, same = compiled_pair
    with pytest.raises(ValueError, match="positive batch sizes"):
        compile_networks(victim, [same], backend="eager", warm_up_batches=(1, 0))
    with pytest.raises(ValueError, match="torch network"):
        compile_networks(lambda x: x, [same], backend="eager")
    assert victim.model._compiled_call_impl is None  # refused before anything was compiled
