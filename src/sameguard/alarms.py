"""Per-client alarms for the guard: detectors' scores -> conformal p-values -> test martingales.

:class:`ClientAlarms` is what :class:`~sameguard.guard.Guard` consults for every batch of a client.
It scores the batch with each of its *scorers* (per-query detectors: SAME, MSP, Energy, ...; the
guard's own detector is not scored twice), turns each score into a conformal p-value against
benign calibration scores of the victim's predicted class, and feeds the p-values to the client's
test martingales (:class:`~sameguard.evidence.EvidenceMonitor`); an optional stream test looks at
the client's own queries (JBDA-style attacks). The combined evidence is the average of the
martingales, and the client is alarmed when it reaches ``1/delta``.

**The guarantee.** If a benign client's queries are exchangeable with the calibration images (and
independent of each other), its p-values are (super-)uniform and, by Ville's inequality, the
probability that it is *ever* alarmed is at most ``delta``, however long it queries. The
calibration images must be benign and unseen by the detectors' fitting (a held-out part of the
provider's data that the *victim* was not trained on either: the victim is more confident on its
own training images, so scores built on its outputs (MSP, Energy, SAME's s2) calibrated there make
every benign client look anomalous.) What breaks the assumption, and what we measured of it, is
in the README.

Example::

    alarms = ClientAlarms.calibrate(victim, {"same": same, "msp": msp}, held_out.images, delta=1e-3)
    guard = Guard(victim, same, "reject", alarms=alarms)
    guard.query(x, "mallory")           # once alarmed, every query of mallory is refused
    alarms.evidence("mallory")          # ClientEvidence: log evidence, alarm query, time
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import ArtifactError, StatefulDetector
from .artifacts import fitted_state_sha256
from .evidence import (
    ClientEvidence,
    ConformalCalibrator,
    EvidenceMonitor,
    MixtureMartingale,
    StateStore,
    StreamExchangeabilityTest,
    stream_test,
)
from .evidence.compiled import warm_up
from .forward_memo import no_grad
from .prediction_api import victim_probabilities
from .validation import check_choice, check_fraction, check_images, check_name

logger = logging.getLogger(__name__)

__all__ = ["AlarmUpdate", "ClientAlarms", "ALARMS_FILE", "predicted_labels", "scores_in_batches"]

#: The JSON file that describes a saved set of alarms (next to one calibration folder per scorer).
ALARMS_FILE = "alarms.json"
_LOG10 = math.log(10.0)


@dataclass(frozen=True)
class AlarmUpdate:
    """What the alarms say about one batch of a client.

    Attributes:
        evidence: ``(N,)`` float64 log10 of the client's combined martingale after each query.
        alarmed: ``(N,)`` bool, the client is alarmed when the query is decided (from the query at
            which the evidence first reached ``1/delta``, inclusive, until an operator clears it).
        client: the client's :class:`~sameguard.evidence.ClientEvidence` after the batch.
    """

    evidence: torch.Tensor
    alarmed: torch.Tensor
    client: ClientEvidence


def _check_scorers(scorers: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(scorers, Mapping):
        raise ValueError(f"scorers must map names to fitted detectors, got {type(scorers).__name__}.")
    for name, scorer in scorers.items():
        check_name(name, "each scorer name")
        if not callable(getattr(scorer, "score", None)):
            raise ValueError(f"scorers[{name!r}] must have a score(x) method, got {type(scorer).__name__}.")
        if isinstance(scorer, StatefulDetector):
            raise ValueError(f"scorers[{name!r}] is a per-client detector ({type(scorer).__name__}); its scores depend "
                             "on the client's history and are not exchangeable: use the stream test instead.")
    return dict(scorers)


class ClientAlarms:
    """Per-client alarms over several per-query detectors, with a false-alarm bound ``delta``.

    Args:
        monitor: the calibrated :class:`~sameguard.evidence.EvidenceMonitor` (one calibrator per
            scorer, same names).
        scorers: name -> fitted per-query detector with ``score(x) -> (N,)`` (not a per-client one).
        victim: the victim whose predicted labels select the calibration class.
    """

    def __init__(self, monitor: EvidenceMonitor, scorers: Mapping[str, Any], victim: Callable) -> None:
        self.scorers = _check_scorers(scorers)
        if set(self.scorers) != set(monitor.calibrators):
            raise ValueError(f"The scorers {sorted(self.scorers)} must be exactly the monitor's calibrated detectors "
                             f"{sorted(monitor.calibrators)}.")
        self.monitor = monitor
        self.victim = victim
        self._order = [self.scorers[name] for name in monitor.calibrators]  # the monitor's row order
        warm_up()  # compile the evidence kernels now (once per process), not on the first query

    @property
    def delta(self) -> float:
        return self.monitor.delta

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, victim: Callable, scorers: Mapping[str, Any], benign_x: torch.Tensor, *,
                  delta: float = 1e-3, stream: bool | StreamExchangeabilityTest = False, mode: str = "ville",
                  store: StateStore | None = None, min_class_size: int = 50, seed: int = 0,
                  batch_size: int = 512, conditional: float | None = None) -> ClientAlarms:
        """Calibrate every scorer on benign images and build the alarms.

        Args:
            victim: ``images -> probabilities (N, K)``; its predicted labels pick each query's class.
            scorers: name -> fitted per-query detector.
            benign_x: ``(M, C, H, W)`` benign images in ``[-1, 1]`` that neither the scorers nor the
                victim were trained on (a few thousand: each class should have at least
                ``min_class_size``).
            delta: the false-alarm bound, in (0, 1).
            stream: add the stream test of the client's own queries (``True`` for the default
                :class:`~sameguard.evidence.StreamExchangeabilityTest`).
            mode: ``"ville"`` (alarm probability <= delta, ever), ``"cusum"`` or
                ``"shiryaev-roberts"`` (react faster to a client that turns bad; they bound the mean
                time to a false alarm instead, see :mod:`sameguard.evidence.martingale`).
            conditional: ``eta`` in (0, 0.5] for calibration-conditional p-values: with probability at
                least ``1 - eta`` over the draw of ``benign_x``, the ``delta`` bound holds given these
                very calibration images (:class:`~sameguard.evidence.ConformalCalibrator`); ``None``
                (default): marginal p-values, whose bound holds on average over calibration draws.
        """
        scorers = _check_scorers(scorers)
        x = check_images(benign_x, name="benign_x")
        k = _num_classes(victim, x)
        labels = predicted_labels(victim, x, k, batch_size)
        calibrators = {}
        for name, scorer in scorers.items():
            scores = scores_in_batches(scorer, x, batch_size)
            calibrators[name] = ConformalCalibrator(min_class_size=min_class_size, conditional=conditional).fit(
                scores, labels, k)
            logger.info("Alarms: %s calibrated on %d benign images", name, len(x))
        test = stream_test(stream)
        monitor = EvidenceMonitor(calibrators, delta=delta, martingale=MixtureMartingale(mode=mode), store=store,
                                  stream=test, seed=seed)
        return cls(monitor, scorers, victim)

    # -- the guard's call --------------------------------------------------------------------
    @no_grad  # the guard calls with gradients off already: no second context
    def update(self, client: str, x: torch.Tensor, probs: torch.Tensor,
               known: Mapping[int, torch.Tensor] | None = None) -> AlarmUpdate:
        """Add a batch of ``client``'s queries and say, per query, whether the client is alarmed.

        Args:
            client: the client id.
            x: ``(N, C, H, W)`` the validated queries, in the order they were sent.
            probs: ``(N, K)`` the victim's probabilities of ``x`` (their argmax selects the class).
            known: ``id(detector) -> (N,)`` scores already computed by the caller (the guard's own
                detector), so that no detector scores a batch twice.

        A scorer that reads only this victim's outputs (MSP, Energy: ``score_victim_outputs``) is
        scored from ``probs`` (or the victim's logits) without going through its ``score(x)`` again.
        """
        known = known or {}
        n = x.shape[0]  # not len(x): Tensor.__len__ is a Python-level wrapper
        rows = np.empty((len(self._order), n), dtype=np.float64)  # the monitor's detector order
        for j, scorer in enumerate(self._order):
            values = known.get(id(scorer))
            rows[j] = _score_row(self._scores(scorer, x, probs) if values is None else values, n)
        labels = _labels(probs)
        self.monitor.check_labels(labels)
        ev = self.monitor.update_rows(client, rows, labels, x if self.monitor.stream is not None else None)
        first = ev.queries - n + 1  # 1-based index of the batch's first query in the client's stream
        alarmed = np.zeros(n, dtype=bool)
        if ev.alarm_query is not None:
            alarmed[max(ev.alarm_query - first, 0):] = True  # from the alarm query on (or all, latched before)
        return AlarmUpdate(evidence=torch.from_numpy(ev.log_evidence_path.numpy() / _LOG10),
                           alarmed=torch.from_numpy(alarmed), client=ev)

    def _scores(self, scorer: Any, x: torch.Tensor, probs: torch.Tensor) -> Any:
        """``scorer``'s scores of ``x``: from ``probs`` (or the victim's logits) when it reads only this
        victim's outputs, else its ``score(x)``; checked by :func:`_score_row`."""
        from_outputs = getattr(scorer, "score_victim_outputs", None)
        scores = from_outputs(self.victim, x, probs) if callable(from_outputs) else None
        return scorer.score(x) if scores is None else scores

    # -- operators ---------------------------------------------------------------------------
    def evidence(self, client: str) -> ClientEvidence | None:
        """The client's evidence now (``None`` for a client never seen)."""
        return self.monitor.evidence(client)

    def alarmed_clients(self) -> list[ClientEvidence]:
        """Evidence of every alarmed client, in order of alarm time."""
        found = [e for c in self.monitor.clients() if (e := self.monitor.evidence(c)) is not None and e.alarmed]
        return sorted(found, key=lambda e: e.alarm_time or 0.0)

    def clear(self, client: str) -> bool:
        """Operator action: unlatch ``client``'s alarm (its martingales restart at 1)."""
        return self.monitor.clear_alarm(client)

    def forget(self, client: str) -> bool:
        """Drop everything about ``client``."""
        return self.monitor.forget(client)

    def describe(self) -> dict[str, Any]:
        etas = {c.conditional for c in self.monitor.calibrators.values()}  # the same for all when calibrated here
        return {"delta": self.delta, "scorers": sorted(self.scorers), "stream": self.monitor.stream is not None,
                "mode": self.monitor.martingale.mode, "threshold_log10": math.log10(1.0 / self.delta),
                "calibration_conditional": etas.pop() if len(etas) == 1 else sorted(etas, key=str)}

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write one calibration artifact per scorer (tied to the scorer's and the victim's weights)
        and ``alarms.json`` (delta, mode, stream test) to ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        victim_sha = _victim_sha(self.victim)
        for name, calibrator in self.monitor.calibrators.items():
            calibrator.save(out / name, detector_sha256=fitted_state_sha256(self.scorers[name]),
                            victim_sha256=victim_sha)
        stream = self.monitor.stream
        spec = {"delta": self.delta, "mode": self.monitor.martingale.mode, "scorers": sorted(self.scorers),
                "epsilons": self.monitor.martingale.epsilons.tolist(), "seed": self.monitor.seed,
                "stream": None if stream is None else {"window": stream.window, "metric": stream.metric,
                                                       "pool_size": stream.pool_size}}
        (out / ALARMS_FILE).write_text(json.dumps(spec, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, scorers: Mapping[str, Any], victim: Callable, *,
             store: StateStore | None = None) -> ClientAlarms:
        """Read alarms written by :meth:`save` for these ``scorers`` and ``victim``.

        Raises:
            ArtifactError: a file is missing or malformed, the scorer names differ, or a calibration
                was made for other detector or victim weights.
        """
        root = Path(directory)
        try:
            spec = json.loads((root / ALARMS_FILE).read_text())
            names, delta, mode = spec["scorers"], spec["delta"], spec["mode"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{root} does not hold readable per-client alarms ({ALARMS_FILE}): {exc}") from None
        if sorted(scorers) != sorted(names):
            raise ArtifactError(f"The alarms in {root} were calibrated for the detectors {sorted(names)}, "
                                f"not {sorted(scorers)}.")
        victim_sha = _victim_sha(victim)
        calibrators = {name: ConformalCalibrator.load(root / name, detector_sha256=fitted_state_sha256(scorers[name]),
                                                      victim_sha256=victim_sha) for name in names}
        stream = None if spec.get("stream") is None else StreamExchangeabilityTest(**spec["stream"])
        martingale = MixtureMartingale(spec.get("epsilons", 20), mode=check_choice(mode, "mode", ("ville", "cusum",
                                                                                                   "shiryaev-roberts")))
        monitor = EvidenceMonitor(calibrators, delta=check_fraction(delta, "delta", include_low=False),
                                  martingale=martingale, store=store, stream=stream, seed=spec.get("seed", 0))
        return cls(monitor, scorers, victim)


def _victim_sha(victim: Any) -> str | None:
    sha = getattr(victim, "weights_sha256", None)
    return sha if isinstance(sha, str) else None


def _num_classes(victim: Any, x: torch.Tensor) -> int:
    k = getattr(victim, "num_classes", None)
    if isinstance(k, int) and k >= 2:
        return k
    with torch.no_grad():
        return int(torch.as_tensor(victim(x[:1])).shape[1])


def _scores(scorer: Any, x: torch.Tensor) -> torch.Tensor:
    return _checked_scores(scorer.score(x), len(x))


def _labels(probs: torch.Tensor) -> np.ndarray:
    """``(N,)`` int64 top-1 labels of ``(N, K)`` probabilities (NaN counts as the largest, as in ``torch.argmax``)."""
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        return probs.detach().numpy().argmax(axis=1)  # one NumPy call: no dispatch for a single row
    return probs.argmax(dim=1).cpu().numpy()


def _score_row(scores: Any, n: int) -> np.ndarray | float:
    """A scorer's ``(n,)`` scores as a float64 row (a Python float when ``n == 1``); ``ValueError`` when
    it returned another number of scores."""
    if isinstance(scores, list):  # score_victim_outputs: Python floats
        if len(scores) != n:
            raise ValueError(f"A scorer returned {len(scores)} scores for {n} queries.")
        return scores[0] if n == 1 else np.asarray(scores, dtype=np.float64)
    if n == 1:  # a single-image request: one Python float, no conversions
        scores = torch.as_tensor(scores)
        if scores.numel() != 1:
            raise ValueError(f"A scorer returned {scores.numel()} scores for 1 queries.")
        return float(scores)
    return _checked_scores(scores, n).numpy()


def _checked_scores(scores: Any, n: int) -> torch.Tensor:
    """A scorer's output as ``(n,)`` float64 CPU scores; ``ValueError`` for another number of scores."""
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    if scores.numel() != n:
        raise ValueError(f"A scorer returned {scores.numel()} scores for {n} queries.")
    return scores


def scores_in_batches(scorer: Any, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``(N,)`` float64 CPU scores of ``x`` by a per-query ``scorer``, in batches of ``batch_size``."""
    with torch.no_grad():
        return torch.cat([_scores(scorer, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def predicted_labels(victim: Callable, x: torch.Tensor, num_classes: int, batch_size: int = 512) -> torch.Tensor:
    """``(N,)`` int64 top-1 labels of the victim on ``x`` (the class each p-value is calibrated in)."""
    return torch.cat([victim_probabilities(victim, x[i:i + batch_size], num_classes).argmax(1)
                      for i in range(0, len(x), batch_size)])
