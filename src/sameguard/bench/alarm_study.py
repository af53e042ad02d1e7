"""The benchmark's per-client alarm study: queries until alarm, and false alarms among benign clients.

For one victim and its fitted per-query detectors, with benign calibration images that neither the
detectors nor the victim were trained on, this module measures, through the same
:class:`~sameguard.evidence.EvidenceMonitor` the guard uses:

* **queries until alarm** of each attack stream (the attack's own queries, in order, from the
  first), for each alarm set: every detector alone, their combination (average of martingales),
  the stream test alone, and the combination with the stream test;
* **benign false alarms**: ``benign_clients`` clients of ``client_queries`` queries each, drawn
  from benign images disjoint from the calibration set, and class-skewed benign clients (one
  per single class and per pair of classes, by true label); how many were ever alarmed, next to
  the bound ``delta x clients``.

The p-values of a benign client are valid (super-uniform) when its queries are exchangeable with
the calibration images; the class-skewed clients test the class-conditional calibration, and the
stream test assumes the client's own queries are exchangeable.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import ImageDataset
from ..evidence import ConformalCalibrator, EvidenceMonitor, MixtureMartingale, stream_test
from ..alarms import predicted_labels, scores_in_batches
from ..validation import check_fraction, check_int

logger = logging.getLogger(__name__)

__all__ = ["AlarmStudy", "alarm_sets", "COMBINED", "STREAM", "COMBINED_STREAM"]

COMBINED = "combination"
STREAM = "stream test"
COMBINED_STREAM = "combination + stream test"


@dataclass(frozen=True)
class _Scored:
    """Detector scores and victim labels of a set of images, computed once."""

    scores: dict[str, torch.Tensor]   # label -> (N,) float64
    labels: torch.Tensor              # (N,) int64, the victim's predicted labels
    images: torch.Tensor              # (N, C, H, W)


def alarm_sets(detectors: Sequence[str], combination: Sequence[str], stream: bool) -> dict[str, tuple[list[str], bool]]:
    """The alarm sets to evaluate: name -> (detector labels, with the stream test)."""
    sets: dict[str, tuple[list[str], bool]] = {label: ([label], False) for label in detectors}
    if len(combination) > 1:
        sets[COMBINED] = (list(combination), False)
    if stream:
        sets[STREAM] = ([], True)
        if combination:
            sets[COMBINED_STREAM] = (list(combination), True)
    return sets


class AlarmStudy:
    """Queries until alarm and benign false alarms for one victim and its detectors.

    Args:
        victim: ``images -> probabilities (N, K)``.
        detectors: label -> fitted per-query detector (``score(x) -> (N,)``).
        calibration_x: ``(M, C, H, W)`` benign images no detector was fitted on.
        sets: from :func:`alarm_sets`.
        delta: the false-alarm bound.
        seed: for client draws and the p-values' smoothing.
        conditional: ``eta`` for calibration-conditional p-values (``None``: marginal ones).
        stream_pool_size: the stream test's ``pool_size`` (``None``: every pixel).
    """

    def __init__(self, victim: Any, detectors: Mapping[str, Any], calibration_x: torch.Tensor,
                 sets: Mapping[str, tuple[list[str], bool]], *, delta: float = 1e-3, seed: int = 0,
                 batch_size: int = 512, conditional: float | None = None,
                 stream_pool_size: int | None = None) -> None:
        self.victim, self.detectors, self.sets = victim, dict(detectors), dict(sets)
        self.stream_pool_size = stream_pool_size
        self.delta = check_fraction(delta, "delta", include_low=False, include_high=False)
        self.seed, self.batch_size = seed, batch_size
        self.num_classes = int(victim.num_classes)
        calib = self.score(calibration_x)
        self.calibrators = {label: ConformalCalibrator(conditional=conditional).fit(
                                calib.scores[label], calib.labels, self.num_classes) for label in self.detectors}

    def score(self, x: torch.Tensor) -> _Scored:
        """Every detector's scores and the victim's labels for ``x``, in batches."""
        labels = predicted_labels(self.victim, x, self.num_classes, self.batch_size)
        scores = {label: scores_in_batches(d, x, self.batch_size) for label, d in self.detectors.items()}
        return _Scored(scores, labels, x)

    def _monitor(self, name: str) -> EvidenceMonitor:
        labels, stream = self.sets[name]
        return EvidenceMonitor({label: self.calibrators[label] for label in labels}, delta=self.delta,
                               martingale=MixtureMartingale(), seed=self.seed,
                               stream=stream_test(stream, self.stream_pool_size))

    def _alarm_query(self, monitor: EvidenceMonitor, name: str, data: _Scored, index: torch.Tensor,
                     client: str) -> int | None:
        labels, stream = self.sets[name]
        ev = monitor.update(client, {label: data.scores[label][index] for label in labels}, data.labels[index],
                            data.images[index] if stream else None)
        monitor.forget(client)  # each client is evaluated once; keep memory flat over many clients
        return ev.alarm_query

    # -- attacks -----------------------------------------------------------------------------
    def queries_until_alarm(self, stream_x: torch.Tensor) -> dict[str, int | None]:
        """Per alarm set: the 1-based index of the query at which the attack stream is alarmed, or ``None``."""
        data = self.score(stream_x)
        index = torch.arange(len(stream_x))
        return {name: self._alarm_query(self._monitor(name), name, data, index, "attacker") for name in self.sets}

    # -- benign clients ----------------------------------------------------------------------
    def benign_false_alarms(self, test: ImageDataset, *, clients: int = 1000, queries: int = 300
                            ) -> dict[str, dict[str, Any]]:
        """Per alarm set: alarmed random benign clients and class-skewed benign clients.

        Returns:
            name -> ``{"clients", "alarmed", "bound", "skewed_clients", "skewed_alarmed", "skewed_kinds"}``
            where ``bound = delta x clients`` and ``skewed_kinds`` lists the alarmed class sets.
        """
        clients = check_int(clients, "clients", minimum=1)
        queries = check_int(queries, "queries", minimum=1)
        data = self.score(test.images)
        g = torch.Generator().manual_seed(self.seed + 7919)
        random_draws = [torch.randperm(len(test), generator=g)[:queries] for _ in range(clients)]
        skew_draws = self._skewed_draws(test.labels, queries, g)
        out = {}
        for name in self.sets:
            monitor = self._monitor(name)
            alarmed = sum(self._alarm_query(monitor, name, data, idx, f"benign-{i}") is not None
                          for i, idx in enumerate(random_draws))
            kinds = [kind for kind, idx in skew_draws.items()
                     if self._alarm_query(monitor, name, data, idx, f"skew-{kind}") is not None]
            out[name] = {"clients": clients, "alarmed": int(alarmed), "bound": self.delta * clients,
                         "skewed_clients": len(skew_draws), "skewed_alarmed": len(kinds), "skewed_kinds": kinds}
            logger.info("Alarm set %s: %d of %d benign clients alarmed, %d of %d class-skewed", name, alarmed,
                        clients, len(kinds), len(skew_draws))
        return out

    @staticmethod
    def _skewed_draws(labels: torch.Tensor, queries: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """One client per single class and per pair of classes (true labels), ``queries`` images each."""
        classes = sorted(int(c) for c in torch.unique(labels))
        kinds = [(c,) for c in classes] + list(itertools.combinations(classes, 2))
        draws = {}
        for kind in kinds:
            pool = torch.nonzero(torch.isin(labels, torch.tensor(kind))).flatten()
            pick = pool[torch.randperm(len(pool), generator=g)[:queries]]
            if len(pick) < queries:  # a small class: draw with replacement to keep the client's length
                pick = pool[torch.randint(len(pool), (queries,), generator=g)]
            draws["+".join(map(str, kind))] = pick
        return draws


def median_range(values: Sequence[int | None], length: int) -> str:
    """``"median [min-max]"`` of alarm indices; a stream never alarmed counts as ``> length``."""
    finite = sorted(v if v is not None else math.inf for v in values)
    if not finite:
        return "–"
    mid = finite[len(finite) // 2] if len(finite) % 2 else (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2

    def fmt(v: float) -> str:
        return f"> {length}" if math.isinf(v) else f"{v:g}"

    return fmt(mid) if len(finite) == 1 else f"{fmt(mid)} [{fmt(finite[0])}–{fmt(finite[-1])}]"
