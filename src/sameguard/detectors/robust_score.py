"""SAME's robust score variants as pure functions (issue 10): masked terms, log terms, complexity
correction and per-term standardisation. No model here; the detectors
(:class:`~sameguard.detectors.same_base.ReconstructionDetector`) call these.

The authors' score (Xie et al., AAAI 2024) is ``alpha * s1 + (1 - alpha) * s2`` on the raw terms.
The variants change what ``alpha`` weighs; every one keeps **larger = more suspicious**:

* ``masked_same_score``: SAME's terms with the MAE's own task at scoring time: ``s1`` is the
  squared error on the hidden patches only, averaged over ``k`` masks; ``s2`` compares the victim
  on ``x`` with the auxiliary model's probabilities averaged over the ``k`` reconstructions.
* ``score_terms``: ``t1 = s1`` or ``log s1`` (``log_terms``), and with a complexity correction
  (Serrà et al., ICLR 2020) ``t1 = log s1 - beta * L(x)``; ``t2 = s2`` or ``log s2``.
* ``standardize_term``: ``z = (t - median) / (1.4826 * MAD)`` with the median and MAD of the
  benign calibration queries' ``t`` (:func:`robust_location_scale`).
* ``fit_complexity_beta``: ``beta`` by least squares of ``log s1`` on ``L(x)`` over benign
  calibration queries only.

Shapes: ``N`` queries, ``K`` classes, ``k`` masks; terms are ``(N,)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LOG_EPS", "MAD_TO_STD", "kl_per_class", "masked_same_score", "score_terms", "log_term",
           "robust_location_scale", "standardize_term", "fit_complexity_beta", "combine_terms"]

#: Added before taking the log of a term: ``log(s + LOG_EPS)``. ``s2`` is exactly 0 when the victim
#: and the auxiliary model agree to the last bit; 1e-8 is far below any benign term measured
#: (``s1`` about 1e-3 to 1e-1, ``s2`` about 1e-4 to 1e-1) and keeps such a query finite.
LOG_EPS = 1e-8
#: ``1.4826 * MAD`` estimates the standard deviation of a normal distribution (1 / Phi^-1(3/4)).
MAD_TO_STD = 1.4826


def kl_per_class(p_victim: torch.Tensor, p_aux: torch.Tensor) -> torch.Tensor:
    """SAME's ``s2 = (1/K) KL(p || q)``, ``(N,)`` float64, ``>= 0``; terms with ``p_k = 0`` count 0.

    Args:
        p_victim: ``(N, K)`` victim probabilities ``p`` on the queries.
        p_aux: ``(N, K)`` auxiliary probabilities ``q`` on the reconstructions (clamped to the
            smallest positive float64 before the log).
    """
    p = p_victim.to(torch.float64)
    log_q = torch.log(p_aux.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
    return (torch.xlogy(p, p) - p * log_q).mean(1).clamp_min(0.0)


def masked_same_score(x: torch.Tensor, x_hats: torch.Tensor, masks: torch.Tensor, p_victim: torch.Tensor,
                      p_aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAME's two terms with ``k`` masked reconstructions per query (the MAE's own task).

    Args:
        x: ``(N, C, H, W)`` queries.
        x_hats: ``(k, N, C, H, W)`` reconstructions, one per mask.
        masks: ``(k, N, 1, H, W)`` (or anything that broadcasts to ``x_hats``) with 1 on hidden
            pixels, 0 on visible ones; every mask hides at least one pixel.
        p_victim: ``(N, K)`` victim probabilities on ``x``.
        p_aux: ``(k, N, K)`` auxiliary probabilities on each reconstruction.

    Returns:
        ``(s1, s2)``, ``(N,)`` float32 each: ``s1 = mean_j [sum_hidden (x_hat_j - x)^2 / #hidden values]``
        (the mean squared error over hidden pixels and channels, averaged over masks) and
        ``s2 = (1/K) KL(p_victim || mean_j p_aux_j)`` (:func:`kl_per_class` of the mixture).
        With ``k = 1`` and a mask of ones these are SAME's ``s1`` and ``s2``.
    """
    masks = masks.to(x_hats.dtype).expand_as(x_hats)
    hidden = masks.flatten(2).sum(2)  # (k, N)
    if bool((hidden <= 0).any()):
        raise ValueError("Every scoring mask must hide at least one pixel; got a mask with none hidden.")
    squared = ((x_hats - x.unsqueeze(0)) ** 2 * masks).flatten(2).sum(2)
    s1 = (squared / hidden).mean(0)
    s2 = kl_per_class(p_victim, p_aux.to(torch.float64).mean(0))
    return s1.to(torch.float32), s2.to(torch.float32)


