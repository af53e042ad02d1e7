"""The prediction interface every attack and every simulated user queries: :class:`PredictionAPI`.

A prediction API takes a batch of images ``(N, C, H, W)`` in ``[-1, 1]`` (the package's
normalisation convention, see :mod:`sameguard.data.transforms`) from a named client and answers
with class probabilities ``(N, K)`` ``float32`` -- or, when it is configured with
``output="labels"``, with top-1 labels ``(N,)`` ``int64`` only (the hard-label setting of the
model-extraction literature). Nothing else crosses the interface: attacks never see the victim's
weights, logits or gradients, so an HTTP client can implement the same protocol and every attack
runs unchanged against a remote service.

Implementations here:

* :class:`VictimAPI` -- the bare victim (ML-as-a-service without a defense). It counts queries per
  client and can refuse, batch by batch, to go over a per-client budget with
  :class:`BudgetExceededError`. A batch that would exceed the budget is refused **whole**: nothing
  is answered and nothing is counted.
* :class:`GuardedAPI` -- the victim behind a detector (e.g. :class:`~sameguard.detectors.SAMEDetector`)
  that scores every query it answers and records, per client and in query order, the scores (and
  the flags ``score > threshold_`` when the detector is calibrated), so that an experiment can read
  back exactly the scores of the queries one attacker sent. The answers themselves are not changed
  (monitoring mode); what to do with a score is the business of the actions and of the guard.
* :class:`BoundClient` and :func:`fresh_client_id` -- an API seen by one client, with an optional
  budget of its own: what an attack holds while it runs.

Example::

    api = GuardedAPI(victim, detector, budget=10_000)
    result = KnockoffNets(proxy).run(api, budget=4000)
    attack_scores = api.scores(result.client)          # (4000,), in query order
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch

from .api import NotCalibratedError, SameguardError
from .validation import check_images

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUTS",
    "Output",
    "PredictionAPI",
    "BudgetExceededError",
    "VictimAPI",
    "GuardedAPI",
    "BoundClient",
    "fresh_client_id",
    "score_for_client",
]

#: What a prediction API answers: full probability vectors or top-1 labels only.
Output = Literal["probabilities", "labels"]
OUTPUTS: tuple[str, ...] = ("probabilities", "labels")

#: The client id used when a caller does not name one.
ANONYMOUS = "anonymous"


@runtime_checkable
class PredictionAPI(Protocol):
    """A classifier served as a black box: images in, probabilities (or labels) out.

    Attributes:
        image_shape: ``(C, H, W)`` of the images it accepts.
        num_classes: ``K``, the number of classes.
        output: ``"probabilities"`` (answers ``(N, K)`` float32, rows sum to 1) or ``"labels"``
            (answers ``(N,)`` int64 in ``[0, K)``).
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    output: Output

    def query(self, x: torch.Tensor, client: str = ANONYMOUS) -> torch.Tensor:
        """Answer a batch ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` sent by ``client``.

        Raises:
            BudgetExceededError: the batch would take ``client`` over its budget; nothing is
                answered and nothing is counted.
            ValueError: ``x`` is not a valid image batch of shape ``(N, *image_shape)``.
        """
        ...

    def queries_used(self, client: str) -> int:
        """Number of images ``client`` has had answered so far."""
        ...

    def remaining(self, client: str) -> int | None:
        """Images ``client`` may still send, or ``None`` when there is no budget."""
        ...


def score_for_client(detector: object, x: torch.Tensor, client: str) -> torch.Tensor:
    """``(N,)`` float32 scores of ``client``'s next queries ``x``, for stateless and stateful detectors.

    A per-client detector (PRADA, VarDetect) exposes ``observe(x, client)``, which appends ``x``
    to that client's history and scores it in context; a detector whose ``score`` takes a
    ``client`` keyword receives it; any other detector scores the batch on its own.
    """
    with torch.no_grad():
        observe = getattr(detector, "observe", None)
        if callable(observe):
            raw = observe(x, client)
        else:
            score = detector.score  # type: ignore[attr-defined]
            try:
                takes_client = "client" in inspect.signature(score).parameters
            except (TypeError, ValueError):  # builtins without a signature
                takes_client = False
            raw = score(x, client=client) if takes_client else score(x)
    scores = torch.as_tensor(raw).detach().to("cpu", torch.float32).flatten()
    if scores.numel() != x.shape[0]:
        raise ValueError(f"The detector returned {scores.numel()} scores for {x.shape[0]} queries.")
    return scores


