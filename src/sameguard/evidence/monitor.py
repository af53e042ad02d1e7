"""Per-client alarms with a guaranteed false-alarm rate: p-values -> martingales -> latched alarms.

For each client, each detector's score of each query becomes a conformal p-value against benign
calibration of the query's predicted class (:class:`ConformalCalibrator`), the p-values drive that
detector's mixture test martingale (:class:`MixtureMartingale`), an optional stream test
(:class:`StreamExchangeabilityTest`) drives one more, and the client's evidence is the **average**
of these martingales, a test martingale whatever the dependence between detectors (an average of
test martingales is one; a product would need independence). The client is alarmed at the first
query where the evidence reaches ``1/δ``; by Ville's inequality a benign client whose p-values are
independent and (super-)uniform is ever alarmed with probability at most ``δ`` (mode ``"ville"``;
with ``"cusum"`` / ``"shiryaev-roberts"`` the guarantee is instead an average of at least ``1/δ``
queries before a false alarm). See ``reference/sequential.md`` for the assumptions and caveats.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..validation import check_fraction, check_int, check_name
from .compiled import kernels
from .conformal import ConformalCalibrator
from .martingale import MixtureMartingale, log_mean_exp
from .state import ClientState
from .store import InMemoryStore, StateStore
from .stream import StreamExchangeabilityTest, StreamState

logger = logging.getLogger(__name__)

__all__ = ["STREAM_NAME", "ClientEvidence", "EvidenceMonitor"]

#: The name under which the stream test's martingale appears in ``ClientEvidence.per_detector``.
STREAM_NAME = "stream"


@dataclasses.dataclass(frozen=True)
class ClientEvidence:
    """A client's evidence after a batch of its queries (or now, from :meth:`EvidenceMonitor.evidence`).

    Attributes:
        client: the client id.
        queries: number of the client's queries seen so far.
        log_evidence: natural log of the combined martingale (average over detectors) now.
        per_detector: detector name (and ``"stream"``) -> natural log of its own mixture martingale.
        alarmed: the evidence reached ``1/δ`` at some query since the last cleared alarm (latched).
        alarm_query: 1-based index in the client's stream of that first query, or ``None``.
        alarm_time: unix time in seconds when the alarm was raised, or ``None``.
        log_evidence_path: ``(N,)`` float64 log evidence after each query of the batch (empty when
            returned by :meth:`EvidenceMonitor.evidence`).
    """

    client: str
    queries: int
    log_evidence: float
    per_detector: dict[str, float]
    alarmed: bool
    alarm_query: int | None
    alarm_time: float | None
    log_evidence_path: torch.Tensor


class EvidenceMonitor:
    """Per-client martingale evidence over several calibrated detectors (and a stream test).

    Args:
        calibrators: detector name -> fitted :class:`ConformalCalibrator` of that detector's scores;
            may be empty only when ``stream`` is given.
        delta: bound on a benign client's probability of ever being alarmed, in (0, 1); the
            threshold is ``log(1/δ)`` on the log evidence (:attr:`threshold_log`).
        martingale: the betting scheme shared by all detectors (default ``MixtureMartingale()``,
            mode ``"ville"``).
        store: where per-client states live (default a new :class:`InMemoryStore`); every change
            goes through its atomic ``update``.
        stream: the per-client exchangeability test (needs the images in :meth:`update`), or ``None``.
        seed: with the client id and each query's index in the client's stream, seeds that
            query's smoothing uniforms (SHA-256 of the three), so the same queries give the same
            evidence however they are split into batches.
    """

    def __init__(self, calibrators: Mapping[str, ConformalCalibrator], *, delta: float = 1e-3,
                 martingale: MixtureMartingale | None = None, store: StateStore | None = None,
                 stream: StreamExchangeabilityTest | None = None, seed: int = 0) -> None:
        if not isinstance(calibrators, Mapping):
            raise ValueError(f"calibrators must be a mapping name -> ConformalCalibrator, got "
                             f"{type(calibrators).__name__}.")
        for name, calibrator in calibrators.items():
            check_name(name, "each detector name")
            if not isinstance(calibrator, ConformalCalibrator):
                raise ValueError(f"calibrators[{name!r}] must be a ConformalCalibrator, got "
                                 f"{type(calibrator).__name__}.")
            calibrator.fallback_classes()  # raises NotFittedError when not fitted
        if not calibrators and stream is None:
            raise ValueError("EvidenceMonitor needs at least one calibrated detector or a stream test.")
        if stream is not None and STREAM_NAME in calibrators:
            raise ValueError(f"The detector name {STREAM_NAME!r} is reserved for the stream test.")
        if stream is not None and not isinstance(stream, StreamExchangeabilityTest):
            raise ValueError(f"stream must be a StreamExchangeabilityTest or None, got {type(stream).__name__}.")
        if martingale is not None and not isinstance(martingale, MixtureMartingale):
            raise ValueError(f"martingale must be a MixtureMartingale or None, got {type(martingale).__name__}.")
        self.calibrators = dict(sorted(calibrators.items()))
        self.delta = check_fraction(delta, "delta", include_low=False, include_high=False)
        self.threshold_log = math.log(1.0 / self.delta)
        self.martingale = martingale if martingale is not None else MixtureMartingale()
        self.store: StateStore = store if store is not None else InMemoryStore()
        self.stream = stream
        self.seed = check_int(seed, "seed", minimum=0)
        self._source_names = list(self.calibrators) + ([STREAM_NAME] if stream is not None else [])
        self._num_classes = min((c.num_classes_ for c in self.calibrators.values()), default=None)
        #: Use the tensor path (:meth:`_advance_reference`) instead of the NumPy one; for tests.
        self._reference = False

    # ------------------------------------------------------------------------------ public API
    def update(self, client: str, scores: Mapping[str, torch.Tensor], labels: torch.Tensor,
               x: torch.Tensor | None = None) -> ClientEvidence:
        """Add a batch of one client's queries, in order, and return the client's evidence.

        Args:
            client: the client id (API key), a non-empty string.
            scores: detector name -> ``(N,)`` scores of the batch, larger = more suspicious, one entry
                per calibrator exactly (NaN scores count as maximally suspicious).
            labels: ``(N,)`` integer predicted labels of the victim, for class-conditional p-values.
            x: ``(N, C, H, W)`` the query images, required when the monitor has a stream test.

        Returns:
            The client's :class:`ClientEvidence` after the batch, with the path over the batch.
        """
        client = check_name(client, "client")
        n = self._check_batch(scores, labels, x)
        label_array = labels.detach().to("cpu", torch.int64).numpy()
        self.check_labels(label_array)
        if self._reference:  # the tensor path the fast one is tested against
            return self._commit(client, n, lambda old: self._advance_reference(
                client, old, scores, torch.from_numpy(label_array), x))
        if n == 1:  # a single-image request: Python floats
            rows = np.array([[float(scores[name])] for name in self.calibrators], dtype=np.float64)
        else:  # scores, detectors in name order
            rows = np.empty((len(self.calibrators), n), dtype=np.float64)
            for j, name in enumerate(self.calibrators):
                rows[j] = scores[name].detach().to("cpu", torch.float64).numpy()
        return self.update_rows(client, rows, label_array, x)

    def update_rows(self, client: str, rows: np.ndarray, labels: np.ndarray, x: torch.Tensor | None) -> ClientEvidence:
        """:meth:`update` for a caller that has checked its inputs (:class:`~sameguard.alarms.ClientAlarms`).

        Args:
            client: the client id, checked.
            rows: ``(D, N)`` float64 scores, one row per detector in name order (:attr:`calibrators`).
            labels: ``(N,)`` int64 predicted labels, checked (:meth:`check_labels`).
            x: ``(N, C, H, W)`` the images when the monitor has a stream test (else ignored).
        """
        return self._commit(client, labels.shape[0], lambda old: self._advance(client, old, rows, labels, x))

    def _commit(self, client: str, n: int, step: Callable[[ClientState], tuple[ClientState, ClientEvidence]]
                ) -> ClientEvidence:
        """Run ``step`` on the client's state (a new one for an unknown client) in the store's atomic update;
        log a new alarm; return the evidence of the committed run."""
        result: list[ClientEvidence] = []

        def advance(old: ClientState | None) -> ClientState:
            new, evidence = step(old if old is not None else self._new_state())
            result[:] = [evidence]  # with a retrying store the last run is the committed one
            return new

        self.store.update(client, advance)
        evidence = result[0]
        first = evidence.queries - n  # queries before this batch
        if evidence.alarm_query is not None and evidence.alarm_query > first:
            logger.warning("Client %r alarmed at its query %d: log evidence %.2f reached log(1/delta) = %.2f.",
                           client, evidence.alarm_query,
                           float(evidence.log_evidence_path[evidence.alarm_query - first - 1]), self.threshold_log)
        return evidence

    def evidence(self, client: str) -> ClientEvidence | None:
        """The client's current evidence, or ``None`` for an unknown client."""
        state = self.store.get(check_name(client, "client"))
        if state is None:
            return None
        per = self._per_detector_now(state)
        return self._evidence(client, state, per, torch.empty(0, dtype=torch.float64))

    def forget(self, client: str) -> bool:
        """Drop everything about a client (its next query starts afresh); ``True`` if it was known."""
        return self.store.delete(check_name(client, "client"))

    def clear_alarm(self, client: str) -> bool:
        """Operator action: unlatch the client's alarm and restart its martingales at 1.

        The query count and the stream test's bag are kept (the stream p-values stay valid, and the
        new martingale starts a new test with the same ``δ`` guarantee). ``True`` if the client was known.
        """
        client = check_name(client, "client")

        def reset(old: ClientState | None) -> ClientState:
            if old is None:
                raise _UnknownClient
            fresh = self._new_state()
            return dataclasses.replace(fresh, queries=old.queries, stream=old.stream)

        try:
            self.store.update(client, reset)
        except _UnknownClient:
            return False
        logger.info("Alarm of client %r cleared; its martingales restart at 1.", client)
        return True

    def clients(self) -> list[str]:
        """Ids of the clients with a state."""
        return self.store.keys()

    # -------------------------------------------------------------------------------- internals
    def _new_state(self) -> ClientState:
        start = self.martingale.initial_state()
        return ClientState(
            queries=0, martingales={name: start.clone() for name in self.calibrators},
            stream_martingale=None if self.stream is None else start.clone(),
            stream=None if self.stream is None else self.stream.initial_state())

    def _thetas(self, client: str, first: int, n: int) -> torch.Tensor:
        """``(S, n)`` smoothing uniforms in (0, 1] for the ``n`` queries from index ``first`` on, one row
        per source (detectors in name order, then the stream test).

        Each uniform is SplitMix64 of a counter (query index, source) offset by SHA-256(seed, client),
        so the evidence of a stream does not depend on how it was split into batches, and a batch
        costs a few vectorised integer operations.
        """
        return torch.from_numpy(self._theta_array(client, first, n))

    def _theta_array(self, client: str, first: int, n: int) -> np.ndarray:
        """:meth:`_thetas` as a ``(S, n)`` float64 NumPy array."""
        sources = len(self.calibrators) + (self.stream is not None)
        base = np.uint64(_client_base(self.seed, client))
        q = np.arange(first, first + n, dtype=np.uint64)[None, :] * np.uint64(sources)
        with np.errstate(over="ignore"):
            counter = base + q + np.arange(sources, dtype=np.uint64)[:, None]
        u = (_splitmix64(counter) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53   # in [0, 1)
        return 1.0 - u

    def _advance(self, client: str, state: ClientState, scores: np.ndarray, labels: np.ndarray,
                 x: torch.Tensor | None) -> tuple[ClientState, ClientEvidence]:
        """The per-request path: :meth:`_advance_reference` on NumPy arrays, in two compiled calls: the
        p-values (:func:`~sameguard.evidence.monitor_kernel.p_values`) and the martingale step of all sources
        (:meth:`MixtureMartingale.advance`).

        Args:
            scores: ``(D, N)`` float64 scores, one row per detector in name order.
            labels: ``(N,)`` int64 predicted labels, checked.
            x: ``(N, C, H, W)`` the images, for the stream test.
        """
        n = labels.shape[0]
        names = self._source_names
        thetas = np.empty((len(names), n), dtype=np.float64)
        p = np.empty((len(names), n), dtype=np.float64)
        kernels("monitor_kernel").p_values(scores, labels, np.uint64(_client_base(self.seed, client)), state.queries,
                                           thetas, p, *self._packed_references())
        stream_state = state.stream
        if self.stream is not None:
            stream_state = self.stream.extend(state.stream, x, thetas[-1], p[-1])
        new_states, log_paths, path = self.martingale.advance(state.stacked_martingales(), p)
        alarm_query, alarm_time = state.alarm_query, state.alarm_time
        if alarm_query is None:
            crossed = ((0,) if path[0] >= self.threshold_log else ()) if n == 1 else \
                np.flatnonzero(path >= self.threshold_log)  # one query: a float comparison, no array
            if len(crossed):
                alarm_query, alarm_time = state.queries + int(crossed[0]) + 1, time.time()
        new = self._next_state(state, n, new_states, stream_state, alarm_query, alarm_time)
        per = dict(zip(names, log_paths[:, -1].tolist()))
        return new, self._evidence(client, new, per, torch.from_numpy(path), float(path[-1]))

    def _packed_references(self) -> tuple[np.ndarray, ...]:
        """The calibrators' references for :func:`~sameguard.evidence.monitor_kernel.p_values`, packed once per
        fitted state."""
        key = tuple(id(c.pooled_) for c in self.calibrators.values())
        cached = getattr(self, "_packed", None)
        if cached is None or cached[0] != key:
            packed = kernels("monitor_kernel").pack_references(list(self.calibrators.values()), self._num_classes or 0)
            cached = (key, packed, [c.pooled_ for c in self.calibrators.values()])  # held: their ids stay theirs
            self._packed = cached
        return cached[1]

    def _next_state(self, state: ClientState, n: int, stacked: np.ndarray, stream_state: StreamState | None,
                    alarm_query: int | None, alarm_time: float | None) -> ClientState:
        """The client's state after ``n`` more queries: ``stacked`` holds the new ``(S, G)`` martingale states,
        one row per source (detectors in name order, then the stream test); the state's tensors are views of it."""
        rows = [torch.from_numpy(row) for row in stacked]  # NumPy's row views: cheaper than unbinding a tensor
        return ClientState(queries=state.queries + n, martingales=dict(zip(self.calibrators, rows)),
                           stream_martingale=rows[-1] if self.stream is not None else state.stream_martingale,
                           stream=stream_state, alarm_query=alarm_query, alarm_time=alarm_time, _stacked=stacked)

    def _advance_reference(self, client: str, state: ClientState, scores: Mapping[str, torch.Tensor],
                           labels: torch.Tensor, x: torch.Tensor | None) -> tuple[ClientState, ClientEvidence]:
        """The tensor path, kept as the reference :meth:`_advance` is tested against (``_reference``)."""
        thetas = self._thetas(client, state.queries, labels.numel())
        # One p-value row per source (detectors in name order, then the stream test), and one
        # vectorised martingale update of all their states together.
        rows = [calibrator.checked_p_values(scores[name].detach().to("cpu", torch.float64), labels, thetas[j])
                for j, (name, calibrator) in enumerate(self.calibrators.items())]
        states = [state.martingales[name] for name in self.calibrators]
        stream_state = state.stream
        if self.stream is not None:
            stream_state, p = self.stream.update(state.stream, x, theta=thetas[-1])
            rows.append(p)
            states.append(state.stream_martingale)
        new_states, log_paths = self.martingale.update(torch.stack(states), torch.stack(rows))
        names = list(self.calibrators) + ([STREAM_NAME] if self.stream is not None else [])
        paths = dict(zip(names, log_paths))
        martingales = {name: new_states[j].clone() for j, name in enumerate(self.calibrators)}
        stream_martingale = new_states[-1].clone() if self.stream is not None else state.stream_martingale
        path = torch.logsumexp(log_paths, dim=0) - math.log(len(names))
        alarm_query, alarm_time = state.alarm_query, state.alarm_time
        if alarm_query is None:
            crossed = torch.nonzero(path >= self.threshold_log).flatten()
            if crossed.numel():
                alarm_query, alarm_time = state.queries + int(crossed[0]) + 1, time.time()
        new = ClientState(queries=state.queries + path.numel(), martingales=martingales,
                          stream_martingale=stream_martingale, stream=stream_state,
                          alarm_query=alarm_query, alarm_time=alarm_time)
        per = {name: float(values[-1]) for name, values in paths.items()}
        return new, self._evidence(client, new, per, path)

    def _per_detector_now(self, state: ClientState) -> dict[str, float]:
        per = {name: float(self.martingale.log_value(value)) for name, value in state.martingales.items()}
        if state.stream_martingale is not None:
            per[STREAM_NAME] = float(self.martingale.log_value(state.stream_martingale))
        return per

    def _evidence(self, client: str, state: ClientState, per: dict[str, float], path: torch.Tensor,
                  log_evidence: float | None = None) -> ClientEvidence:
        """The client's evidence; ``log_evidence`` is the mean of ``per`` in log space when not given
        (-inf when every martingale is at 0, Shiryaev-Roberts' start; +inf when one is infinite)."""
        if log_evidence is None:
            log_evidence = log_mean_exp(list(per.values()))
        return ClientEvidence(client=client, queries=state.queries, log_evidence=log_evidence,
                              per_detector=per, alarmed=state.alarm_query is not None,
                              alarm_query=state.alarm_query, alarm_time=state.alarm_time,
                              log_evidence_path=path)

    def _check_batch(self, scores: Mapping[str, torch.Tensor], labels: torch.Tensor,
                     x: torch.Tensor | None) -> int:
        """The batch size ``N >= 1``, after checking that every input has it."""
        if not isinstance(scores, Mapping) or set(scores) != set(self.calibrators):
            given = sorted(scores) if isinstance(scores, Mapping) else type(scores).__name__
            raise ValueError(f"scores must map exactly the monitor's detectors {sorted(self.calibrators)} to "
                             f"score tensors, got {given}.")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() == 0:
            raise ValueError("labels must be a non-empty 1-D tensor of predicted labels, one per query.")
        n = labels.numel()
        if torch.is_floating_point(labels) or labels.dtype == torch.bool or torch.is_complex(labels):
            raise ValueError(f"labels must hold integer class labels, got dtype {labels.dtype}.")
        for name, value in scores.items():
            if not isinstance(value, torch.Tensor) or value.shape != (n,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"scores[{name!r}] must have shape ({n},), one score per label, got {shape}.")
        if self.stream is not None and (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != n):
            raise ValueError(f"This monitor has a stream test: x must be the ({n}, C, H, W) query images.")
        return n

    def check_labels(self, labels: np.ndarray) -> None:
        """Raise ``ValueError`` unless the predicted labels ``(N,)`` int64 lie in ``[0, K)`` for every calibrator's ``K``."""
        k = self._num_classes
        if k is not None:
            low, high = (int(labels[0]),) * 2 if labels.shape[0] == 1 else (int(labels.min()), int(labels.max()))
            if low < 0 or high >= k:
                raise ValueError(f"labels must be in [0, {k}), got values in [{low}, {high}].")


@functools.lru_cache(maxsize=65536)
def _client_base(seed: int, client: str) -> int:
    """The client's counter offset for the smoothing uniforms: the first 8 bytes of SHA-256(seed, client),
    little-endian (cached: one hash per client, not per query)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{client}".encode()).digest()[:8], "little")


class _UnknownClient(Exception):
    """Raised inside a store update to abort it without writing."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) of each uint64, element-wise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