def log_term(s: torch.Tensor) -> torch.Tensor:
    """``log(s + LOG_EPS)``, ``(N,)`` float64 (a term ``s >= 0`` on a log scale; monotone, so the sign is kept)."""
    return torch.log(s.to(torch.float64) + LOG_EPS)


def score_terms(s1: torch.Tensor, s2: torch.Tensor, *, log_terms: bool = False,
                complexity_bits: torch.Tensor | None = None,
                beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms ``(t1, t2)`` that ``alpha`` weighs, ``(N,)`` float64 each.

    ``t1 = s1``, or ``log(s1 + eps)`` when ``log_terms`` or ``complexity_bits`` is given; with
    ``complexity_bits = L(x)`` (bits per pixel value, :func:`~sameguard.detectors.complexity.compressed_bits_per_pixel`)
    ``t1 = log(s1 + eps) - beta * L(x)`` (Serrà et al., ICLR 2020: a query that reconstructs as
    badly as its complexity predicts is ordinary; ``beta`` from :func:`fit_complexity_beta`).
    ``t2 = s2``, or ``log(s2 + eps)`` when ``log_terms``. ``eps`` is :data:`LOG_EPS`.
    """
    t1 = log_term(s1) if (log_terms or complexity_bits is not None) else s1.to(torch.float64)
    if complexity_bits is not None:
        t1 = t1 - float(beta) * complexity_bits.to(torch.float64)
    t2 = log_term(s2) if log_terms else s2.to(torch.float64)
    return t1, t2


def robust_location_scale(values: torch.Tensor) -> tuple[float, float]:
    """``(median, scale)`` of ``(N,)`` benign values, ``scale = 1.4826 * MAD``.

    Median and MAD rather than mean and standard deviation: reconstruction errors and KL terms are
    heavy-tailed and a calibration set may hold a few odd benign images; the median and MAD move
    by at most a bounded amount for each of them (breakdown point 50 %), so one outlier cannot
    shrink every other query's z-score. When the MAD is 0 (more than half the values equal), the
    standard deviation is used, and 1.0 when that is 0 too, so the scale is always > 0. The
    median of an even count is the mean of the two middle values.
    """
    v = values.detach().to(torch.float64).flatten().cpu()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError("Term statistics need at least one finite benign value; got none or NaN/infinity.")
    center = float(v.quantile(0.5))
    scale = MAD_TO_STD * float((v - center).abs().quantile(0.5))
    if not scale > 0.0:
        scale = float(v.std(correction=0)) if v.numel() > 1 else 0.0
    if not scale > 0.0 or not math.isfinite(scale):
        scale = 1.0
    return center, scale


def standardize_term(t: torch.Tensor, center: float, scale: float) -> torch.Tensor:
    """``(t - center) / scale``, ``(N,)`` float64: a term in benign standard units (0 = a typical benign query)."""
    return (t.to(torch.float64) - center) / scale


def fit_complexity_beta(s1: torch.Tensor, bits: torch.Tensor) -> tuple[float, float]:
    """Least squares ``log(s1 + eps) ~ intercept + beta * L`` over benign calibration queries.

    Args:
        s1: ``(N,)`` reconstruction terms of benign queries.
        bits: ``(N,)`` their complexity ``L(x)`` in bits per pixel value.

    Returns:
        ``(beta, intercept)`` as floats; ``beta = cov(L, log s1) / var(L)``, and 0 when every
        ``L`` is the same (no information about the slope).
    """
    y = log_term(s1).flatten().cpu()
    x = bits.detach().to(torch.float64).flatten().cpu()
    if x.numel() != y.numel() or x.numel() == 0:
        raise ValueError(f"s1 and bits must have the same positive length, got {y.numel()} and {x.numel()}.")
    dx = x - x.mean()
    var = float((dx * dx).sum())
    beta = float((dx * (y - y.mean())).sum()) / var if var > 0 else 0.0
    return beta, float(y.mean()) - beta * float(x.mean())


def combine_terms(t1: torch.Tensor, t2: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * t1 + (1 - alpha) * t2`` as ``(N,)`` float32 (SAME's weighting of the two terms)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    return (alpha * t1.to(torch.float64) + (1.0 - alpha) * t2.to(torch.float64)).to(torch.float32)
