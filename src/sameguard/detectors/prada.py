"""PRADA: stateful, per-client detection from the distribution of query distances
(Juuti, Szyller, Marchal, Asokan, EuroS&P 2019).

For each client the defender keeps, per predicted class ``c``, a *growing set* ``G_c`` of
earlier queries, a threshold ``T_c`` and the list ``D_c`` of minimum distances. For a query ``x``
with predicted class ``c = argmax f_V(x)``:

1. if ``G_c`` is empty: ``G_c = {x}``, ``T_c = 0`` and the growing-set distances are ``[0]``;
2. otherwise ``d = min_{g in G_c} ||x - g||_2`` (L2 in input space) is appended to ``D_c``, and
   if ``d > T_c``: ``x`` joins ``G_c``, ``d`` joins the growing-set distances ``D_G(c)`` and
   ``T_c = max(T_c, mean(D_G(c)) - std(D_G(c)))``;
3. every ``check_every`` (10) queries, the distances of the classes with at least
   ``min_class_distances`` (10) of them are pooled, values more than ``outlier_sigma`` (3)
   standard deviations from the mean are dropped and, if more than ``min_distances`` (100)
   remain, the Shapiro-Wilk statistic ``W`` is computed. The client is flagged while
   ``W < delta``. (The authors' agent checks after queries 1, 11, 21, ...; here after
   queries 10, 20, 30, ..., so that "every 10 queries" counts whole blocks.)

Benign clients' distances are close to normal (``W`` near 1); synthetic queries crafted around
a few seeds (JBDA and the like) give skewed, multi-modal distances and a low ``W``.

**Defaults.** The steps and counts above are those of the authors' code. The paper tunes
``delta`` per dataset so that benign clients raise no alarm; about 0.95-0.96 for MNIST and
0.87 for GTSRB are the values usually quoted (not re-checked against the paper): ``delta =
0.95`` here, and :meth:`~sameguard.api.Detector.calibrate` sets a data-driven threshold instead.

**Scores.** PRADA alarms per client; to compare it per query with other detectors,
:meth:`PRADADetector.score` cuts a stream into non-overlapping windows of ``window_size``
queries, runs PRADA afresh on each window and gives every query of a window the score
``1 - W`` of the window (``W`` over all the window's distances; ``0`` when the window has too
few distances for ``W``): larger = more suspicious, and the paper's alarm is ``1 - W > 1 - delta``.
:meth:`PRADADetector.observe` is the live, per-client path and
:meth:`PRADADetector.queries_until_alarm` the paper's "queries until detection".

Needs: the per-client query history (``"query-history"``), the victim's predicted labels and
the raw queries. No outlier data, no training, no white-box access.

Paper: https://arxiv.org/abs/1805.02628 (EuroS&P 2019).
Reference implementation: Aalto SSG's PRADA code (``GrowingDistanceAgent`` and
``growing_set_ops.py``), e.g. as copied in https://github.com/manita-ngarm/Research.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

from ..api import Detector
from ..validation import check_images, check_int
from ._common import ParamsMixin, ProbabilityFn, per_query, victim_image_shape, victim_probabilities, windows

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

__all__ = ["PRADADetector", "PradaState", "min_l2_distance", "growing_set_threshold", "shapiro_statistic"]


# ---------------------------------------------------------------------- pure functions
def min_l2_distance(x: torch.Tensor, growing_set: torch.Tensor) -> float:
    """``min_g ||x - g||_2`` over the rows of ``growing_set`` ``(M, D)``, ``M >= 1``; ``x`` is ``(D,)``."""
    if growing_set.dim() != 2 or len(growing_set) == 0 or x.shape != growing_set.shape[1:]:
        raise ValueError(f"Expected x (D,) and a non-empty growing set (M, D), got {tuple(x.shape)} and "
                         f"{tuple(growing_set.shape)}.")
    diff = growing_set.to(torch.float64) - x.to(torch.float64)
    return float(torch.linalg.vector_norm(diff, dim=1).min())


def growing_set_threshold(growing_distances: Sequence[float], current: float) -> float:
    """PRADA's threshold update ``max(current, mean(D_G) - std(D_G))`` (population std)."""
    d = np.asarray(growing_distances, dtype=np.float64)
    return max(float(current), float(d.mean() - d.std()))


def shapiro_statistic(distances_by_class: dict[Hashable, Sequence[float]], *, min_class_distances: int = 10,
                      outlier_sigma: float = 3.0, min_distances: int = 100) -> float | None:
    """PRADA's Shapiro-Wilk ``W`` of a client's minimum distances, or ``None`` when too few.

    Pools the distances of the classes that have at least ``min_class_distances``, keeps the
    values with ``|d - mean| < outlier_sigma * std`` and returns ``W`` (in ``(0, 1]``, 1 =
    perfectly normal) when more than ``min_distances`` values remain.
    """
    pooled = [d for values in distances_by_class.values() if len(values) >= min_class_distances for d in values]
    data = np.asarray(pooled, dtype=np.float64)
    if len(data) == 0:
        return None
    data = data[np.abs(data - data.mean()) < outlier_sigma * data.std()]
    if len(data) <= max(min_distances, 2):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # p-value accuracy warnings for N > 5000; only W is used
        return float(stats.shapiro(data).statistic)