class BudgetExceededError(SameguardError, RuntimeError):
    """A query batch would take a client over its query budget; the whole batch was refused.

    Attributes:
        client: the client id.
        budget: the client's budget (images).
        used: images already answered for the client.
        requested: images in the refused batch.
    """

    def __init__(self, client: str, budget: int, used: int, requested: int) -> None:
        self.client, self.budget, self.used, self.requested = client, int(budget), int(used), int(requested)
        super().__init__(
            f"Query budget exceeded for client {client!r}: the budget is {self.budget} images, "
            f"{self.used} were used and {self.requested} more were requested "
            f"({self.budget - self.used} left); the whole batch was refused and nothing was counted."
        )


def _check_client(client: object) -> str:
    if not isinstance(client, str) or not client:
        raise ValueError(f"client must be a non-empty string naming the caller, got {client!r}.")
    return client


def _check_budget(budget: object, what: str = "budget") -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"{what} must be a non-negative int or None (no budget), got {budget!r}.")
    return int(budget)


class VictimAPI:
    """The bare victim as a prediction API, with per-client query counting and budgets.

    Args:
        victim: ``images (N, C, H, W) in [-1, 1] -> probabilities (N, K)``, e.g. a
            :class:`~sameguard.victim.Victim` (its ``image_shape`` and ``num_classes`` are read
            from it) or any callable (then pass ``image_shape`` and ``num_classes``).
        output: ``"probabilities"`` (default) or ``"labels"`` (top-1 labels only).
        budget: per-client budget in images; ``None`` (default) means unlimited. Every client
            gets the same budget.
        image_shape: ``(C, H, W)``; defaults to ``victim.image_shape``.
        num_classes: ``K``; defaults to ``victim.num_classes``.
        record_inputs: keep every answered image per client (CPU, float32), readable with
            :meth:`inputs` -- e.g. to score one attack's queries with several detectors without
            running it again. Off by default (memory grows with the queries).

    The API is safe to call from several threads: the budget check and the count are atomic.
    """

    def __init__(
        self,
        victim: Callable[[torch.Tensor], torch.Tensor],
        *,
        output: Output = "probabilities",
        budget: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        record_inputs: bool = False,
    ) -> None:
        if not callable(victim):
            raise ValueError(f"victim must be callable (images -> probabilities), got {type(victim).__name__}.")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
        shape = image_shape if image_shape is not None else getattr(victim, "image_shape", None)
        if shape is None or len(tuple(shape)) != 3 or any(int(s) < 1 for s in shape):
            raise ValueError(
                "The API needs the victim's input shape (C, H, W): pass image_shape=... or a victim "
                f"with an image_shape attribute; got {shape!r}."
            )
        k = num_classes if num_classes is not None else getattr(victim, "num_classes", None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(
                "The API needs the number of classes (at least 2): pass num_classes=... or a victim "
                f"with a num_classes attribute; got {k!r}."
            )
        self.victim = victim
        self.output: Output = output
        self.budget = _check_budget(budget)
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.num_classes = int(k)
        self.record_inputs = bool(record_inputs)
        self._used: dict[str, int] = {}
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_shape={self.image_shape}, num_classes={self.num_classes}, "
                f"output={self.output!r}, budget={self.budget})")

    # -- accounting ---------------------------------------------------------------------------
    def queries_used(self, client: str) -> int:
        """Images answered so far for ``client`` (0 for a client never seen)."""
        with self._lock:
            return self._used.get(_check_client(client), 0)

    def remaining(self, client: str) -> int | None:
        """Images ``client`` may still send; ``None`` when the API has no budget."""
        if self.budget is None:
            return None
        return max(self.budget - self.queries_used(client), 0)

    @property
    def total_queries(self) -> int:
        """Images answered for all clients together."""
        with self._lock:
            return sum(self._used.values())

    def clients(self) -> list[str]:
        """Clients that have had at least one batch answered, in order of first query."""
        with self._lock:
            return list(self._used)

    def inputs(self, client: str) -> torch.Tensor:
        """``(n, C, H, W)`` every image answered for ``client``, in query order (``record_inputs``)."""
        if not self.record_inputs:
            raise RuntimeError("This API does not keep its inputs: construct it with record_inputs=True.")
        with self._lock:
            parts = list(self._inputs.get(_check_client(client), []))
        return torch.cat(parts) if parts else torch.empty(0, *self.image_shape)

    def reset(self, client: str) -> None:
        """Forget ``client``: its count (so its budget starts afresh) and everything recorded for it."""
        client = _check_client(client)
        with self._lock:
            self._used.pop(client, None)
            self._inputs.pop(client, None)
            self._forget(client)

    def _forget(self, client: str) -> None:
        """Hook for subclasses: drop their per-client records (called with the lock held)."""

    # -- answering ----------------------------------------------------------------------------
    def query(self, x: torch.Tensor, client: str = ANONYMOUS) -> torch.Tensor:
        """Answer ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` for ``client``.

        Returns:
            ``(N, K)`` float32 probabilities, or ``(N,)`` int64 labels when ``output="labels"``;
            on the CPU.

        Raises:
            ValueError: ``x`` is not a valid batch of ``image_shape`` images (see
                :func:`~sameguard.validation.check_images`).
            BudgetExceededError: ``used + N > budget``; nothing is answered or counted.
        """
        client = _check_client(client)
        x = check_images(x, self.image_shape)
        n = int(x.shape[0])
        with self._lock:  # reserve the queries atomically
            used = self._used.get(client, 0)
            if self.budget is not None and used + n > self.budget:
                raise BudgetExceededError(client, self.budget, used, n)
            self._used[client] = used + n
        try:
            probs = self._probabilities(x)
            extra = self._observe(x, probs, client)
        except BaseException:
            with self._lock:  # give the reservation back: nothing was answered
                self._used[client] -= n
                if self._used[client] == 0 and not self._inputs.get(client):
                    del self._used[client]
            raise
        with self._lock:
            if self.record_inputs:
                self._inputs.setdefault(client, []).append(x.detach().to("cpu", copy=True))
            self._record(client, extra)
        if self.output == "labels":
            return probs.argmax(dim=1)
        return probs

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = self.victim(x)
        if not isinstance(probs, torch.Tensor) or probs.shape != (x.shape[0], self.num_classes):
            raise ValueError(
                f"The victim must return probabilities of shape ({x.shape[0]}, {self.num_classes}), got "
                f"{tuple(getattr(probs, 'shape', ()))}."
            )
        return probs.detach().to("cpu", torch.float32)

    def _observe(self, x: torch.Tensor, probs: torch.Tensor, client: str) -> object:
        """Hook for subclasses: look at an accepted batch before it is answered (no lock held)."""
        return None

    def _record(self, client: str, extra: object) -> None:
        """Hook for subclasses: store what :meth:`_observe` returned (called with the lock held)."""


