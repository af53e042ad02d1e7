"""What the guard records: one :class:`Decision` per query, a :class:`Verdict` per batch, totals per client.

These records are what the audit log stores, what ``sameguard audit`` summarises and what the
benchmark reads back; they hold digests of the queries, never the images themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .api import SameguardError

__all__ = ["Decision", "Verdict", "ClientStats", "QueryRefusedError", "input_digests"]


@dataclass(frozen=True)
class Decision:
    """What the guard decided for one query (one image).

    Attributes:
        time: UNIX seconds when the batch was decided.
        client: who sent it (the API key's name in the service).
        input_sha256: hex SHA-256 of the canonical bytes of the validated image (see
            :func:`input_digests`), never the image itself.
        score: the detector's score (larger = more suspicious); ``None`` without a detector.
        threshold: the threshold ``tau`` in force; ``None`` without one.
        flagged: ``score > threshold`` (NaN and infinite scores count as flagged), or the client is alarmed.
        action: ``"allow"``, ``"reject"``, ``"misinform"`` or ``"pow"``.
        work_bits: proof-of-work difficulty of this query (0 if none).
        request_id: the batch's id (shared by its queries).
        index: position in the batch.
        evidence: log10 of the client's combined test martingale after this query (``None``
            without per-client alarms); the client is alarmed from ``log10(1/delta)`` on.
        alarmed: the client was alarmed when this query was decided (the alarm latches).
    """

    time: float
    client: str
    input_sha256: str
    score: float | None
    threshold: float | None
    flagged: bool
    action: str
    work_bits: int = 0
    request_id: str = ""
    index: int = 0
    evidence: float | None = None
    alarmed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The guard's answer to one batch.

    Attributes:
        probabilities: ``(N, K)`` float32 what may be sent: the action's answers, and for refused
            rows the uniform vector ``1/K`` (never the victim's answer).
        refused: ``(N,)`` bool.
        decisions: one :class:`Decision` per query.
        work_bits: difficulty of the batch's proof-of-work puzzle (``ceil(log2(sum 2^bits_i))``),
            0 when no proof-of-work is due.
        request_id: the batch's id.
    """

    probabilities: torch.Tensor
    refused: torch.Tensor
    decisions: tuple[Decision, ...]
    work_bits: int
    request_id: str

    def labels(self) -> torch.Tensor:
        """``(N,)`` int64 top-1 labels; ``-1`` where refused."""
        labels = self.probabilities.argmax(dim=1)
        return torch.where(self.refused, torch.full_like(labels, -1), labels)

    @property
    def scores(self) -> torch.Tensor:
        """``(N,)`` float32 scores (NaN without a detector)."""
        return torch.tensor([float("nan") if d.score is None else d.score for d in self.decisions],
                            dtype=torch.float32)

    @property
    def alarmed(self) -> bool:
        """Whether the client was alarmed by the end of this batch."""
        return bool(self.decisions) and self.decisions[-1].alarmed


class QueryRefusedError(SameguardError, RuntimeError):
    """Some queries of a batch were refused (``Guard(refusal="raise")``).

    Attributes:
        verdict: the batch's :class:`Verdict` (answers of the rows that were not refused, the
            ``refused`` mask and the decisions).
    """

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        n = int(verdict.refused.sum())
        why = ("the client is alarmed as an extraction attacker" if verdict.alarmed
               else "their scores are above the calibrated threshold")
        super().__init__(f"{n} of {len(verdict.refused)} queries were refused by the guard's policy ({why}).")


@dataclass
class ClientStats:
    """Running totals for one client.

    Attributes:
        queries: images decided (including refused ones).
        flagged: of them, flagged by the detector.
        actions: count per action label.
        work_bits_paid: sum over batches of the batch puzzle's bits.
        expected_hashes: sum over batches of ``2^bits``, the proof-of-work bill in SHA-256 evaluations.
        score_sum: sum of the scores (for the mean).
    """

    queries: int = 0
    flagged: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    work_bits_paid: int = 0
    expected_hashes: float = 0.0
    score_sum: float = 0.0

    @property
    def mean_score(self) -> float | None:
        return None if self.queries == 0 else self.score_sum / self.queries

    def add(self, verdict: Verdict) -> None:
        """Add one batch's decisions to the totals."""
        self.queries += len(verdict.decisions)
        for d in verdict.decisions:
            self.flagged += int(d.flagged)
            self.actions[d.action] = self.actions.get(d.action, 0) + 1
            self.score_sum += 0.0 if d.score is None else d.score
        if verdict.work_bits:
            self.work_bits_paid += verdict.work_bits
            self.expected_hashes += float(2 ** verdict.work_bits)

    def copy(self) -> ClientStats:
        return ClientStats(self.queries, self.flagged, dict(self.actions), self.work_bits_paid,
                           self.expected_hashes, self.score_sum)


def input_digests(x: torch.Tensor) -> list[str]:
    """Hex SHA-256 of each image of a validated batch ``(N, C, H, W)`` float32.

    The canonical bytes are ``b"float32le:C:H:W:"`` followed by the image's values as
    little-endian float32 in C order, so the digest identifies the exact tensor the model saw.
    """
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    header = ("float32le:" + ":".join(str(s) for s in arr.shape[1:]) + ":").encode("ascii")
    return [hashlib.sha256(header + arr[i].tobytes()).hexdigest() for i in range(arr.shape[0])]
