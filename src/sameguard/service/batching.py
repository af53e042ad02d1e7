"""Dynamic batching: concurrent requests share one forward pass of the victim and of the detector.

Each request still runs :meth:`Guard.protect <sameguard.guard.Guard.protect>` on its own thread,
so its API key, rate limits, audit rows and per-client decisions (policy, alarms, query counts)
are exactly those of an unbatched request. What is shared is the models' work, through a
:class:`DynamicBatcher`, which holds a call for at most ``max_wait_s`` while other threads' calls
arrive, runs the function once on the concatenated images (at most about ``max_batch`` of them)
and hands each caller its own rows, as Ray Serve's ``@serve.batch`` and Triton's dynamic batcher
do. A guard with a (per-query) detector is batched *jointly*: the victim's ``logits`` and the
detector's ``score`` of the concatenation (and those of the per-client alarms' scorers that run
networks of their own) are computed in one shared call, in which the detectors reuse the victim's
logits (:mod:`sameguard.forward_memo`), so a request waits for one round and the victim runs once
per image; the request's own ``detector.score(x)`` then finds its rows. The
models are deterministic per image (no batch statistics, no random masks at scoring), so each
caller's rows equal an unbatched call's up to float rounding (~1e-7).

A call of ``max_batch`` images or more runs alone, at once. If the shared call fails, each
caller's images are run again on their own, so one request's failure stays its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..forward_memo import memoized, remember, shared_forward

logger = logging.getLogger(__name__)

__all__ = ["DynamicBatcher", "batch_guard", "unbatch_guard"]


class _Call:
    __slots__ = ("x", "done", "result", "error")

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class DynamicBatcher:
    """Merge concurrent calls ``fn(x)`` (``x``: ``(N, ...)`` tensors) into one call on ``torch.cat``.

    The first caller of a round becomes its *leader*: it waits until ``max_batch`` images are
    queued or ``max_wait_s`` has passed, and until the previous round's shared call has finished
    (one shared call at a time, as Ray Serve's ``max_concurrent_batches=1``: the calls that arrive
    meanwhile join this round instead of starting small rounds of their own), takes every queued
    call, runs ``fn`` once per ``max_batch`` images of them and splits the result by rows; the
    others wait for their rows. ``fn``
    must return a tensor whose first dimension is the number of images, row ``i`` depending on
    image ``i`` only, or a tuple of such tensors (each caller gets the tuple of its rows).

    Args:
        fn: the function to batch (e.g. ``detector.score``).
        max_batch: images in a shared call (a call at least this large runs alone).
        max_wait_s: longest a call waits for others (``0``: no batching, ``fn`` is called directly).
        name: for the log and :attr:`stats`.

    Attributes:
        stats: ``{"calls", "batches", "images"}`` so far (``calls / batches`` is the mean batch, in calls).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 64, max_wait_s: float = 0.002,
                 name: str = "") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch!r}.")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be non-negative, got {max_wait_s!r}.")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.name = name
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._queued = 0
        self._full = threading.Event()
        self._running = threading.Lock()  # held by the leader whose shared call runs
        self.stats = {"calls": 0, "batches": 0, "images": 0}

    def __call__(self, x: torch.Tensor) -> Any:
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 0
        if self.max_wait_s <= 0 or n == 0 or n >= self.max_batch:
            return self.fn(x)
        call = _Call(x)
        with self._lock:
            leader = not self._queue
            if leader:
                self._full.clear()
            self._queue.append(call)
            self._queued += n
            if self._queued >= self.max_batch:
                self._full.set()
        if leader:
            self._full.wait(self.max_wait_s)
            with self._running:
                with self._lock:
                    calls, self._queue, self._queued = self._queue, [], 0
                for part in _rounds(calls, self.max_batch):  # more than max_batch queued during a long run
                    self._run(part)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _run(self, calls: list[_Call]) -> None:
        sizes = [int(c.x.shape[0]) for c in calls]
        with self._lock:
            self.stats["calls"] += len(calls)
            self.stats["batches"] += 1
            self.stats["images"] += sum(sizes)
        try:
            if len(calls) == 1:
                calls[0].result = self.fn(calls[0].x)
            else:
                out = self.fn(torch.cat([c.x for c in calls]))
                parts = out if isinstance(out, tuple) else (out,)
                for part in parts:
                    if not isinstance(part, torch.Tensor) or part.dim() == 0 or part.shape[0] != sum(sizes):
                        raise ValueError(f"{self.name or 'the batched function'} returned "
                                         f"{tuple(getattr(part, 'shape', ()))} for {sum(sizes)} images")
                rows = list(zip(*(torch.split(part, sizes) for part in parts)))
                for c, own in zip(calls, rows):
                    c.result = own if isinstance(out, tuple) else own[0]
        except BaseException as exc:  # noqa: BLE001 - each caller gets its own outcome below
            if len(calls) == 1:
                calls[0].error = exc
            else:
                logger.warning("A shared call of %s failed (%s); running its %d calls one by one", self.name,
                               exc, len(calls))
                for c in calls:
                    try:
                        c.result = self.fn(c.x)
                    except BaseException as own:  # noqa: BLE001
                        c.error = own
        finally:
            for c in calls:
                c.done.set()


def _rounds(calls: list[_Call], max_batch: int) -> list[list[_Call]]:
    """``calls`` in order, cut into shared calls of at most ``max_batch`` images each (a call is never
    split; every call queued here is smaller than ``max_batch``)."""
    rounds: list[list[_Call]] = []
    images = max_batch
    for c in calls:
        n = int(c.x.shape[0])
        if images + n > max_batch:
            rounds.append([])
            images = 0
        rounds[-1].append(c)
        images += n
    return rounds