@dataclass
class PradaState:
    """One client's PRADA state; :meth:`update` processes one query.

    Attributes:
        growing_sets: per class, the ``(M, D)`` float32 growing set.
        growing_distances: per class, ``D_G(c)``: ``[0]`` then the distances of the members added.
        thresholds: per class, ``T_c``.
        distances: per class, every minimum distance observed, ``D_c``.
        queries: number of queries processed.
        shapiro_w: the last ``W`` computed (``None`` before the first one).
        alarm: whether the last check flagged the client (``W < delta``).
        alarm_at: 1-based index of the query at which the first alarm was raised.
    """

    growing_sets: dict[int, torch.Tensor] = field(default_factory=dict)
    growing_distances: dict[int, list[float]] = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)
    distances: dict[int, list[float]] = field(default_factory=dict)
    queries: int = 0
    shapiro_w: float | None = None
    alarm: bool = False
    alarm_at: int | None = None

    def update(self, x: torch.Tensor, label: int) -> float | None:
        """Steps 1-2 for query ``x`` (any shape, flattened) of predicted class ``label``.

        Returns the minimum distance to the class's growing set (``None`` for a class's first query).
        """
        v = x.detach().reshape(-1).to(torch.float32).cpu()
        c = int(label)
        self.queries += 1
        if c not in self.growing_sets:
            self.growing_sets[c] = v[None].clone()
            self.growing_distances[c] = [0.0]
            self.thresholds[c] = 0.0
            return None
        d = min_l2_distance(v, self.growing_sets[c])
        self.distances.setdefault(c, []).append(d)
        if d > self.thresholds[c]:
            self.growing_sets[c] = torch.cat([self.growing_sets[c], v[None]])
            self.growing_distances[c].append(d)
            self.thresholds[c] = growing_set_threshold(self.growing_distances[c], self.thresholds[c])
        return d

    def check(self, delta: float, *, min_class_distances: int = 10, outlier_sigma: float = 3.0,
              min_distances: int = 100) -> bool:
        """Step 3: recompute ``W`` (when enough distances) and the alarm; returns the alarm."""
        w = shapiro_statistic(self.distances, min_class_distances=min_class_distances,
                              outlier_sigma=outlier_sigma, min_distances=min_distances)
        if w is not None:
            self.shapiro_w = w
            self.alarm = w < delta
            if self.alarm and self.alarm_at is None:
                self.alarm_at = self.queries
        return self.alarm

    @property
    def num_distances(self) -> int:
        return sum(len(v) for v in self.distances.values())


