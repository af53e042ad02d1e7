"""The evidence's compiled parts (Numba), imported on first use, and their warm-up.

``import numba`` takes a few tenths of a second and each kernel is compiled on its first call (a few
seconds; then cached on disk next to the source, or in Numba's user cache when that is not
writable), so nothing here runs when ``sameguard`` is imported. A service calls :func:`warm_up` at
start-up, so that its first request does not wait for the compiler.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
import types

import numpy as np

__all__ = ["kernels", "warm_up"]

logger = logging.getLogger(__name__)


@functools.cache
def kernels(name: str) -> types.ModuleType:
    """The compiled module ``name`` of this package (``"stream_kernel"``, ``"monitor_kernel"``,
    ``"martingale_kernel"``), imported once."""
    return importlib.import_module(f"{__package__}.{name}")


@functools.cache
def warm_up() -> float:
    """Compile (or load from the disk cache) every kernel with the argument types the monitor uses;
    once per process. Returns the seconds it took."""
    start = time.perf_counter()
    stream = kernels("stream_kernel")
    for l2 in (True, False):
        stream.extend_bag(np.zeros((2, 3), np.float32), 0, np.zeros((2, 3), np.float32), np.zeros(2), np.ones(2), l2,
                          np.zeros(2))
    kernels("monitor_kernel").p_values(np.zeros((1, 1)), np.zeros(1, np.int64), np.uint64(0), 0, np.zeros((2, 1)),
                                       np.zeros((2, 1)), np.zeros(1), np.zeros((1, 2), np.int64),
                                       np.ones((1, 2), np.int64), np.zeros((1, 2)), np.ones(1, np.bool_))
    kernels("martingale_kernel").advance(np.zeros((1, 2)), np.full((1, 1), 0.5), np.zeros(2), np.zeros(2), 0, 1e-12,
                                         np.zeros((1, 2)), np.zeros((1, 1)), np.zeros(1))
    seconds = time.perf_counter() - start
    logger.info("Evidence kernels ready in %.2f s.", seconds)
    return seconds