class GuardedAPI(VictimAPI):
    """The victim behind a detector that scores every query and records the scores per client.

    Each accepted batch is scored with :func:`score_for_client` (``(N,)``, larger = more suspicious)
    before it is answered; the scores are kept per client in query order, and so are the flags
    ``score > detector.threshold_`` when the detector has a threshold. Answers are not changed.
    Batches refused for budget are neither scored nor recorded. A per-client detector (with
    ``observe(x, client)``, such as PRADA) sees each client's queries as one stream, and one with
    a ``reset(client)`` method is told when :meth:`reset` forgets a client.

    Args:
        victim: as for :class:`VictimAPI`.
        detector: an object with ``score(x) -> Tensor[N]`` (e.g. a fitted
            :class:`~sameguard.detectors.SAMEDetector`) and optionally ``threshold_``.
        output, budget, image_shape, num_classes, record_inputs: as for :class:`VictimAPI`.
    """

    def __init__(
        self,
        victim: Callable[[torch.Tensor], torch.Tensor],
        detector: object,
        *,
        output: Output = "probabilities",
        budget: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        record_inputs: bool = False,
    ) -> None:
        super().__init__(victim, output=output, budget=budget, image_shape=image_shape,
                         num_classes=num_classes, record_inputs=record_inputs)
        score = getattr(detector, "score", None)
        if not callable(score):
            raise ValueError(f"detector must have a score(x) method, got {type(detector).__name__}.")
        self.detector = detector
        self._scores: dict[str, list[torch.Tensor]] = {}
        self._flags: dict[str, list[torch.Tensor | None]] = {}

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, detector={type(self.detector).__name__})"

    def _observe(self, x: torch.Tensor, probs: torch.Tensor, client: str) -> object:
        scores = score_for_client(self.detector, x, client)
        threshold = getattr(self.detector, "threshold_", None)
        flags = None if threshold is None else scores > float(threshold)
        return scores, flags

    def _record(self, client: str, extra: object) -> None:
        scores, flags = extra  # type: ignore[misc]
        self._scores.setdefault(client, []).append(scores)
        self._flags.setdefault(client, []).append(flags)

    def _forget(self, client: str) -> None:
        self._scores.pop(client, None)
        self._flags.pop(client, None)
        reset = getattr(self.detector, "reset", None)
        if callable(reset):
            reset(client)

    def scores(self, client: str) -> torch.Tensor:
        """``(n,)`` float32 detector scores of every image answered for ``client``, in query order."""
        with self._lock:
            parts = list(self._scores.get(_check_client(client), []))
        return torch.cat(parts) if parts else torch.empty(0)

    def flags(self, client: str) -> torch.Tensor:
        """``(n,)`` bool: which of ``client``'s queries were flagged (``score > threshold_``).

        Raises:
            NotCalibratedError: some of the client's queries were scored while the detector had
                no threshold.
        """
        with self._lock:
            parts = list(self._flags.get(_check_client(client), []))
        if any(p is None for p in parts):
            raise NotCalibratedError(
                f"Some queries of client {client!r} were scored while the detector had no threshold, so "
                "they have no flags: calibrate the detector before the queries are sent."
            )
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)  # type: ignore[arg-type]


