"""The per-request martingale step of :class:`~sameguard.evidence.MixtureMartingale`, compiled with Numba
(imported on first use).

One call advances the ``(S, G)`` log statistics of ``S`` sources (detectors and the stream test) by
``N`` p-values each and returns, after each p-value, each source's log mixture and the log of their
average (the monitor's combined evidence). The formulas are :meth:`MixtureMartingale.update`'s, in
float64, one p-value after another; done from Python they are a few dozen NumPy calls (or loops on
Python floats) per request, which cost more than the arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["MODE_CODES", "advance"]

#: :data:`~sameguard.evidence.martingale.MODES` -> the kernel's integer code.
MODE_CODES = {"ville": 0, "cusum": 1, "shiryaev-roberts": 2}


@njit(cache=True, nogil=True)
def _logsumexp(values: np.ndarray) -> float:
    """``log Σ exp(v)``: ``-inf`` when all are ``-inf``, ``+inf`` when one is (no NaN expected)."""
    top = -np.inf
    for v in values:
        if v > top:
            top = v
    if not math.isfinite(top):
        return top
    total = 0.0
    for v in values:
        total += math.exp(v - top)
    return top + math.log(total)


@njit(cache=True, nogil=True)
def advance(states: np.ndarray, p_values: np.ndarray, log_eps: np.ndarray, eps_minus_1: np.ndarray, mode: int,
            p_floor: float, new: np.ndarray, log_paths: np.ndarray, combined: np.ndarray) -> None:
    """Advance ``S`` mixture statistics by ``N`` p-values each, in order.

    Args:
        states: ``(S, G)`` float64 log statistic per source and ``ε`` (not modified).
        p_values: ``(S, N)`` float64 p-values in [0, 1], oldest first, clipped to ``[p_floor, 1]``.
        log_eps, eps_minus_1: ``(G,)`` float64 ``log ε`` and ``ε - 1`` of the grid.
        mode: 0 ``"ville"`` (``log M_n = log M_{n-1} + b_n``), 1 ``"cusum"`` (``b_n + max(0, log R_{n-1})``),
            2 ``"shiryaev-roberts"`` (``b_n + log(1 + R_{n-1})``), with ``b_n = log ε + (ε - 1) log p_n``.
        new: ``(S, G)`` output, the states after the last p-value.
        log_paths: ``(S, N)`` output, each source's log mixture (``logsumexp - log G``) after each p-value.
        combined: ``(N,)`` output, the log of the sources' average mixture after each p-value.
    """
    sources, size = states.shape
    log_size, log_sources = math.log(size), math.log(sources)
    new[:, :] = states
    for n in range(p_values.shape[1]):
        for s in range(sources):
            log_p = math.log(min(max(p_values[s, n], p_floor), 1.0))
            for g in range(size):
                bet = log_eps[g] + eps_minus_1[g] * log_p
                v = new[s, g]
                if mode == 0:
                    v = v + bet
                elif mode == 1:
                    v = bet + max(v, 0.0)
                else:  # log(1 + e^v), stable; v = -inf (R = 0) gives 0
                    v = bet + (max(v, 0.0) + math.log1p(math.exp(-abs(v))))
                new[s, g] = v
            log_paths[s, n] = _logsumexp(new[s]) - log_size
        combined[n] = _logsumexp(log_paths[:, n]) - log_sources
