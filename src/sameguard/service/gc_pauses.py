"""The garbage collector in a served model's process: freezing the start-up objects, timing collections.

A full (generation 2) collection walks every tracked object of the process, and a served model's process
holds millions (PyTorch, NumPy, FastAPI, the networks): each took about 0.2 s on the in-process service
benchmark, during which no request thread runs, and the requests in flight then made the p99
(docs/service.md, "Garbage collection pauses"). The service freezes what start-up loaded
(:func:`freeze_startup_objects`) and times every collection for ``/metrics``; ``sameguard bench-service``
times them per row. Both timings go through one :class:`GCPauseTimer`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

__all__ = ["GCPauseTimer", "freeze_startup_objects"]


def freeze_startup_objects() -> int:
    """Move every object alive now (the models, the libraries, the app) to the garbage collector's permanent
    generation (:func:`gc.freeze`, constant time); returns how many there are.

    Later collections skip frozen objects. They are still freed by reference counting; only cycles among
    them wait for :func:`gc.unfreeze` (the service calls it at shutdown).
    """
    gc.freeze()
    return gc.get_freeze_count()


class GCPauseTimer:
    """Calls ``on_pause(generation, seconds)`` after each garbage collection of this process, while started
    (a :data:`gc.callbacks` hook; also a context manager that starts and stops it).

    A collection runs with the GIL held from its ``"start"`` callback to its ``"stop"``: the two calls of one
    never interleave with another's, whatever thread triggered it, so one start time suffices.
    """

    def __init__(self, on_pause: Callable[[int, float], Any]) -> None:
        self.on_pause = on_pause
        self._started: float | None = None

    def start(self) -> None:
        if self.hook not in gc.callbacks:
            gc.callbacks.append(self.hook)

    def stop(self) -> None:
        if self.hook in gc.callbacks:
            gc.callbacks.remove(self.hook)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hook(self, phase: str, info: dict[str, Any]) -> None:
        """The :data:`gc.callbacks` entry."""
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:  # a collection already running when the timer started is skipped
            self.on_pause(int(info.get("generation", -1)), time.perf_counter() - self._started)
            self._started = None
