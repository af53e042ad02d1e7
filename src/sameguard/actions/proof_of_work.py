"""Calibrated Proof-of-Work: make suspicious clients pay compute before they get an answer.

Dziedzic, Kaleem, Lu and Papernot, "Increasing the Cost of Model Extraction with Calibrated
Proof of Work", ICLR 2022 (arXiv 2201.09243). Reference implementation:
cleverhans-lab/model-extraction-iclr (``pow/proof_of_work.py``).

This module is the *action*: it prices each query in puzzle bits and leaves the answers as they
are. The puzzle itself is in :mod:`sameguard.actions.puzzle`; issuing, holding and redeeming
challenges over HTTP is the service's business (:mod:`sameguard.service.challenges`). In process,
:class:`~sameguard.guard.Guard` bills the expected work instead of making the caller solve anything.

**Difficulty from the score** (a deviation, documented). The paper prices a user by the
cumulative PATE privacy cost of its queries, calibrated on one legitimate user's trace, and maps
the time ``t = clip(base^diff, 0.1 s, 2948 s)`` to bits through a measured table. SAME gives a
per-query score instead, so here the score is mapped to bits directly, calibrated on benign
scores (the provider's held-out data):

    bits(s) = clip( ceil( b_benign + kappa * (s - a) / d ), b_min, b_max )

with ``a`` the ``quantile`` (default 0.99) of the benign scores, ``d = a - median`` their robust
spread, ``b_benign`` the most a benign query at or below that quantile pays (default 12 bits,
4096 hashes, a few milliseconds), ``kappa`` extra bits per spread above it (default 4, i.e.
16x more work per spread) and ``b_max`` the cap (default 26 bits). By construction at least
``quantile`` of the benign calibration queries cost ``<= b_benign`` bits, and the work grows
exponentially with how far a score lies above benign traffic. A batch of ``N`` queries is one
puzzle whose expected work is the sum of its queries' works, capped at ``b_max`` (the cap is per
request, so a batch never costs more than ``b_max`` bits):
``B = min(ceil(log2(sum_i 2^bits_i)), b_max)`` (:func:`~sameguard.actions.puzzle.batch_bits`).

**After a per-client alarm** (:class:`~sameguard.alarms.ClientAlarms`) the difficulty grows with
the client's evidence ``E`` (log10 of its test martingale, at least ``log10(1/delta)``)::

    bits_alarmed = clip( max( bits(s), b_benign + lambda * E ), b_min, b_max )

with ``lambda = bits_per_decade`` (default 2): every tenfold increase of the evidence against the
client quadruples its work, until the cap.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..api import NotCalibratedError
from ..validation import check_fraction, check_int, check_positive
from .base import Action, ActionOutcome, check_batch
from .puzzle import MAX_BITS, expected_hashes

__all__ = ["ProofOfWork"]


class ProofOfWork(Action):
    """Calibrated Proof-of-Work (Dziedzic et al., ICLR 2022) with the difficulty set by the score.

    Args:
        benign_bits: bits paid by a query whose score is the benign ``quantile`` (default 12).
        bits_per_spread: extra bits per benign spread ``d = quantile - median`` above it
            (default 4).
        max_bits: the cap (default 26; the reference's largest timing, 2948 s, is 32 bits of
            SHA-1 in C).
        min_bits: the floor (default 0).
        quantile: which benign quantile is anchored to ``benign_bits`` (default 0.99).
        bits_per_decade: after a per-client alarm, extra bits per factor 10 of the client's
            evidence (default 2).

    Answers are not changed; the outcome carries each query's ``work_bits`` and the server
    withholds the answer until the puzzle of the batch is solved. Call :meth:`calibrate` with
    benign scores before use.
    """

    name: ClassVar[str] = "pow"

    def __init__(self, *, benign_bits: int = 12, bits_per_spread: float = 4.0, max_bits: int = 26,
                 min_bits: int = 0, quantile: float = 0.99, bits_per_decade: float = 2.0) -> None:
        for label, value in (("benign_bits", benign_bits), ("max_bits", max_bits), ("min_bits", min_bits)):
            check_int(value, label, minimum=0, maximum=MAX_BITS)
        if not min_bits <= benign_bits <= max_bits:
            raise ValueError(f"The bits must satisfy min_bits <= benign_bits <= max_bits, got {min_bits}, "
                             f"{benign_bits} and {max_bits}.")
        check_positive(bits_per_spread, "bits_per_spread")
        if not 0.5 < check_fraction(quantile, "quantile", include_high=False):
            raise ValueError(f"quantile must be in (0.5, 1), e.g. 0.99 for the benign p99; got {quantile!r}.")
        self.benign_bits = int(benign_bits)
        self.bits_per_spread = float(bits_per_spread)
        self.max_bits = int(max_bits)
        self.min_bits = int(min_bits)
        self.quantile = float(quantile)
        self.bits_per_decade = check_positive(bits_per_decade, "bits_per_decade")
        self.anchor_: float | None = None
        self.spread_: float | None = None
        self.calibration_: dict[str, float] | None = None

    def describe(self) -> dict[str, object]:
        return {"action": self.name, "benign_bits": self.benign_bits, "bits_per_spread": self.bits_per_spread,
                "max_bits": self.max_bits, "min_bits": self.min_bits, "quantile": self.quantile,
                "bits_per_decade": self.bits_per_decade,
                "anchor": self.anchor_, "spread": self.spread_}

    def is_calibrated(self) -> bool:
        return self.anchor_ is not None and self.spread_ is not None

    def calibrate(self, benign_scores: torch.Tensor) -> ProofOfWork:
        """Anchor the bits map on benign scores ``(N,)`` (finite, ``N >= 2``); returns ``self``.

        Sets ``anchor_`` (the ``quantile`` of the scores), ``spread_`` (``anchor_ - median``, or a
        tiny positive number when the scores are all equal) and ``calibration_`` (what benign
        traffic pays: bits at the median and at the quantile, mean expected hashes per query).
        """
        s = torch.as_tensor(benign_scores, dtype=torch.float64).flatten()
        if s.numel() < 2:
            raise ValueError(f"Calibration needs at least 2 benign scores, got {s.numel()}.")
        if not torch.isfinite(s).all():
            raise ValueError("Benign calibration scores must be finite; found NaN or infinity.")
        anchor = float(torch.quantile(s, self.quantile, interpolation="higher"))
        spread = anchor - float(torch.quantile(s, 0.5))
        if not spread > 0:
            spread = max(float(s.std()), 1e-12 * max(1.0, abs(anchor)), 1e-300)
        self.anchor_, self.spread_ = anchor, spread
        bits = self.bits_for(s)
        self.calibration_ = {
            "n": float(s.numel()),
            "anchor": anchor,
            "spread": spread,
            "benign_bits_median": float(torch.quantile(bits.double(), 0.5)),
            "benign_bits_quantile": float(torch.quantile(bits.double(), self.quantile)),
            "benign_fraction_within_budget": float((bits <= self.benign_bits).double().mean()),
            "benign_mean_hashes": float(expected_hashes(bits).mean()),
        }
        return self

    def bits_for(self, scores: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 difficulty of each query (the formula in the module docstring).

        NaN and infinite scores pay ``max_bits`` (fail closed).
        """
        if not self.is_calibrated():
            raise NotCalibratedError("This ProofOfWork is not calibrated: call calibrate(benign_scores) first, so "
                                     "that benign traffic pays at most benign_bits.")
        s = torch.as_tensor(scores, dtype=torch.float64).flatten()
        raw = self.benign_bits + self.bits_per_spread * (s - self.anchor_) / self.spread_
        raw = torch.where(torch.isfinite(s), raw, torch.full_like(raw, float(self.max_bits)))
        raw = torch.nan_to_num(raw, nan=float(self.max_bits))  # a finite score with a degenerate spread
        bits = torch.ceil(raw - 1e-9).clamp(self.min_bits, self.max_bits)
        return bits.to(torch.int64)

    def apply(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
              threshold: float) -> ActionOutcome:
        probs, scores, threshold = check_batch(probs, scores, threshold)
        bits = self.bits_for(scores)
        n = probs.shape[0]
        return ActionOutcome(probabilities=probs, refused=torch.zeros(n, dtype=torch.bool), actions=("pow",) * n,
                             work_bits=bits, alpha=torch.zeros(n, dtype=torch.float32))

    def apply_alarmed(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
                      evidence: torch.Tensor) -> ActionOutcome:
        """Queries of an alarmed client: at least ``benign_bits + bits_per_decade * evidence`` bits each
        (``evidence`` ``(N,)`` log10 of the client's martingale), capped at ``max_bits``."""
        outcome = self.apply(x, probs, scores, float("-inf"))
        floor = self.benign_bits + self.bits_per_decade * torch.as_tensor(evidence, dtype=torch.float64).flatten()
        floor = torch.nan_to_num(floor, nan=float(self.max_bits), posinf=float(self.max_bits))
        bits = torch.maximum(outcome.work_bits, torch.ceil(floor - 1e-9).to(torch.int64))
        bits = bits.clamp(self.min_bits, self.max_bits)
        return ActionOutcome(probabilities=outcome.probabilities, refused=outcome.refused, actions=outcome.actions,
                             work_bits=bits, alpha=outcome.alpha)