_inside = threading.local()  # .depth > 0 on a thread running a joint batch (its nested calls go straight through)


class _JointForward:
    """The function a joint batcher runs: the victim's logits and the scores of each detector of one batch,
    the detectors reusing the victim's forward pass (one :func:`~sameguard.forward_memo.shared_forward`)."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor],
                 scores: list[Callable[[torch.Tensor], Any]]) -> None:
        self.logits, self.scores = logits, scores

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            with torch.no_grad(), shared_forward():
                return (self.logits(x), *(torch.as_tensor(score(x)) for score in self.scores))
        finally:
            _inside.depth -= 1


class _BatchedLogits:
    """``victim.logits`` of a jointly batched guard: the request's rows of the shared call; the request's
    detector scores are left in its :func:`~sameguard.forward_memo.shared_forward` for each detector's
    :class:`_BatchedScore`. Inside the shared call itself (a detector asking the victim), the victim's own
    ``logits``."""

    def __init__(self, batcher: DynamicBatcher, logits: Callable[[torch.Tensor], torch.Tensor],
                 score_keys: list[_BatchedScore]) -> None:
        self.batcher, self.logits, self.score_keys = batcher, logits, score_keys
        self.__wrapped__ = logits  # what a scorer of this victim's logits (Energy) recognises

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(_inside, "depth", 0):
            return self.logits(x)
        return memoized((self,), x, lambda: self._shared(x))  # once per request, whoever asks

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        logits, *scores = self.batcher(x)
        for key, rows in zip(self.score_keys, scores):
            remember((key,), x, rows)
        return logits


class _BatchedScore:
    """``score`` of a jointly batched detector: the rows the request's victim call brought back with its
    logits, else (another tensor, or outside a request) the detector's own ``score``."""

    def __init__(self, score: Callable[[torch.Tensor], Any]) -> None:
        self.score = score

    def __call__(self, x: torch.Tensor) -> Any:
        if getattr(_inside, "depth", 0):
            return self.score(x)
        return memoized((self,), x, lambda: self.score(x))


def _network_scorers(guard: Any) -> list[Any]:
    """What a joint batch scores: the guard's per-query detector, then its alarms' other scorers that run
    networks of their own (not MSP and Energy, which read the victim's outputs of the request); none when
    the guard has no per-query detector to batch."""
    from ..api import StatefulDetector

    def batchable(d: Any) -> bool:
        return not isinstance(d, StatefulDetector) and "score" not in vars(d) and callable(getattr(d, "score", None))

    if guard.detector is None or not batchable(guard.detector):
        return []
    found = [guard.detector]
    for d in [] if guard.alarms is None else guard.alarms.scorers.values():
        if batchable(d) and not callable(getattr(d, "score_victim_outputs", None)) and all(d is not f for f in found):
            found.append(d)
    return found


def batch_guard(guard: Any, *, max_batch: int = 64, max_wait_s: float = 0.002) -> dict[str, DynamicBatcher]:
    """Batch ``guard``'s victim (``logits``) and detector (``score``) across concurrent requests, in place.

    Per instance: the objects' classes, weights and versions are untouched. With a per-query detector
    they are batched jointly (one shared call computes both, the victim once per image; see the module
    documentation), together with the per-client alarms' scorers that run networks of their own (a
    second SAME, Mahalanobis, ...; MSP and Energy read the victim's outputs of the request); with no
    detector, or a stateful one (``observe(x, client)``, its state is per client), the victim alone.
    Returns the batcher by name (``"guard"`` joint, or ``"victim"``) for its
    :attr:`~DynamicBatcher.stats`; :func:`unbatch_guard` undoes it.
    """
    victim = guard.victim
    if not callable(getattr(victim, "logits", None)) or "logits" in vars(victim):
        logger.info("Dynamic batching of nothing: the victim has no logits(x) to batch, or is batched already.")
        return {}
    detectors = _network_scorers(guard)
    if detectors:
        batcher = DynamicBatcher(_JointForward(victim.logits, [d.score for d in detectors]), max_batch=max_batch,
                                 max_wait_s=max_wait_s, name="guard")
        wrappers = [_BatchedScore(d.score) for d in detectors]
        victim.logits = _BatchedLogits(batcher, victim.logits, wrappers)
        for d, wrapper in zip(detectors, wrappers):
            d.score = wrapper
        batchers = {"guard": batcher}
    else:
        batchers = {"victim": DynamicBatcher(victim.logits, max_batch=max_batch, max_wait_s=max_wait_s, name="victim")}
        victim.logits = batchers["victim"]
    logger.info("Dynamic batching of the %s: at most %d images, %.1f ms wait",
                f"victim and {len(detectors)} detector(s) together" if detectors else "victim", max_batch,
                1000 * max_wait_s)
    return batchers


def unbatch_guard(guard: Any) -> None:
    """Undo :func:`batch_guard`."""
    scorers = [] if guard.alarms is None else list(guard.alarms.scorers.values())
    for obj, attr in ((guard.victim, "logits"), (guard.detector, "score"), *((d, "score") for d in scorers)):
        if obj is not None and isinstance(vars(obj).get(attr), (DynamicBatcher, _BatchedLogits, _BatchedScore)):
            del obj.__dict__[attr]
