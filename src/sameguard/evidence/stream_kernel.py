"""The stream test's per-query loop, compiled with Numba (imported on first use: ``import numba`` is slow).

One call appends ``k`` queries to a client's bag, in order, and returns their p-values: for each new
point the distance to every earlier point of the bag, the nearest-neighbour distances lowered, and
the smoothed conformal p-value of :func:`sameguard.evidence.stream_p_value`. Done from Python, that is
a dozen NumPy and PyTorch calls per query, each of which costs microseconds right after a network's
forward pass has flushed the caches; compiled, it is one call and one pass over the bag.

The distance between two points is computed by :func:`_distance` only, in float64 from the float32
features: their differences (exact in float64), the squares (or absolute values) summed in the
order the compiler's vectorised loop takes (``reassoc``: the lanes of the vector unit), then the
square root. The order depends only on the vector length ``D`` and the machine, never on where the
two rows lie in memory or which of them comes first (``(a - b)^2 = (b - a)^2`` exactly), so every
pair has one distance. Each is within about ``D·2^-53`` (relative) of the exact distance of the two
feature vectors, so distances that differ are told apart, as they would be exactly: in float32,
rounding would merge near-equal distances into ties (many, for JBDA-like streams whose steps all
have one length) and blur their order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["average_pool", "distance", "extend_bag"]

#: Floating-point freedoms for the sums: reassociation (vectorised reductions) and fused multiply-add;
#: no assumption that values are finite (``+inf`` marks a lone point's distance).
_SUM_FLAGS = {"reassoc", "contract", "nsz"}


@njit(cache=True, nogil=True, fastmath=_SUM_FLAGS)
def _sum_squares(row: np.ndarray, x: np.ndarray) -> float:
    acc = 0.0
    for t in range(x.shape[0]):
        e = np.float64(row[t]) - np.float64(x[t])
        acc += e * e
    return acc


@njit(cache=True, nogil=True, fastmath=_SUM_FLAGS)
def _sum_abs(row: np.ndarray, x: np.ndarray) -> float:
    acc = 0.0
    for t in range(x.shape[0]):
        acc += abs(np.float64(row[t]) - np.float64(x[t]))
    return acc


@njit(cache=True, nogil=True)
def _distance(row: np.ndarray, x: np.ndarray, l2: bool) -> float:
    if l2:
        return math.sqrt(_sum_squares(row, x))
    return _sum_abs(row, x)


@njit(cache=True, nogil=True)
def distance(a: np.ndarray, b: np.ndarray, l2: bool) -> float:
    """The L2 (``l2``) or L1 distance of two ``(D,)`` float32 vectors, as the stream test computes it."""
    return _distance(a, b, l2)


@njit(cache=True, nogil=True)
def average_pool(x: np.ndarray, out_h: int, out_w: int, out: np.ndarray) -> None:
    """Adaptive average pooling of ``(N, C, H, W)`` float32 images to ``out_h x out_w``, flattened.

    Output cell ``(i, j)`` averages rows ``floor(i H / out_h)`` to ``ceil((i + 1) H / out_h)`` (exclusive)
    and the columns likewise, as :func:`torch.nn.functional.adaptive_avg_pool2d` cuts them; the mean is
    taken in float64 and rounded to float32.

    Args:
        x: ``(N, C, H, W)`` float32, C-contiguous.
        out: ``(N, C * out_h * out_w)`` float32 output, channel-major as ``reshape(N, -1)`` orders it.
    """
    n, channels, height, width = x.shape
    for b in range(n):
        k = 0
        for c in range(channels):
            for i in range(out_h):
                top, bottom = (i * height) // out_h, -((-(i + 1) * height) // out_h)
                for j in range(out_w):
                    left, right = (j * width) // out_w, -((-(j + 1) * width) // out_w)
                    total = 0.0
                    for r in range(top, bottom):
                        for q in range(left, right):
                            total += x[b, c, r, q]
                    out[b, k] = np.float32(total / ((bottom - top) * (right - left)))
                    k += 1


@njit(cache=True, nogil=True)
def extend_bag(rows: np.ndarray, n0: int, new: np.ndarray, d: np.ndarray, theta: np.ndarray, l2: bool,
               p: np.ndarray) -> bool:
    """Append ``new`` to a bag of ``n0`` points, one query at a time, writing their p-values to ``p``;
    ``False``, with nothing written, when a value of ``new`` is NaN or infinite.

    Args:
        rows: ``(capacity, D)`` float32, C-contiguous; rows ``[0, n0)`` are the bag, rows
            ``[n0, n0 + k)`` are overwritten with ``new``.
        n0: points in the bag before the call.
        new: ``(k, D)`` float32 C-contiguous points, oldest first.
        d: ``(>= n0 + k,)`` float64; ``d[:n0]`` holds the bag's nearest-neighbour distances, lowered in
            place, and ``d[n0:n0 + k]`` receives the new points' (``+inf`` for the first point of a bag).
        theta: ``(k,)`` float64 smoothing uniforms in (0, 1].
        l2: L2 distance if true, else L1.
        p: ``(k,)`` float64 output, ``(#{i <= n: d_i < d_n} + θ #{i <= n: d_i = d_n}) / (n + 1)``.
    """
    for value in new.ravel():
        if not math.isfinite(value):
            return False
    for j in range(new.shape[0]):
        n = n0 + j
        x = new[j]
        best = np.inf
        for i in range(n):
            dist = _distance(rows[i], x, l2)
            if dist < d[i]:
                d[i] = dist
            if dist < best:
                best = dist
        d[n] = best
        rows[n] = x
        closer = 0
        ties = 0
        for i in range(n + 1):
            if d[i] < best:
                closer += 1
            elif d[i] == best:
                ties += 1
        p[j] = (closer + theta[j] * ties) / (n + 1)
    return True