# ---------------------------------------------------------------------- detector
class PRADADetector(ParamsMixin, Detector):
    """PRADA, per client. ``observe`` updates a client; ``score`` rates windows of a stream.

    Needs: ``"query-history"`` (state per client) and the victim's predicted labels (black box).

    Args:
        delta: alarm when the Shapiro-Wilk ``W < delta`` (default 0.95, MNIST-like data; the
            paper tunes it per dataset on benign clients, e.g. about 0.87 for GTSRB).
        check_every: recompute ``W`` every this many queries of a client (authors: 10).
        min_class_distances: a class's distances are pooled once it has this many (authors: 10).
        min_distances: ``W`` is computed only with more than this many pooled distances (authors: 100).
        outlier_sigma: pooled distances beyond this many standard deviations are dropped (authors: 3).
        window_size: queries per window in :meth:`score` (each window must yield more than
            ``min_distances`` distances, so keep it well above ``min_distances + K``).
        batch_size: queries per call to the victim when labels are not given.

    Fitted state: ``victim_`` (for predicted labels), ``image_shape_``; per-client states in
    ``clients_`` (client id -> :class:`PradaState`).
    """

    NEEDS: frozenset[str] = frozenset({"query-history"})

    def __init__(self, *, delta: float = 0.95, check_every: int = 10, min_class_distances: int = 10,
                 min_distances: int = 100, outlier_sigma: float = 3.0, window_size: int = 200,
                 batch_size: int = 512) -> None:
        self.delta = delta
        self.check_every = check_every
        self.min_class_distances = min_class_distances
        self.min_distances = min_distances
        self.outlier_sigma = outlier_sigma
        self.window_size = window_size
        self.batch_size = batch_size
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1] (a Shapiro-Wilk W threshold), got {delta!r}.")
        check_int(check_every, "check_every")
        check_int(min_class_distances, "min_class_distances")
        check_int(min_distances, "min_distances", minimum=2)
        check_int(window_size, "window_size", minimum=3)
        check_int(batch_size, "batch_size")
        if isinstance(outlier_sigma, bool) or not isinstance(outlier_sigma, (int, float)) or outlier_sigma <= 0:
            raise ValueError(f"outlier_sigma must be a positive number, got {outlier_sigma!r}.")
        self.victim_: ProbabilityFn | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.clients_: dict[Hashable, PradaState] = {}
        self.threshold_ = None
        self.calibration_fpr_ = None

    def is_fitted(self) -> bool:
        return self.victim_ is not None

    def fit(self, victim: ProbabilityFn) -> Self:
        """Attach the black-box ``victim`` (its argmax gives the predicted class of each query).

        PRADA learns nothing from data; ``fit`` also forgets every client's state.
        """
        if not callable(victim):
            raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
        self.victim_ = victim
        self.image_shape_ = victim_image_shape(victim)
        self.clients_ = {}
        self.threshold_ = None
        self.calibration_fpr_ = None
        return self

    # ------------------------------------------------------------------ helpers
    def _stats_kwargs(self) -> dict:
        return dict(min_class_distances=self.min_class_distances, outlier_sigma=self.outlier_sigma,
                    min_distances=self.min_distances)

    def _inputs(self, x: torch.Tensor, labels: torch.Tensor | Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        if labels is None:
            labels = torch.cat([victim_probabilities(self.victim_, x[s]).argmax(1)
                                for s in windows(len(x), self.batch_size)])
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {tuple(labels.shape)}.")
        return x, labels

    def _window_score(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        state = PradaState()
        for xi, yi in zip(x, labels.tolist()):
            state.update(xi, yi)
        w = shapiro_statistic(state.distances, **self._stats_kwargs())
        return 0.0 if w is None else 1.0 - w

    # ------------------------------------------------------------------ per-window scores
    def score(self, x: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Windowed scores of one client's stream ``x`` ``(N, C, H, W)`` in ``[-1, 1]``, in query order.

        The stream is cut into consecutive windows of ``window_size`` queries (the last may be
        shorter); every query gets ``1 - W`` of its window, ``W`` computed by a fresh PRADA
        state over the window (``0`` when the window yields too few distances). Client states
        are not touched.

        Args:
            labels: ``(N,)`` predicted classes; ``None`` asks the victim.

        Returns:
            ``(N,)`` float32 in ``[0, 1)``; larger = more suspicious.
        """
        scores = self.window_scores(x, labels)
        return per_query(scores, len(x), self.window_size)

    def window_scores(self, x: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """``(ceil(N / window_size),)`` float32: one score ``1 - W`` per window (see :meth:`score`)."""
        x, labels = self._inputs(x, labels)
        return torch.tensor([self._window_score(x[s], labels[s]) for s in windows(len(x), self.window_size)],
                            dtype=torch.float32)

    # ------------------------------------------------------------------ live, per client
    def observe(self, x: torch.Tensor, client: Hashable, labels: torch.Tensor | Sequence[int] | None = None
                ) -> torch.Tensor:
        """Process ``x`` ``(N, C, H, W)`` as the next queries of ``client``, in order.

        Returns:
            ``(N,)`` float32: after each query, ``1 - W`` of the client's last Shapiro-Wilk
            check (``0`` before the first one). The client is flagged while this exceeds
            ``1 - delta``; see :meth:`is_flagged`.
        """
        x, labels = self._inputs(x, labels)
        state = self.clients_.setdefault(client, PradaState())
        out = torch.empty(len(x), dtype=torch.float32)
        for i, (xi, yi) in enumerate(zip(x, labels.tolist())):
            state.update(xi, yi)
            if state.queries % self.check_every == 0:
                state.check(self.delta, **self._stats_kwargs())
            out[i] = 0.0 if state.shapiro_w is None else 1.0 - state.shapiro_w
        return out

    def is_flagged(self, client: Hashable) -> bool:
        """Whether ``client``'s last check raised PRADA's alarm (``W < delta``); False for unknown clients."""
        state = self.clients_.get(client)
        return bool(state is not None and state.alarm)

    def client_state(self, client: Hashable) -> PradaState | None:
        """The state of ``client`` (``None`` if it sent nothing yet)."""
        return self.clients_.get(client)

    def reset(self, client: Hashable | None = None) -> None:
        """Forget one client's state, or every client's with ``client=None``."""
        if client is None:
            self.clients_.clear()
        else:
            self.clients_.pop(client, None)

    def queries_until_alarm(self, stream: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None
                            ) -> int | None:
        """Number of queries of ``stream`` (``(N, C, H, W)``, one client, in order) after which
        PRADA first raises its alarm (checked every ``check_every`` queries), or ``None``.

        Runs on a fresh state; the detector's client states are not touched.
        """
        x, labels = self._inputs(stream, labels)
        state = PradaState()
        for xi, yi in zip(x, labels.tolist()):
            state.update(xi, yi)
            if state.queries % self.check_every == 0 and state.check(self.delta, **self._stats_kwargs()):
                return state.queries
        return None

    @property
    def clients(self) -> Iterable[Hashable]:
        """The ids of the clients seen since ``fit`` (or the last :meth:`reset`)."""
        return tuple(self.clients_)
