"""Dynamic batching: concurrent requests share one forward pass of the victim and of the detector.

Each request still runs :meth:`Guard.protect <sameguard.guard.Guard.protect>` on its own thread,
so its API key, rate limits, audit rows and per-client decisions (policy, alarms, query counts)
are exactly those of an unbatched request. What is shared is the models' work: the victim's
``logits`` and the detector's ``score`` are wrapped by a :class:`DynamicBatcher`, which holds a
call for at most ``max_wait_s`` while other threads' calls arrive, runs the function once on the
concatenated images (at most about ``max_batch`` of them) and hands each caller its own rows, as
Ray Serve's ``@serve.batch`` and Triton's dynamic batcher do. The models are deterministic per
image (no batch statistics, no random masks at scoring), so each caller's rows equal an
unbatched call's up to float rounding (~1e-7).

A call of ``max_batch`` images or more runs alone, at once. If the shared call fails, each
caller's images are run again on their own, so one request's failure stays its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

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
    queued or ``max_wait_s`` has passed, takes every queued call, runs ``fn`` once and splits the
    result by rows; the others wait for their rows. ``fn`` must return a tensor whose first
    dimension is the number of images, row ``i`` depending on image ``i`` only.

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
        self.stats = {"calls": 0, "batches": 0, "images": 0}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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
            with self._lock:
                calls, self._queue, self._queued = self._queue, [], 0
            self._run(calls)
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
                if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != sum(sizes):
                    raise ValueError(f"{self.name or 'the batched function'} returned "
                                     f"{tuple(getattr(out, 'shape', ()))} for {sum(sizes)} images")
                for c, part in zip(calls, torch.split(out, sizes)):
                    c.result = part
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


def batch_guard(guard: Any, *, max_batch: int = 64, max_wait_s: float = 0.002) -> dict[str, DynamicBatcher]:
    """Batch ``guard``'s victim (``logits``) and detector (``score``) across concurrent requests, in place.

    Per instance: the objects' classes, weights and versions are untouched. A stateful detector
    (``observe(x, client)``) is not batched (its state is per client). Returns the batchers by
    name (``"victim"``, ``"detector"``) for their :attr:`~DynamicBatcher.stats`;
    :func:`unbatch_guard` undoes it.
    """
    from ..api import StatefulDetector

    batchers: dict[str, DynamicBatcher] = {}
    victim, detector = guard.victim, guard.detector
    if callable(getattr(victim, "logits", None)) and "logits" not in vars(victim):
        batchers["victim"] = DynamicBatcher(victim.logits, max_batch=max_batch, max_wait_s=max_wait_s, name="victim")
        victim.logits = batchers["victim"]
    if detector is not None and not isinstance(detector, StatefulDetector) and "score" not in vars(detector) \
            and callable(getattr(detector, "score", None)):
        batchers["detector"] = DynamicBatcher(detector.score, max_batch=max_batch, max_wait_s=max_wait_s,
                                              name="detector")
        detector.score = batchers["detector"]
    logger.info("Dynamic batching of %s: at most %d images, %.1f ms wait", ", ".join(batchers) or "nothing",
                max_batch, 1000 * max_wait_s)
    return batchers


def unbatch_guard(guard: Any) -> None:
    """Undo :func:`batch_guard`."""
    for obj, attr in ((guard.victim, "logits"), (guard.detector, "score")):
        if obj is not None and isinstance(vars(obj).get(attr), DynamicBatcher):
            del obj.__dict__[attr]
