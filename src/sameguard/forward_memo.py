"""Share forward passes between the scorers of one guarded request.

A guarded query goes through the victim (for the answer), SAME (which asks the victim again and runs
its reconstruction model and auxiliary classifier), and, with per-client alarms, further scorers
(SAME's ``s2`` term with the same networks, MSP and Energy on the victim's outputs). Without sharing,
the victim runs four times and the reconstruction model twice on the same images.

Inside ``with shared_forward():`` (the guard opens one per request) a model's output on a batch is
computed once and reused by every later caller on the *same* batch; outside it nothing is cached,
so stand-alone scoring and timing are unaffected. A cached output is reused only when

* the model objects are the very same objects (compared with ``is``, and held by the cache so that
  their ids cannot be reused), and
* the input is the same memory seen the same way: data pointer, shape, strides, dtype, device and
  PyTorch's version counter (bumped by every in-place change) all equal, with the input itself held
  by the cache so that its memory cannot be freed and handed to another tensor meanwhile.

The cache is per thread (the service decides requests on several threads) and is emptied when the
outermost ``with`` ends.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["memoized", "no_grad", "remember", "shared_forward", "sharing_active"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_local = threading.local()


def _signature(x: torch.Tensor) -> tuple[Any, ...]:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


@contextmanager
def shared_forward() -> Iterator[None]:
    """Reuse model outputs on identical inputs until the outermost ``with`` ends (this thread only)."""
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        _local.entries = {}
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0:
            _local.entries = {}


def sharing_active() -> bool:
    """Whether this thread is inside :func:`shared_forward`."""
    return getattr(_local, "depth", 0) > 0


def memoized(owners: tuple[object, ...], x: torch.Tensor, compute: Callable[[], T]) -> T:
    """``compute()``, or its earlier result for the same ``owners`` and the same input ``x``.

    Args:
        owners: the objects that define the computation (the models, and any scoring option that
            changes the result, as hashable values); compared with ``is`` for objects and ``==`` for
            plain values.
        x: the input tensor the result is a function of.
        compute: the forward pass; its result must not be modified in place by callers.
    """
    if not getattr(_local, "depth", 0):  # sharing_active(), inlined: this runs several times per request
        return compute()
    key = _key(owners, x)
    try:
        entry = _local.entries.get(key)
    except TypeError:  # an unhashable plain option (a tuple holding a list): not shared
        return compute()
    if entry is not None:
        return entry[2]
    value = compute()
    # The entry holds the owners and the input, so that their ids and memory cannot be reused meanwhile.
    _local.entries[key] = (owners, x, value)
    return value


def remember(owners: tuple[object, ...], x: torch.Tensor, value: Any) -> None:
    """Record ``value`` as the result for ``owners`` on ``x``, for a later :func:`memoized` call in this
    request (nothing outside :func:`shared_forward`): a result computed elsewhere, e.g. this request's
    rows of a batched call."""
    if getattr(_local, "depth", 0):
        _local.entries[_key(owners, x)] = (owners, x, value)


def _key(owners: tuple[object, ...], x: torch.Tensor) -> tuple[Any, ...]:
    return _signature(x), tuple([("=", o) if o.__class__ in _PLAIN_TYPES else ("is", id(o)) for o in owners])


#: Option values compared by value (``==``) in a key; any other owner is compared by identity. The exact
#: type is looked up (a subclass, e.g. a named tuple, is compared by identity: never wrongly shared).
_PLAIN_TYPES = frozenset({str, int, float, bool, tuple, type(None)})


def no_grad(fn: F) -> F:
    """``@torch.no_grad()`` that enters no context when gradients are off already (as in a guarded
    request, which turns them off once): the decorator's context costs microseconds per call, several
    times per request."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]

