"""Energy-score baseline (Liu, Wang, Owens, Li, NeurIPS 2020), zero-shot (no fine-tuning).

The free energy of a query under the victim's logits ``f(x)`` at temperature ``T`` is::

    E(x) = -T * logsumexp_k(f_k(x) / T)

It is *lower* for in-distribution inputs (large logits), so the suspicion score is ``E(x)``
itself: larger energy = more suspicious. ``T = 1`` is the authors' default.

The energy needs the **logits**: with only the output probabilities ``p``, the best one can
feed is ``log p``, whose ``logsumexp`` is ``log sum p = 0`` for every query, i.e. no signal.
The detector therefore needs white-box-ish access to the victim's pre-softmax outputs
(``victim.logits(x)``, which :class:`~sameguard.victim.Victim` provides). The paper's optional
energy-bounded fine-tuning (which needs outlier data) is not implemented here.

Paper: https://arxiv.org/abs/2010.03759 (NeurIPS 2020).
Reference implementation: https://github.com/wetliu/energy_ood.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..api import Detector
from ..evidence.martingale import logsumexp_list
from ..forward_memo import no_grad
from ..training import predict_in_batches
from ..validation import check_images, check_int, check_positive
from .victim_output import VictimOutputArtifact
from ._common import ParamsMixin, victim_image_shape

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

__all__ = ["EnergyDetector", "energy_score"]


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The free energy ``E = -T * logsumexp(logits / T)`` per row (pure function).

    Args:
        logits: ``(N, K)`` pre-softmax outputs.
        temperature: ``T > 0``.

    Returns:
        ``(N,)`` float32; larger = more suspicious (lower energy = in-distribution).
    """
    check_positive(temperature, "temperature")
    z = torch.as_tensor(logits)
    if z.dim() != 2 or z.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, K), got {tuple(z.shape)}.")
    if z.shape[0] == 1 and not z.requires_grad and z.device.type == "cpu":
        # A guarded single-image request: the same formula on Python floats, without several tensor
        # operations' dispatch
        values = [v / temperature for v in z[0].tolist()]
        energy = math.nan if any(math.isnan(v) for v in values) else -temperature * logsumexp_list(values)
        return torch.from_numpy(np.array([energy], dtype=np.float32))
    z = z.to(torch.float64)
    return (-temperature * torch.logsumexp(z / temperature, dim=1)).to(torch.float32)


class EnergyDetector(VictimOutputArtifact, ParamsMixin, Detector):
    """Score = the energy ``-T * logsumexp(f(x) / T)`` of the victim's logits. Stateless.

    Needs: the victim's logits (``"white-box"``): a victim with a ``logits(x) -> (N, K)``
    method, such as :class:`~sameguard.victim.Victim`. No extra data, no training.

    Args:
        temperature: ``T`` (authors' default 1).
        batch_size: queries per call to the victim while scoring.
    """

    NEEDS: frozenset[str] = frozenset({"white-box"})
    KIND: ClassVar[str] = "energy-detector"

    def __init__(self, *, temperature: float = 1.0, batch_size: int = 512) -> None:
        self.temperature = temperature
        self.batch_size = batch_size
        check_positive(temperature, "temperature")
        check_int(batch_size, "batch_size")
        self.logits_fn_: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.image_shape_: tuple[int, int, int] | None = None
        self.threshold_ = None
        self.calibration_fpr_ = None

    def is_fitted(self) -> bool:
        return self.logits_fn_ is not None

    def fit(self, victim: Any) -> Self:
        """Attach ``victim``, which must expose ``logits(x)``: ``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, K)``."""
        logits_fn = getattr(victim, "logits", None)
        if not callable(logits_fn):
            raise ValueError(
                f"EnergyDetector needs the victim's logits: pass a victim with a logits(x) method (a "
                f"sameguard.victim.Victim), got {type(victim).__name__}. With probabilities only, "
                "log-probabilities have logsumexp 0 and the energy carries no signal."
            )
        self.logits_fn_ = logits_fn
        self.image_shape_ = victim_image_shape(victim)
        sha = getattr(victim, "weights_sha256", None)
        self.victim_sha256_ = sha if isinstance(sha, str) else None
        self.threshold_ = None
        self.calibration_fpr_ = None
        return self

    def score_victim_outputs(self, victim: Any, x: torch.Tensor, probabilities: torch.Tensor) -> list[float] | None:
        """:meth:`score` of ``x`` when ``victim`` is the very victim whose logits this detector reads
        (``None`` otherwise), as a list of ``N`` Python floats (float32 values): ``victim.logits(x)`` in one
        call, which inside a guarded request is the forward pass the guard already ran
        (:mod:`sameguard.forward_memo`), then the energy. A victim whose ``logits`` a service wrapped (dynamic
        batching: the wrapper's ``__wrapped__`` is this detector's function) is asked through the wrapper,
        which holds the request's rows."""
        logits_fn = getattr(victim, "logits", None)
        if self.logits_fn_ is None or (logits_fn != self.logits_fn_ and
                                       getattr(logits_fn, "__wrapped__", None) != self.logits_fn_):
            return None
        return self._energies(x, logits_fn).tolist()

    @no_grad
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 energies of ``x`` ``(N, C, H, W)`` in ``[-1, 1]``; larger = more suspicious."""
        self._check_fitted()
        x = check_images(x, self.image_shape_)
        return predict_in_batches(self._energies, x, self.batch_size)

    def _energies(self, b: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``(N,)`` energies of one batch ``b`` from the victim's logits (``logits_fn``, by default the
        fitted victim's), their shape checked."""
        logits = torch.as_tensor((logits_fn or self.logits_fn_)(b)).detach().cpu()
        if logits.dim() != 2 or len(logits) != len(b):
            raise ValueError(f"The victim's logits have shape {tuple(logits.shape)}; expected ({len(b)}, K).")
        return energy_score(logits, self.temperature)
