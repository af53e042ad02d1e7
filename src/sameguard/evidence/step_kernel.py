"""One compiled call per request for the monitor: p-values, the stream test's step and the martingales.

:meth:`EvidenceMonitor._advance <sameguard.evidence.EvidenceMonitor>` chains three compiled kernels
(:func:`~sameguard.evidence.monitor_kernel.p_values`, :func:`~sameguard.evidence.stream_kernel.extend_bag`
after :func:`~sameguard.evidence.stream_kernel.average_pool`, :func:`~sameguard.evidence.martingale_kernel.advance`);
between them, Python wraps and checks arrays, and each of those small calls costs several microseconds
right after a network's forward pass. When the request's queries fit in the room left in the client's
bag (the usual case: one query, appended in place), :func:`step` runs the same three kernels, in the same
order on the same arrays, in one call, so the results are the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .martingale_kernel import advance
from .monitor_kernel import p_values
from .stream_kernel import average_pool, extend_bag

__all__ = ["step"]


@njit(cache=True, nogil=True)
def step(scores: np.ndarray, labels: np.ndarray, base: np.uint64, first: int, thetas: np.ndarray, p: np.ndarray,
         refs: np.ndarray, starts: np.ndarray, stops: np.ndarray, margins: np.ndarray, smoothed: np.ndarray,
         stream: bool, images: np.ndarray, pool: bool, out_h: int, out_w: int, features: np.ndarray,
         rows: np.ndarray, n0: int, d: np.ndarray, l2: bool,
         states: np.ndarray, log_eps: np.ndarray, eps_minus_1: np.ndarray, mode: int, p_floor: float,
         new: np.ndarray, log_paths: np.ndarray, combined: np.ndarray) -> bool:
    """The monitor's request in one call; ``False``, with the bag untouched, when an image is not finite.

    Args:
        scores ... smoothed: :func:`~sameguard.evidence.monitor_kernel.p_values`'s arguments (``thetas``
            and ``p`` ``(S, N)`` outputs; the stream test's row last).
        stream: whether the monitor has a stream test (else the next arguments up to ``l2`` are unused).
        images: ``(N, C, H, W)`` float32 C-contiguous queries.
        pool: average-pool ``images`` to ``out_h x out_w`` into ``features`` first; else ``features`` is
            already ``images`` flattened, ``(N, C*H*W)``.
        features: ``(N, D)`` float32 C-contiguous features (written when ``pool``).
        rows, n0, d, l2: :func:`~sameguard.evidence.stream_kernel.extend_bag`'s bag (room for ``N`` more
            rows), its size, its ``(n0 + N,)`` distances and the metric; its p-values go to ``p[-1]``.
        states ... combined: :func:`~sameguard.evidence.martingale_kernel.advance`'s arguments, its
            p-values being ``p``.
    """
    p_values(scores, labels, base, first, thetas, p, refs, starts, stops, margins, smoothed)
    if stream:
        if pool:
            average_pool(images, out_h, out_w, features)
        last = thetas.shape[0] - 1
        if not extend_bag(rows, n0, features, d, thetas[last], l2, p[last]):
            return False
    advance(states, p, log_eps, eps_minus_1, mode, p_floor, new, log_paths, combined)
    return True
