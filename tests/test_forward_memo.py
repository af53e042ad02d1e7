"""Forward passes shared within one guarded request: same results, fewer passes, no stale reuse."""

from __future__ import annotations

import copy
import math
import threading

import torch

from sameguard.alarms import ClientAlarms
from sameguard.detectors import EnergyDetector, MSPDetector
from sameguard.forward_memo import memoized, remember, shared_forward, sharing_active
from sameguard.guard import Guard


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.sum(dim=(1, 2, 3))


def test_nothing_is_cached_outside_the_scope():
    f, x = Counter(), torch.ones(3, 1, 2, 2)
    assert not sharing_active()
    memoized((f,), x, lambda: f(x))
    memoized((f,), x, lambda: f(x))
    assert f.calls == 2


def test_same_owner_and_input_computed_once_and_views_of_the_same_memory_match():
    f, x = Counter(), torch.ones(3, 1, 2, 2)
    with shared_forward():
        a = memoized((f,), x, lambda: f(x))
        b = memoized((f,), x[0:3], lambda: f(x[0:3]))  # a new view object over the same memory
        assert f.calls == 1 and a is b
        memoized((f,), x[0:2], lambda: f(x[0:2]))  # another shape: computed
        memoized((Counter(),), x, lambda: f(x))  # another owner object: computed
        memoized((f, 2), x, lambda: f(x))  # another plain option: computed
        assert f.calls == 4
        assert memoized((f, 2), x, lambda: f(x)) is not None and f.calls == 4  # equal plain option: reused
    with shared_forward():  # a new request starts empty
        memoized((f,), x, lambda: f(x))
    assert f.calls == 5


def test_an_in_place_change_is_never_served_from_the_cache():
    f, x = Counter(), torch.ones(2, 1, 2, 2)
    with shared_forward():
        first = memoized((f,), x, lambda: f(x))
        x.mul_(3)
        second = memoized((f,), x, lambda: f(x))
    assert f.calls == 2
    assert torch.equal(first, torch.full((2,), 4.0)) and torch.equal(second, torch.full((2,), 12.0))


def test_other_threads_do_not_see_this_threads_cache():
    f, x = Counter(), torch.ones(2, 1, 2, 2)
    seen = []
    with shared_forward():
        memoized((f,), x, lambda: f(x))
        t = threading.Thread(target=lambda: seen.append(sharing_active()))
        t.start()
        t.join()
    assert seen == [False]


def test_the_guard_shares_passes_and_gives_the_same_answers_and_evidence(tiny_victim, tiny_same, fmnist_small):
    """SAME and its s2 variant (alpha apart, the same networks), MSP and Energy: the victim runs once
    and the MAE once per request, and every score, p-value and evidence is what unshared scoring gives."""
    _, test = fmnist_small
    s2 = copy.copy(tiny_same)
    s2.alpha = 0.0
    scorers = {"same": tiny_same, "s2": s2, "msp": MSPDetector().fit(tiny_victim),
               "energy": EnergyDetector().fit(tiny_victim)}
    calib, queries = test.images[:600], test.images[600:640]
    alarms = ClientAlarms.calibrate(tiny_victim, scorers, calib, delta=1e-3, min_class_size=10, seed=0)
    guard = Guard(tiny_victim, tiny_same, "monitor", alarms=alarms)

    calls = {"victim": 0, "mae": 0}
    victim_forward, mae_forward = tiny_victim.model.forward, tiny_same.mae_.reconstruct

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    tiny_victim.model.forward = count("victim", victim_forward)
    tiny_same.mae_.reconstruct = count("mae", mae_forward)
    try:
        verdict = guard.protect(queries, "client")
    finally:
        del tiny_victim.model.forward, tiny_same.mae_.reconstruct
    assert calls == {"victim": 1, "mae": 1}

    reference = ClientAlarms.calibrate(tiny_victim, scorers, calib, delta=1e-3, min_class_size=10, seed=0)
    # Unshared: each scorer's own score(x), outside any request (no memo, no shortcut from the victim's outputs).
    own = {name: s.score(queries).to(torch.float64) for name, s in scorers.items()}
    expected = reference.monitor.update("client", own, tiny_victim(queries).argmax(1))
    torch.testing.assert_close(verdict.probabilities, tiny_victim(queries))
    torch.testing.assert_close(torch.tensor([d.score for d in verdict.decisions]), tiny_same.score(queries))
    torch.testing.assert_close(torch.tensor([d.evidence for d in verdict.decisions], dtype=torch.float64),
                               expected.log_evidence_path / math.log(10))


def test_images_are_validated_once_per_request_and_again_after_an_in_place_change():
    import pytest

    from sameguard.validation import check_images

    x = torch.zeros(2, 1, 4, 4)
    with shared_forward():
        first = check_images(x, (1, 4, 4))
        assert check_images(x, (1, 4, 4)) is first  # the second check is the first's result
        with pytest.raises(ValueError, match=r"\(N, 3, 4, 4\)"):
            check_images(x, (3, 4, 4))  # another expected shape is checked on its own
        x[0, 0, 0, 0] = float("nan")  # an in-place change: checked again, and refused
        with pytest.raises(ValueError, match="NaN or infinite"):
            check_images(x, (1, 4, 4))
        y = torch.full((1, 1, 4, 4), 3.0)
        with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
            check_images(y, (1, 4, 4))
        with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
            check_images(y, (1, 4, 4))  # a refusal is never cached


def test_remember_seeds_a_result_only_inside_shared_forward():
    x = torch.ones(2, 3)
    owner = object()
    remember((owner,), x, "outside")  # no request: nothing is kept
    with shared_forward():
        assert memoized((owner,), x, lambda: "computed") == "computed"
    with shared_forward():
        remember((owner,), x, "seeded")
        assert memoized((owner,), x, lambda: "computed") == "seeded"
        assert memoized((owner,), x.clone(), lambda: "computed") == "computed"  # another tensor
    with shared_forward():
        assert memoized((owner,), x, lambda: "computed") == "computed"  # emptied at the end of the request


def test_no_grad_turns_gradients_off_only_where_they_are_on():
    from sameguard.forward_memo import no_grad

    seen = []

    @no_grad
    def double(t: torch.Tensor) -> torch.Tensor:
        """Doubles."""
        seen.append(torch.is_grad_enabled())
        return t * 2

    w = torch.ones(3, requires_grad=True)
    assert not double(w).requires_grad and seen == [False]  # gradients on: turned off inside, as torch.no_grad
    assert torch.is_grad_enabled()  # and back on after
    with torch.no_grad():
        assert not double(w).requires_grad and seen == [False, False]
    assert double.__doc__ == "Doubles." and double.__name__ == "double"
