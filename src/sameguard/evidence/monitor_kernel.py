"""The monitor's per-request p-values, compiled with Numba (imported on first use).

One call gives every source's smoothing uniforms (SplitMix64 of a per-client counter, as
:meth:`EvidenceMonitor._theta_array <sameguard.evidence.EvidenceMonitor>` computes them with NumPy)
and every detector's conformal p-value against its calibration reference for the query's class (the
formula of :func:`~sameguard.evidence.conformal.conformal_p_values_array`, its margin for
calibration-conditional p-values included): the same float64 operations, so the same bits.
The references of all detectors lie in one array, cut by :func:`pack_references`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit

from .conformal import ConformalCalibrator

__all__ = ["p_values", "pack_references"]


def pack_references(calibrators: Sequence[ConformalCalibrator], num_classes: int) -> tuple[np.ndarray, ...]:
    """The fitted references of ``calibrators``, as :func:`p_values` reads them.

    Returns:
        ``(refs, starts, stops, margins, smoothed)``: ``refs`` all references concatenated (float64);
        ``starts``, ``stops`` ``(D, K + 1)`` int64 bounds in ``refs`` of detector ``j``'s reference for
        class ``c`` (column ``K``: the pooled one, also used by a detector fitted without labels and by
        a class with too few scores); ``margins`` ``(D, K + 1)`` float64 (0 for marginal p-values);
        ``smoothed`` ``(D,)`` bool, whether the smoothing uniform is used.
    """
    parts: list[np.ndarray] = []
    detectors = len(calibrators)
    starts = np.zeros((detectors, num_classes + 1), dtype=np.int64)
    stops = np.zeros((detectors, num_classes + 1), dtype=np.int64)
    margins = np.zeros((detectors, num_classes + 1), dtype=np.float64)
    smoothed = np.zeros(detectors, dtype=np.bool_)
    offset = 0
    for j, calibrator in enumerate(calibrators):
        arrays = calibrator._reference_arrays()  # per class (when class-conditional), then the pooled one
        for c in range(num_classes + 1):
            ref = arrays[c] if calibrator.class_conditional_ and c < num_classes else arrays[-1]
            parts.append(ref)
            starts[j, c], stops[j, c] = offset, offset + ref.shape[0]
            margins[j, c] = calibrator.margin(ref.shape[0])
            offset += ref.shape[0]
        smoothed[j] = calibrator.smoothed and calibrator.conditional is None
    refs = np.concatenate(parts).astype(np.float64) if parts else np.empty(0)
    return refs, starts, stops, margins, smoothed


@njit(cache=True, nogil=True)
def _splitmix64(z: np.uint64) -> np.uint64:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _count_below(ref: np.ndarray, s: float, inclusive: bool) -> int:
    """``#{r < s}`` (or ``#{r <= s}`` when ``inclusive``) in the ascending ``ref``: a binary search."""
    lo, hi = 0, ref.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if ref[mid] < s or (inclusive and ref[mid] == s):
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def p_values(scores: np.ndarray, labels: np.ndarray, base: np.uint64, first: int, thetas: np.ndarray,
             p: np.ndarray, refs: np.ndarray, starts: np.ndarray, stops: np.ndarray, margins: np.ndarray,
             smoothed: np.ndarray) -> None:
    """Smoothing uniforms of all ``S`` sources and p-values of the ``D`` detectors for ``N`` queries.

    Args:
        scores: ``(D, N)`` float64, detectors in name order (NaN counts as ``+inf``: most suspicious).
        labels: ``(N,)`` int64 predicted labels in ``[0, K)``, checked.
        base: the client's counter offset (SHA-256 of the seed and the client id, its first 8 bytes).
        first: the client's index of the first query (its queries before this batch).
        thetas: ``(S, N)`` output, ``S >= D`` (the stream test's row last): ``1 - u`` with ``u`` the top
            53 bits of SplitMix64 of ``base + (first + n) S + j``.
        p: ``(S, N)`` output; rows ``[0, D)`` receive the detectors' p-values.
        refs, starts, stops, margins, smoothed: :func:`pack_references`.
    """
    sources, n_queries = thetas.shape
    pooled = starts.shape[1] - 1
    for n in range(n_queries):
        counter = base + np.uint64(first + n) * np.uint64(sources)
        for j in range(sources):
            u = _splitmix64(counter + np.uint64(j)) >> np.uint64(11)
            thetas[j, n] = 1.0 - float(u) * 2.0 ** -53
    for j in range(scores.shape[0]):
        for n in range(n_queries):
            c = labels[n] if labels[n] < pooled else pooled
            ref = refs[starts[j, c]:stops[j, c]]
            m = ref.shape[0]
            s = scores[j, n]
            if math.isnan(s):
                s = np.inf
            left = _count_below(ref, s, False)
            if smoothed[j]:
                right = _count_below(ref, s, True)
                value = (float(m - right) + thetas[j, n] * (1.0 + float(right - left))) / (m + 1.0)
            else:
                value = (1.0 + float(m - left)) / (m + 1.0)
            p[j, n] = min(value + margins[j, c], 1.0)
