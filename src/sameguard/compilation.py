"""``torch.compile`` for a served victim and its detectors, in place (``sameguard serve --compile``).

What it does: :meth:`torch.nn.Module.compile` on the victim's network and on every fitted network of
each detector (the attributes ending in ``_`` that are modules: SAME's masked auto-encoder and
auxiliary classifier, for instance), then one warm-up call per batch size in ``warm_up_batches`` so
that compilation happens at start-up, not in a client's request. ``Module.compile`` compiles the
module's call and keeps the module itself: its parameters, its ``state_dict`` and therefore every
weight hash (the audit's model versions, the alarms' calibration check) stay as they were.

Batch sizes: the first call compiles for its exact shape; a call with another batch size makes
PyTorch compile again with the batch dimension dynamic (its "automatic dynamic shapes"), and its
convolutions set sizes 2-15 apart from larger ones, so the default warm-up, batches of 1, 2 and 64,
compiles three graphs per network that serve every batch size (checked up to 300 with
``TORCH_LOGS=recompiles``: no further compilation).

Measured (``docs/service.md``, "Inference options"): in process, at fixed batch sizes, the inductor
backend saves 14-22 % of SAME's and the guard's time; in the service on two CPU cores, behind dynamic
batching and beside the client threads, the compiled workers answered fewer requests than the eager
ones (0.45-0.88x), so ``serve`` compiles only when asked. Compiling costs tens of seconds to minutes
per process at start-up and needs a C compiler. Outputs differ from eager ones by float rounding
only (``python -m sameguard.bench.inference_options`` reports the largest difference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .api import StatefulDetector
from .artifacts import fitted_networks

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BACKEND", "compile_networks"]

#: ``torch.compile``'s backend unless one is named (``serve --compile-backend``).
DEFAULT_BACKEND = "inductor"


def compile_networks(victim: Any, detectors: Iterable[Any] = (), *, backend: str = DEFAULT_BACKEND,
                     warm_up_batches: Sequence[int] = (1, 2, 64)) -> list[str]:
    """Compile the victim's network and the detectors' fitted networks in place, then warm them up.

    Args:
        victim: a :class:`~sameguard.victim.Victim` (its ``model``, called by ``predict_proba``).
        detectors: fitted detectors; each network is compiled once even when shared. Stateful
            detectors (PRADA, VarDetect) are compiled but not warmed up (scoring would add to a
            client's history); their first request compiles them.
        backend: ``torch.compile``'s backend (``inductor``; ``aot_eager`` compiles without a C
            compiler, faster to build and slower to run).
        warm_up_batches: batch sizes of the warm-up calls, each ``>= 1`` (zero images in the
            victim's shape).

    Returns:
        What was compiled, e.g. ``["victim.model", "SAMEDetector.aux_", "SAMEDetector.reconstructor_"]``.

    Raises:
        ValueError: ``victim`` has no network or a warm-up batch size is not positive.
        Exception: whatever ``torch.compile`` raises at the warm-up (a missing C compiler, say).
    """
    model = getattr(victim, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"Only a victim with a torch network can be compiled, not a {type(victim).__name__}.")
    sizes = [int(b) for b in warm_up_batches]
    if any(b < 1 for b in sizes):
        raise ValueError(f"warm_up_batches must be positive batch sizes, got {list(warm_up_batches)}.")
    start = time.perf_counter()
    seen: set[int] = set()
    compiled: list[str] = []

    def compile_once(module: torch.nn.Module, label: str) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            module.compile(backend=backend)
            compiled.append(label)

    compile_once(model, "victim.model")
    warm = []
    for detector in detectors:
        networks = fitted_networks(detector)
        for name, module in networks.items():
            compile_once(module, f"{type(detector).__name__}.{name}")
        if networks and not isinstance(detector, StatefulDetector):
            warm.append(detector)
    with torch.no_grad():
        for b in sizes:
            x = torch.zeros(b, *victim.image_shape)
            victim.predict_proba(x)
            for detector in warm:
                detector.score(x)
    logger.info("Compiled %s with torch.compile (backend %s) and warmed up at batch sizes %s in %.1f s.",
                ", ".join(compiled), backend, sizes, time.perf_counter() - start)
    return compiled
