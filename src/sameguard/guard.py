"""The protected model: victim + detector + policy, the one prediction path of the package.

:class:`Guard` is the single :class:`~sameguard.prediction_api.PredictionAPI` implementation in
process: the bare victim (no detector), the victim behind a detector that only records scores
(``policy="monitor"``), and the victim behind a detector and an action, used alike by the
attacks, the benchmark and the HTTP service. For each batch ``x`` ``(N, C, H, W)`` in ``[-1, 1]``
sent by a client it

1. validates the batch (:func:`~sameguard.validation.check_images`) and charges the client's
   budget (:class:`~sameguard.prediction_api.QueryLedger`: a refused or failed batch is not counted);
2. asks the victim for its probabilities ``(N, K)`` and the detector for its scores ``(N,)``
   (larger = more suspicious, e.g. SAME, Xie et al., AAAI 2024); a per-client detector
   (:class:`~sameguard.api.StatefulDetector`, e.g. PRADA) sees each client's queries as one stream;
3. with per-client alarms (:class:`~sameguard.alarms.ClientAlarms`), turns the scores into
   evidence against the client; once the client is alarmed, every later query of it gets the
   policy's action, whatever its own score;
4. lets the :class:`~sameguard.actions.Policy` decide per query: answer, refuse, mislead
   (Adaptive Misinformation, Kariyappa & Qureshi, CVPR 2020) or ask for proof-of-work
   (Calibrated PoW, Dziedzic et al., ICLR 2022);
5. returns a :class:`~sameguard.decisions.Verdict` with one
   :class:`~sameguard.decisions.Decision` per query (client, SHA-256 of the input, score,
   threshold, action, evidence, time). The service writes these to its audit log.

Example::

    guard = Guard(victim, detector, "misinformation")
    result = KnockoffNets(proxy).run(guard, budget=2000, test_data=test)
    guard.stats(result.client)          # queries, flagged, actions taken, proof-of-work paid
    guard.scores(result.client)         # (2000,) scores in query order

Through :meth:`Guard.query`, a refused query is answered with the uniform vector ``1/K`` (no
information about the model; a random label when ``output="labels"``), or raises
:class:`~sameguard.decisions.QueryRefusedError` with ``refusal="raise"``. Proof-of-work is
*accounted* in process (the expected ``2^bits`` hashes per batch are added to the client's bill,
see :meth:`Guard.stats`) and enforced by the HTTP service, which withholds the answer until the
puzzle is solved.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import __version__
from .actions import Action, Monitor, Policy, ProofOfWork, batch_bits
from .actions.base import ActionOutcome
from .api import NotCalibratedError, StatefulDetector, flag_scores
from .artifacts import fitted_state_sha256
from .decisions import ClientStats, Decision, QueryRefusedError, Verdict, input_digests
from .forward_memo import shared_forward
from .prediction_api import ANONYMOUS, Output, QueryLedger, check_output, victim_geometry, victim_probabilities
from .validation import check_choice, check_images, check_int, check_name

if TYPE_CHECKING:
    from .alarms import AlarmUpdate, ClientAlarms

logger = logging.getLogger(__name__)

__all__ = [
    "ANONYMOUS",
    "ClientStats",
    "Decision",
    "Guard",
    "QueryRefusedError",
    "Verdict",
    "detector_scores",
    "input_digests",
]


def detector_scores(detector: Any, x: torch.Tensor, client: str, stateful: bool | None = None) -> torch.Tensor:
    """``(N,)`` float32 CPU scores of ``client``'s next queries ``x``.

    A :class:`~sameguard.api.StatefulDetector` (PRADA, VarDetect) scores ``x`` as the next part
    of ``client``'s stream (``observe``); any other detector scores the batch on its own.
    ``stateful``: whether ``detector`` is one, when the caller already knows (the check of a
    runtime protocol costs tens of microseconds, the guard makes it once).
    """
    if stateful is None:
        stateful = isinstance(detector, StatefulDetector)
    with torch.no_grad():
        raw = detector.observe(x, client) if stateful else detector.score(x)
    scores = torch.as_tensor(raw).detach().to("cpu", torch.float32).flatten()
    if scores.numel() != x.shape[0]:
        raise ValueError(f"The detector returned {scores.numel()} scores for {x.shape[0]} queries.")
    return scores


def _as_policy(policy: Policy | Action | str | None) -> Policy:
    if policy is None:
        return Policy(Monitor())
    if isinstance(policy, (str, Action)):
        return Policy(policy)
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a Policy, an Action or a policy name, got {type(policy).__name__}.")
    return policy


@dataclass
class _History:
    """What the guard keeps per client for experiments: scores, flags and (optionally) inputs."""

    scores: list[torch.Tensor] = field(default_factory=list)
    flags: list[torch.Tensor | None] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)


class Guard:
    """Victim + detector + policy: the protected model (a :class:`~sameguard.prediction_api.PredictionAPI`).

    Args:
        victim: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``, e.g. a
            :class:`~sameguard.victim.Victim` (``image_shape`` / ``num_classes`` are read from it).
        detector: a fitted detector with ``score(x) -> (N,)`` and usually ``threshold_``; ``None``
            serves the bare victim (no scoring; decisions are still recorded, with ``score=None``).
        policy: a :class:`~sameguard.actions.Policy`, an :class:`~sameguard.actions.Action` or a
            policy name (``"monitor"``, ``"reject"``, ``"misinformation"``, ``"pow"``). With
            ``"monitor"`` nothing is acted on, and a detector without threshold is allowed.
        alarms: per-client alarms (:class:`~sameguard.alarms.ClientAlarms`); once a client is
            alarmed, each of its later queries gets the policy's action. ``None``: per query only.
        output: ``"probabilities"`` (default) or ``"labels"`` (top-1 only) for :meth:`query`.
        budget: per-client budget in images; ``None``: none.
        refusal: what :meth:`query` does with refused rows: ``"uniform"`` (default; answer ``1/K``,
            or a random label) or ``"raise"`` (:class:`QueryRefusedError`).
        history: keep every client's scores and flags (5 bytes per query) for :meth:`scores` and
            :meth:`flags`; turn off for a long-running service.
        record_inputs: also keep every answered image per client (:meth:`inputs`), e.g. to score
            one attack's queries with several detectors without running it again.
        keep_decisions: how many recent decisions to keep in memory (``0``: none).
        seed: seeds the random labels given to refused queries in label mode.
        image_shape, num_classes: override what is read from ``victim``.
    """

    def __init__(
        self,
        victim: Callable[[torch.Tensor], torch.Tensor],
        detector: Any | None = None,
        policy: Policy | Action | str | None = "monitor",
        *,
        alarms: ClientAlarms | None = None,
        output: Output = "probabilities",
        budget: int | None = None,
        refusal: Literal["uniform", "raise"] = "uniform",
        history: bool = True,
        record_inputs: bool = False,
        keep_decisions: int = 100_000,
        seed: int = 0,
        image_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.image_shape, self.num_classes = victim_geometry(victim, image_shape, num_classes)
        self.policy = _as_policy(policy)
        if detector is None and (alarms is not None or not isinstance(self.policy.action, Monitor)):
            raise ValueError(f"The {self.policy.name!r} policy and per-client alarms need a detector to score "
                             "queries; pass a fitted detector or use policy='monitor' without alarms.")
        if detector is not None and not callable(getattr(detector, "score", None)):
            raise ValueError(f"detector must have a score(x) method, got {type(detector).__name__}.")
        self.victim = victim
        self.detector = detector
        self._stateful = isinstance(detector, StatefulDetector)
        self.alarms = alarms
        self.output: Output = check_output(output)
        self.refusal = check_choice(refusal, "refusal", ("uniform", "raise"))
        self.history = bool(history)
        self.record_inputs = bool(record_inputs)
        self.arch = getattr(victim, "arch", None)
        self._ledger = QueryLedger(budget)
        self._lock = threading.Lock()
        self._stats: dict[str, ClientStats] = {}
        self._history: dict[str, _History] = {}
        self._decisions: deque[Decision] = deque(maxlen=check_int(keep_decisions, "keep_decisions", minimum=0))
        self._generator = torch.Generator().manual_seed(seed)
        self._versions = self._compute_versions()

    # -- descriptions ------------------------------------------------------------------------
    @property
    def budget(self) -> int | None:
        return self._ledger.budget

    def _compute_versions(self) -> dict[str, Any]:
        victim_sha = getattr(self.victim, "weights_sha256", None)
        detector = self.detector
        return {
            "sameguard": __version__,
            "victim_sha256": victim_sha if isinstance(victim_sha, str) else None,
            "detector": None if detector is None else type(detector).__name__,
            "detector_sha256": None if detector is None else fitted_state_sha256(detector),
            "policy": self.policy_name,
        }

    @property
    def policy_name(self) -> str:
        """The policy's name, or ``"off"`` for a guard without a detector (nothing is scored: the bare victim),
        as the service's ``--policy off`` reports it in ``/healthz``, ``/v1/model`` and the audit rows."""
        return "off" if self.detector is None else self.policy.name

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
        d = {"image_shape": list(self.image_shape), "num_classes": self.num_classes, "output": self.output,
             "threshold": self.threshold, "policy": self.policy.describe(), "versions": self.versions}
        if self.alarms is not None:
            d["alarms"] = self.alarms.describe()
        return d

    def __repr__(self) -> str:
        return (f"Guard(image_shape={self.image_shape}, num_classes={self.num_classes}, output={self.output!r}, "
                f"detector={type(self.detector).__name__ if self.detector is not None else None}, "
                f"policy={self.policy_name!r}, threshold={self.threshold!r}, budget={self.budget})")

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
            self.detector.calibrate(x, target_fpr)
        actions = [self.policy.action] + ([self.policy.escalate[1]] if self.policy.escalate else [])
        pows = [a for a in actions if isinstance(a, ProofOfWork)]
        if pows:
            with torch.no_grad():
                scores = torch.as_tensor(self.detector.score(x)).detach().cpu().float()
            for action in pows:
                action.calibrate(scores)
                logger.info("Proof-of-work calibrated on %d benign queries: %s", len(x), action.calibration_)
        self._versions = self._compute_versions()
        return self

    # -- accounting --------------------------------------------------------------------------
    def queries_used(self, client: str) -> int:
        """Images decided so far for ``client`` (answered, misinformed, refused or priced)."""
        return self._ledger.used(client)

    def remaining(self, client: str) -> int | None:
        """Images ``client`` may still send; ``None`` without a budget."""
        return self._ledger.remaining(client)

    @property
    def total_queries(self) -> int:
        """Images decided for all clients together."""
        return self._ledger.total

    def clients(self) -> list[str]:
        """Clients with at least one decided query, in order of first query."""
        with self._lock:
            return list(self._stats)

    def stats(self, client: str) -> ClientStats:
        """A copy of ``client``'s running totals."""
        with self._lock:
            return self._stats.get(check_name(client, "client"), ClientStats()).copy()

    def decisions(self, client: str | None = None) -> list[Decision]:
        """The recent decisions kept in memory (all clients, or one), oldest first."""
        with self._lock:
            items = list(self._decisions)
        return items if client is None else [d for d in items if d.client == client]

    def _client_history(self, client: str, what: str) -> _History:
        enabled = self.record_inputs if what == "inputs" else self.history
        if not enabled:
            flag = "record_inputs=True" if what == "inputs" else "history=True"
            raise RuntimeError(f"This guard does not keep its clients' {what}: construct it with {flag}.")
        with self._lock:
            h = self._history.get(check_name(client, "client"), _History())
            return _History(list(h.scores), list(h.flags), list(h.inputs))

    def scores(self, client: str) -> torch.Tensor:
        """``(n,)`` float32 detector scores of every image decided for ``client``, in query order."""
        parts = self._client_history(client, "scores").scores
        return torch.cat(parts) if parts else torch.empty(0)

    def flags(self, client: str) -> torch.Tensor:
        """``(n,)`` bool: which of ``client``'s queries were flagged (score above the threshold).

        Raises:
            NotCalibratedError: some of the client's queries were scored while there was no threshold.
        """
        parts = self._client_history(client, "flags").flags
        if any(p is None for p in parts):
            raise NotCalibratedError(
                f"Some queries of client {client!r} were scored while the detector had no threshold, so "
                "they have no flags: calibrate the detector before the queries are sent.")
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)  # type: ignore[arg-type]

    def inputs(self, client: str) -> torch.Tensor:
        """``(n, C, H, W)`` every image decided for ``client``, in query order (``record_inputs``)."""
        parts = self._client_history(client, "inputs").inputs
        return torch.cat(parts) if parts else torch.empty(0, *self.image_shape)

    def reset(self, client: str) -> None:
        """Forget ``client``: its count (its budget starts afresh), totals, history and alarm state."""
        client = check_name(client, "client")
        self._ledger.forget(client)
        with self._lock:
            self._stats.pop(client, None)
            self._history.pop(client, None)
        if isinstance(self.detector, StatefulDetector):
            self.detector.reset(client)
        if self.alarms is not None:
            self.alarms.forget(client)

    # -- deciding ----------------------------------------------------------------------------
    def protect(self, x: torch.Tensor, client: str = ANONYMOUS, *, request_id: str | None = None) -> Verdict:
        """Decide a batch ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` for ``client``; see the module docstring.

        Raises:
            ValueError: an invalid batch or client.
            BudgetExceededError: ``used + N > budget``; nothing is decided or counted.
            Exception: whatever the victim or the detector raised; nothing is counted.
        """
        client = check_name(client, "client")
        x = check_images(x, self.image_shape)
        with self._ledger.charge(client, int(x.shape[0])):
            verdict, scores = self._decide(x, client, request_id or uuid.uuid4().hex)
        self._record(client, x, verdict, scores)
        return verdict

    def _record(self, client: str, x: torch.Tensor, verdict: Verdict, scores: torch.Tensor | None) -> None:
        tau = verdict.decisions[0].threshold
        with self._lock:
            self._decisions.extend(verdict.decisions)
            self._stats.setdefault(client, ClientStats()).add(verdict)
            if not (self.history or self.record_inputs):
                return
            h = self._history.setdefault(client, _History())
            if self.history and scores is not None:
                h.scores.append(scores)
                h.flags.append(None if tau is None else torch.tensor([d.flagged for d in verdict.decisions]))
            if self.record_inputs:
                h.inputs.append(x.detach().to("cpu", copy=True))

    def _threshold_in_force(self) -> float | None:
        detector_tau = getattr(self.detector, "threshold_", None)
        if isinstance(self.policy.action, Monitor) and self.policy.threshold is None and detector_tau is None:
            return None  # monitoring an uncalibrated detector: scores only
        return self.policy.resolve_threshold(detector_tau)

    def _decide(self, x: torch.Tensor, client: str, request_id: str) -> tuple[Verdict, torch.Tensor | None]:
        # One request: the victim, the detector and the alarms' scorers share forward passes on x.
        with torch.no_grad(), shared_forward():
            probs = victim_probabilities(self.victim, x, self.num_classes)
            if self.detector is None:
                return self._verdict(x, client, request_id, probs, None, None, ActionOutcome.passthrough(probs)), None
            scores = detector_scores(self.detector, x, client, self._stateful)
            tau = self._threshold_in_force()
            alarm = None if self.alarms is None else self.alarms.update(client, x, probs, {id(self.detector): scores})
            outcome = self._act(x, probs, scores, tau, alarm)
        return self._verdict(x, client, request_id, probs, scores, tau, outcome, alarm), scores

    def _act(self, x: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor, tau: float | None,
             alarm: AlarmUpdate | None) -> ActionOutcome:
        """The policy's outcome per query; queries sent while the client is alarmed all get the action."""
        if tau is None:
            return ActionOutcome.passthrough(probs)
        outcome = self.policy.decide(x, probs, scores, tau)
        if alarm is None or not alarm.client.alarmed:  # latched: alarmed now iff some query of the batch is
            return outcome
        rows = torch.nonzero(alarm.alarmed).flatten()
        sub = self.policy.action.apply_alarmed(x[rows], probs[rows], scores[rows].double(), alarm.evidence[rows])
        return outcome.replace_rows(rows, sub)

    def _verdict(self, x: torch.Tensor, client: str, request_id: str, probs: torch.Tensor,
                 scores: torch.Tensor | None, tau: float | None, outcome: ActionOutcome,
                 alarm: AlarmUpdate | None = None) -> Verdict:
        answers = outcome.probabilities.to(torch.float32)
        if bool(outcome.refused.any()):  # never let a refused row carry the victim's answer
            answers = answers.clone()
            answers[outcome.refused] = 1.0 / self.num_classes
        work = batch_bits(outcome.work_bits, cap=self.policy.max_work_bits()) \
            if bool((outcome.work_bits > 0).any()) or "pow" in outcome.actions else 0
        now, digests = time.time(), input_digests(x)
        over = None if scores is None or tau is None else flag_scores(scores, tau)  # NaN/inf: flagged
        decisions = []
        score_list = None if scores is None else scores.tolist()
        evidence = None if alarm is None else alarm.evidence.tolist()
        alarmed_list = [False] * len(x) if alarm is None else alarm.alarmed.tolist()
        for i in range(len(x)):
            alarmed = alarmed_list[i]
            flagged = alarmed or (over is not None and bool(over[i]))
            decisions.append(Decision(
                time=now, client=client, input_sha256=digests[i], score=None if score_list is None else score_list[i],
                threshold=tau, flagged=flagged, action=outcome.actions[i], work_bits=int(outcome.work_bits[i]),
                request_id=request_id, index=i, evidence=None if evidence is None else evidence[i], alarmed=alarmed))
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
