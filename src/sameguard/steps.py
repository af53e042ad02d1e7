"""One log line per step of a long run, with the time elapsed since the run started.

The benchmark runner and the demo take minutes; a progress bar shows the inside of one step on a
terminal, while :class:`StepLog` says which step finished, so a piped or logged run (``make demo |
tee log``) is never silent for long::

    [  12.3 s] victim conv3: trained in 12.1 s, test accuracy 0.8956
    [ 301.0 s] attack jbda: 1000 queries, substitute accuracy 0.7012, fidelity 0.7290

The lines go to the ``sameguard.steps`` logger at INFO; the command line shows that logger on
standard error by default (plain lines, no timestamp), and the rest of the library's log only with
``-v``.
"""

from __future__ import annotations

import logging
import time

__all__ = ["STEP_LOGGER", "StepLog"]

#: Name of the logger that carries the step lines.
STEP_LOGGER = "sameguard.steps"


class StepLog:
    """A clock started on construction; calling it logs ``[elapsed s] message`` at INFO.

    Args:
        logger: where the lines go (default: the ``sameguard.steps`` logger).

    It is also a ``Callable[[str], None]``, so it can stand wherever an ``echo`` function is taken.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger(STEP_LOGGER)
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        """Log ``message`` prefixed with the elapsed time, e.g. ``[  12.3 s] victim conv3: trained``."""
        self.logger.info("[%7.1f s] %s", self.elapsed, message)