class BoundClient:
    """A prediction API as seen by one client, with an optional budget of its own.

    This is what an attack holds while it runs: ``query(x)`` goes to ``api.query(x, client)``, and
    a batch that would take the client over ``budget`` is refused whole with
    :class:`BudgetExceededError` *before* anything is sent, so the attack can never spend more
    than it was given even against an API without budgets.

    Args:
        api: any :class:`PredictionAPI`.
        client: the client id to query as.
        budget: the most images this handle may send; ``None`` for no local limit.
    """

    def __init__(self, api: PredictionAPI, client: str, budget: int | None = None) -> None:
        self.api = api
        self.client = _check_client(client)
        self.budget = _check_budget(budget)
        self.used = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.api.image_shape)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.api.num_classes)

    @property
    def output(self) -> Output:
        return self.api.output

    @property
    def remaining(self) -> int | None:
        """Images this handle may still send (its own budget), ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self.used

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Send ``x`` as this client; see :meth:`PredictionAPI.query`."""
        shape = getattr(x, "shape", ())
        n = int(shape[0]) if len(shape) > 0 else 0  # tensors and numpy arrays alike
        if self.budget is not None and self.used + n > self.budget:
            raise BudgetExceededError(self.client, self.budget, self.used, n)
        answer = self.api.query(x, self.client)
        self.used += n
        return answer

    def __repr__(self) -> str:
        return f"BoundClient(client={self.client!r}, used={self.used}, budget={self.budget}, api={self.api!r})"


def fresh_client_id(api: PredictionAPI, prefix: str) -> str:
    """A client id for a new attacker or user: ``prefix``, else ``prefix-2``, ``prefix-3``, ...

    The first candidate that has no query counted at ``api`` is returned, so the ids are
    deterministic for a given history and an attack's queries never mix with earlier ones.
    """
    prefix = _check_client(prefix)
    candidate, k = prefix, 1
    while api.queries_used(candidate) > 0:
        k += 1
        candidate = f"{prefix}-{k}"
    return candidate
