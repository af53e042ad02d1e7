"""Maximum softmax probability (MSP) baseline (Hendrycks & Gimpel, ICLR 2017).

A query is suspicious when the victim is not confident about it::

    score(x) = -max_k p_k(x)        with p = f_V(x) the victim's output probabilities

so scores lie in ``[-1, -1/K]`` and larger = more suspicious. The victim is used as a black
box (its probabilities only); no extra data, no query history, no training. This is also the
out-of-distribution signal of Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020), there
computed on an outlier-exposure-trained model (see :mod:`sameguard.detectors.outlier_exposure`).

Paper: https://arxiv.org/abs/1610.02136 (ICLR 2017).
Reference implementation: https://github.com/hendrycks/error-detection.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..api import Detector
from ..forward_memo import no_grad
from ..training import predict_in_batches
from ..validation import check_images, check_int
from ._common import ParamsMixin, ProbabilityFn, victim_image_shape, victim_probabilities
from .victim_output import VictimOutputArtifact

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

__all__ = ["MSPDetector", "msp_score"]


def msp_score(probabilities: torch.Tensor) -> torch.Tensor:
    """``-max_k p_k`` per row (pure function).

    Args:
        probabilities: ``(N, K)`` rows on the probability simplex.

    Returns:
        ``(N,)`` float32 in ``[-1, -1/K]``; larger = less confident = more suspicious.
    """
    p = torch.as_tensor(probabilities)
    if p.dim() != 2 or p.shape[1] < 1:
        raise ValueError(f"probabilities must have shape (N, K), got {tuple(p.shape)}.")
    if p.shape[0] == 1 and not p.requires_grad and p.device.type == "cpu":
        # A guarded single-image request: the same value on Python floats, without a reduction's dispatch
        # (the largest float32 probability, exact; NaN anywhere gives NaN, as torch.max does)
        values = p[0].to(torch.float32).tolist()
        top = math.nan if any(math.isnan(v) for v in values) else max(values)
        return torch.from_numpy(np.array([-top], dtype=np.float32))
    return -p.to(torch.float32).max(dim=1).values


class MSPDetector(VictimOutputArtifact, ParamsMixin, Detector):
    """Score = negative maximum softmax probability of the victim. Black box, stateless.

    Needs: nothing beyond the victim's output probabilities (``NEEDS`` is empty).

    Args:
        batch_size: queries per call to the victim while scoring.

    Fitted state: ``victim_`` (the probability function) and ``image_shape_`` (from the
    victim when it has one; otherwise any ``(N, C, H, W)`` is accepted).
    """

    NEEDS: frozenset[str] = frozenset()
    KIND: ClassVar[str] = "msp-detector"

    def __init__(self, *, batch_size: int = 512) -> None:
        self.batch_size = batch_size
        check_int(batch_size, "batch_size")
        self.victim_: ProbabilityFn | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None

    def is_fitted(self) -> bool:
        return self.victim_ is not None

    def fit(self, victim: ProbabilityFn) -> Self:
        """Attach the black-box ``victim``: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``."""
        if not callable(victim):
            raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
        self.victim_ = victim
        self.image_shape_ = victim_image_shape(victim)
        sha = getattr(victim, "weights_sha256", None)
        self.victim_sha256_ = sha if isinstance(sha, str) else None
        self.threshold_ = None
        self.calibration_fpr_ = None
        return self

    def score_victim_outputs(self, victim: Any, x: torch.Tensor, probabilities: torch.Tensor) -> list[float] | None:
        """:meth:`score` of ``x`` from ``probabilities``, the ``(N, K)`` outputs ``victim(x)`` a caller
        already has (the guard), when ``victim`` is the very victim this detector reads; else ``None``.
        The same values as :meth:`score` (float32, exact), as a list of ``N`` Python floats: the per-client
        alarms read them so, without a tensor's dispatch for a single-image request."""
        if self.victim_ is None or victim is not self.victim_:
            return None
        return msp_score(probabilities).tolist()

    @no_grad
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 scores ``-max_k p_k`` of ``x`` ``(N, C, H, W)`` in ``[-1, 1]``; larger = more suspicious."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return predict_in_batches(lambda b: msp_score(victim_probabilities(self.victim_, b)), x, self.batch_size)
