"""The protected model: victim + detector + policy, with a :class:`Decision` recorded for every query.

:class:`Guard` is the one object the in-process benchmark and the HTTP service share. For each
batch ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` sent by a client it

1. validates the batch (:func:`~sameguard.validation.check_images`) and the client's budget;
2. asks the victim for its probabilities ``(N, K)`` and the detector for its scores ``(N,)``
   (larger = more suspicious, e.g. SAME, Xie et al., AAAI 2024);
3. lets the :class:`~sameguard.actions.Policy` decide per query: answer, refuse, mislead
   (Adaptive Misinformation, Kariyappa & Qureshi, CVPR 2020) or ask for proof-of-work
   (Calibrated PoW, Dziedzic et al., ICLR 2022);
4. records one :class:`Decision` per query (client, SHA-256 of the input, score, threshold,
   action, time) and hands the batch's decisions to ``sink`` (the service's audit log) *before*
   anything is answered: if the sink fails, nothing is answered and nothing is counted.

It implements the :class:`~sameguard.prediction_api.PredictionAPI` protocol (``image_shape``,
``num_classes``, ``output``, ``query``, ``queries_used``, ``remaining``), so every attack in
:mod:`sameguard.attacks` runs against it unchanged::

    guard = Guard(victim, detector, Policy("misinformation"))
    result = KnockoffNets(proxy).run(guard, budget=2000, test_data=test)
    guard.stats(result.client)          # queries, flagged, actions taken, proof-of-work paid

Through :meth:`Guard.query`, a refused query is answered with the uniform vector ``1/K`` (no
information about the model; a random label when ``output="labels"``), or raises
:class:`QueryRefusedError` with ``refusal="raise"``. Proof-of-work is *accounted* in process
(the expected ``2^bits`` hashes per batch are added to the client's bill, see :meth:`stats`) and
enforced by the HTTP service, which withholds the answer until the puzzle is solved.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from . import __version__
from .actions import Action, Monitor, Policy, ProofOfWork, batch_bits
from .api import SameguardError
from .artifacts import state_dict_sha256
from .prediction_api import BudgetExceededError, score_for_client
from .validation import check_images

logger = logging.getLogger(__name__)

__all__ = ["Guard", "Decision", "Verdict", "ClientStats", "QueryRefusedError", "input_digests", "ANONYMOUS"]

ANONYMOUS = "anonymous"
Output = Literal["probabilities", "labels"]


class QueryRefusedError(SameguardError, RuntimeError):
    """Some queries of a batch were refused (``Guard(refusal="raise")``).

    Attributes:
        verdict: the batch's :class:`Verdict` (answers of the rows that were not refused, the
            ``refused`` mask and the decisions).
    """

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        n = int(verdict.refused.sum())
        super().__init__(f"{n} of {len(verdict.refused)} queries were refused by the guard's policy "
                         "(their scores are above the calibrated threshold).")


@dataclass(frozen=True)
class Decision:
    """What the guard decided for one query (one image).

    Attributes:
        time: UNIX seconds when the batch was decided.
        client: who sent it (the API key's name in the service).
        input_sha256: hex SHA-256 of the canonical bytes of the validated image (see
            :func:`input_digests`), never the image itself.
        score: the detector's score (larger = more suspicious); ``None`` without a detector.
        threshold: the threshold ``tau`` in force; ``None`` without a detector.
        flagged: ``score > threshold`` (NaN scores count as flagged).
        action: ``"allow"``, ``"reject"``, ``"misinform"`` or ``"pow"``.
        work_bits: proof-of-work difficulty of this query (0 if none).
        request_id: the batch's id (shared by its queries).
        index: position in the batch.
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


def input_digests(x: torch.Tensor) -> list[str]:
    """Hex SHA-256 of each image of a validated batch ``(N, C, H, W)`` float32.

    The canonical bytes are ``b"float32le:C:H:W:"`` followed by the image's values as
    little-endian float32 in C order, so the digest identifies the exact tensor the model saw.
    """
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    header = ("float32le:" + ":".join(str(s) for s in arr.shape[1:]) + ":").encode("ascii")
    return [hashlib.sha256(header + arr[i].tobytes()).hexdigest() for i in range(arr.shape[0])]


def _module_fingerprint(obj: object) -> str | None:
    """SHA-256 over the state dicts of ``obj``'s fitted network attributes (names ending in ``_``)."""
    digest = hashlib.sha256(type(obj).__name__.encode())
    found = False
    for name in sorted(vars(obj)) if hasattr(obj, "__dict__") else []:
        value = getattr(obj, name)
        if name.endswith("_") and isinstance(value, torch.nn.Module):
            digest.update(name.encode())
            digest.update(state_dict_sha256(value.state_dict()).encode())
            found = True
    return digest.hexdigest() if found else None


class Guard:
    """Victim + detector + policy: the protected model (a :class:`~sameguard.prediction_api.PredictionAPI`).

    Args:
        victim: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``, e.g. a
            :class:`~sameguard.victim.Victim` (``image_shape`` / ``num_classes`` are read from it).
        detector: a fitted detector with ``score(x) -> (N,)`` and usually ``threshold_``; ``None``
            serves the bare victim (no scoring; decisions are still recorded, with ``score=None``).
        policy: a :class:`~sameguard.actions.Policy`, an :class:`~sameguard.actions.Action` or a
            policy name (``"monitor"``, ``"reject"``, ``"misinformation"``, ``"pow"``).
        output: ``"probabilities"`` (default) or ``"labels"`` (top-1 only) for :meth:`query`.
        budget: per-client budget in images for :meth:`query` / :meth:`protect`; ``None``: none.
        refusal: what :meth:`query` does with refused rows: ``"uniform"`` (default; answer ``1/K``,
            or a random label) or ``"raise"`` (:class:`QueryRefusedError`).
        sink: called with the tuple of a batch's decisions before the batch is answered (e.g. the
            audit log's ``append``); if it raises, the batch is not answered or counted.
        keep_decisions: how many recent decisions to keep in memory (``0``: none; default 100000).
        seed: seeds the random labels given to refused queries in label mode.
        image_shape, num_classes: override what is read from ``victim``.
    """

    def __init__(
        self,
        victim: Callable[[torch.Tensor], torch.Tensor],
        detector: object | None = None,
        policy: Policy | Action | str | None = "monitor",
        *,
        output: Output = "probabilities",
        budget: int | None = None,
        refusal: Literal["uniform", "raise"] = "uniform",
        sink: Callable[[tuple[Decision, ...]], None] | None = None,
        keep_decisions: int = 100_000,
        seed: int = 0,
        image_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not callable(victim):
            raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
        shape = image_shape if image_shape is not None else getattr(victim, "image_shape", None)
        if shape is None or len(tuple(shape)) != 3 or any(int(s) < 1 for s in shape):
            raise ValueError("The guard needs the victim's input shape (C, H, W): pass image_shape=... or a victim "
                             f"with an image_shape attribute; got {shape!r}.")
        k = num_classes if num_classes is not None else getattr(victim, "num_classes", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"The guard needs the number of classes (at least 2), got {k!r}.")
        if policy is None:
            policy = Policy(Monitor())
        elif isinstance(policy, (str, Action)):
            policy = Policy(policy)
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a Policy, an Action or a policy name, got {type(policy).__name__}.")
        if detector is None and not isinstance(policy.action, Monitor):
            raise ValueError(f"The {policy.name!r} policy needs a detector to score queries; pass a fitted detector "
                             "or use policy='monitor'.")
        if detector is not None and not callable(getattr(detector, "score", None)):
            raise ValueError(f"detector must have a score(x) method, got {type(detector).__name__}.")
        if output not in ("probabilities", "labels"):
            raise ValueError(f"output must be 'probabilities' or 'labels', got {output!r}.")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be a non-negative int or None, got {budget!r}.")
        if refusal not in ("uniform", "raise"):
            raise ValueError(f"refusal must be 'uniform' or 'raise', got {refusal!r}.")
        if isinstance(keep_decisions, bool) or not isinstance(keep_decisions, int) or keep_decisions < 0:
            raise ValueError(f"keep_decisions must be a non-negative int, got {keep_decisions!r}.")
        if sink is not None and not callable(sink):
            raise ValueError("sink must be callable with a tuple of decisions, or None.")
        self.victim = victim
        self.detector = detector
        self.policy = policy
        self.output: Output = output
        self.budget = budget
        self.refusal = refusal
        self.sink = sink
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.num_classes = int(k)
        self.arch = getattr(victim, "arch", None)
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}
        self._stats: dict[str, ClientStats] = {}
        self._decisions: deque[Decision] = deque(maxlen=keep_decisions)
        self._generator = torch.Generator().manual_seed(seed)
        self._versions = self._compute_versions()

    # -- descriptions ------------------------------------------------------------------------
    def _compute_versions(self) -> dict[str, Any]:
        victim_sha = getattr(self.victim, "weights_sha256", None)
        detector = self.detector
        return {
            "sameguard": __version__,
            "victim_sha256": victim_sha if isinstance(victim_sha, str) else None,
            "detector": None if detector is None else type(detector).__name__,
            "detector_sha256": None if detector is None else _module_fingerprint(detector),
            "policy": self.policy.name,
        }

    @property
    def versions(self) -> dict[str, Any]:
        """Model versions recorded with every decision: package, victim and detector weights, policy."""
        return dict(self._versions)

    @property
    def threshold(self) -> float | None:
        """The threshold ``tau`` in force (policy's, else detector's), ``None`` if unset."""
        if self.detector is None:
            return None
        return self.policy.threshold if self.policy.threshold is not None else getattr(self.detector, "threshold_", None)

    def describe(self) -> dict[str, Any]:
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes, "output": self.output,
                "threshold": self.threshold, "policy": self.policy.describe(), "versions": self.versions}

    def __repr__(self) -> str:
        return (f"Guard(image_shape={self.image_shape}, num_classes={self.num_classes}, output={self.output!r}, "
                f"detector={type(self.detector).__name__ if self.detector is not None else None}, "
                f"policy={self.policy.name!r}, threshold={self.threshold!r})")

    # -- calibration -------------------------------------------------------------------------
    def calibrate(self, benign_x: torch.Tensor, target_fpr: float | None = None) -> Guard:
        """Calibrate on benign images ``(N, C, H, W)`` in ``[-1, 1]`` the detector did not train on.

        With ``target_fpr`` the detector's threshold is set first (``detector.calibrate``); a
        :class:`~sameguard.actions.ProofOfWork` action (or escalation) is then calibrated on the
        benign scores. Returns ``self``.
        """
        if self.detector is None:
            raise ValueError("This guard has no detector to calibrate.")
        x = check_images(benign_x, self.image_shape, name="benign_x")
        if target_fpr is not None:
            self.detector.calibrate(x, target_fpr)  # type: ignore[attr-defined]
        actions = [self.policy.action] + ([self.policy.escalate[1]] if self.policy.escalate else [])
        pows = [a for a in actions if isinstance(a, ProofOfWork)]
        if pows:
            with torch.no_grad():
                scores = self._score(x, ANONYMOUS)
            for action in pows:
                action.calibrate(scores)
                logger.info("Proof-of-work calibrated on %d benign queries: %s", len(x), action.calibration_)
        self._versions = self._compute_versions()
        return self

    # -- accounting --------------------------------------------------------------------------
    @staticmethod
    def _check_client(client: object) -> str:
        if not isinstance(client, str) or not client:
            raise ValueError(f"client must be a non-empty string naming the caller, got {client!r}.")
        return client

    def queries_used(self, client: str) -> int:
        """Images decided so far for ``client`` (answered, misinformed, refused or priced)."""
        with self._lock:
            return self._used.get(self._check_client(client), 0)

    def remaining(self, client: str) -> int | None:
        """Images ``client`` may still send; ``None`` without a budget."""
        if self.budget is None:
            return None
        return max(self.budget - self.queries_used(client), 0)

    def stats(self, client: str) -> ClientStats:
        """A copy of ``client``'s running totals."""
        with self._lock:
            s = self._stats.get(self._check_client(client), ClientStats())
            return ClientStats(s.queries, s.flagged, dict(s.actions), s.work_bits_paid, s.expected_hashes, s.score_sum)

    def clients(self) -> list[str]:
        with self._lock:
            return list(self._stats)

    def decisions(self, client: str | None = None) -> list[Decision]:
        """The recent decisions kept in memory (all clients, or one), oldest first."""
        with self._lock:
            items = list(self._decisions)
        return items if client is None else [d for d in items if d.client == client]

    def scores(self, client: str) -> torch.Tensor:
        """``(n,)`` float32 scores of ``client``'s kept decisions, in query order."""
        return torch.tensor([float("nan") if d.score is None else d.score for d in self.decisions(client)],
                            dtype=torch.float32)

    def reset(self, client: str) -> None:
        """Forget ``client``'s count and totals (its budget starts afresh)."""
        client = self._check_client(client)
        with self._lock:
            self._used.pop(client, None)
            self._stats.pop(client, None)
        reset = getattr(self.detector, "reset", None)
        if callable(reset):
            reset(client)

    # -- deciding ----------------------------------------------------------------------------
    def _score(self, x: torch.Tensor, client: str) -> torch.Tensor:
        return score_for_client(self.detector, x, client)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.victim(x)
        if not isinstance(probs, torch.Tensor) or probs.shape != (x.shape[0], self.num_classes):
            raise ValueError(f"The victim must return probabilities of shape ({x.shape[0]}, {self.num_classes}), "
                             f"got {tuple(getattr(probs, 'shape', ()))}.")
        return probs.detach().to("cpu", torch.float32)

    def protect(self, x: torch.Tensor, client: str = ANONYMOUS, *, request_id: str | None = None) -> Verdict:
        """Decide a batch ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` for ``client``; see the module docstring.

        Raises:
            ValueError: an invalid batch or client.
            BudgetExceededError: ``used + N > budget``; nothing is decided or counted.
            Exception: whatever the victim, the detector or the sink raised; nothing is counted.
        """
        client = self._check_client(client)
        x = check_images(x, self.image_shape)
        n = int(x.shape[0])
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            used = self._used.get(client, 0)
            if self.budget is not None and used + n > self.budget:
                raise BudgetExceededError(client, self.budget, used, n)
            self._used[client] = used + n
        try:
            verdict = self._decide(x, client, request_id)
            if self.sink is not None:
                self.sink(verdict.decisions)
        except BaseException:
            with self._lock:
                self._used[client] -= n
                if self._used[client] <= 0:
                    del self._used[client]
            raise
        with self._lock:
            self._decisions.extend(verdict.decisions)
            stats = self._stats.setdefault(client, ClientStats())
            stats.queries += n
            for d in verdict.decisions:
                stats.flagged += int(d.flagged)
                stats.actions[d.action] = stats.actions.get(d.action, 0) + 1
                stats.score_sum += 0.0 if d.score is None else d.score
            if verdict.work_bits:
                stats.work_bits_paid += verdict.work_bits
                stats.expected_hashes += float(2 ** verdict.work_bits)
        return verdict

    def _decide(self, x: torch.Tensor, client: str, request_id: str) -> Verdict:
        with torch.no_grad():
            probs = self._probabilities(x)
            if self.detector is None:
                scores, tau = None, None
                outcome = Monitor().apply(x, probs, torch.zeros(len(x)), 0.0)
            else:
                scores = self._score(x, client)
                tau = self.policy.resolve_threshold(getattr(self.detector, "threshold_", None))
                outcome = self.policy.decide(x, probs, scores, tau)
        answers = outcome.probabilities.to(torch.float32)
        if bool(outcome.refused.any()):  # never let a refused row carry the victim's answer
            answers = answers.clone()
            answers[outcome.refused] = 1.0 / self.num_classes
        work = batch_bits(outcome.work_bits) if bool((outcome.work_bits > 0).any()) or "pow" in outcome.actions else 0
        now = time.time()
        digests = input_digests(x)
        decisions = []
        for i in range(len(x)):
            score = None if scores is None else float(scores[i])
            flagged = False if score is None else bool(math.isnan(score) or score > tau)  # NaN counts as flagged
            decisions.append(Decision(time=now, client=client, input_sha256=digests[i], score=score, threshold=tau,
                                      flagged=flagged, action=outcome.actions[i], work_bits=int(outcome.work_bits[i]),
                                      request_id=request_id, index=i))
        return Verdict(probabilities=answers, refused=outcome.refused.clone(), decisions=tuple(decisions),
                       work_bits=int(work), request_id=request_id)

    # -- the PredictionAPI -------------------------------------------------------------------
    def query(self, x: torch.Tensor, client: str = ANONYMOUS) -> torch.Tensor:
        """Answer ``x`` for ``client`` (:class:`~sameguard.prediction_api.PredictionAPI`).

        Returns:
            ``(N, K)`` float32 probabilities, or ``(N,)`` int64 labels with ``output="labels"``.
            Refused rows hold ``1/K`` (a random label), unless ``refusal="raise"``.

        Raises:
            QueryRefusedError: ``refusal="raise"`` and some rows were refused.
            BudgetExceededError, ValueError: as :meth:`protect`.
        """
        verdict = self.protect(x, client)
        refused = verdict.refused
        if bool(refused.any()) and self.refusal == "raise":
            raise QueryRefusedError(verdict)
        if self.output == "probabilities":
            return verdict.probabilities
        labels = verdict.probabilities.argmax(dim=1)
        if bool(refused.any()):
            with self._lock:
                random = torch.randint(0, self.num_classes, (int(refused.sum()),), generator=self._generator)
            labels[refused] = random
        return labels

    __call__ = query
