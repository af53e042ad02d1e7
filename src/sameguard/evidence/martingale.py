"""Power-mixture test martingales over a client's p-values, in log space.

A test martingale starts at 1 and multiplies, at each query, by a betting function ``g(p) >= 0``
with ``∫_0^1 g(p) dp = 1``; with the power bet ``g_ε(p) = ε p^(ε-1)`` (``0 < ε < 1``) it grows when
p-values are small, i.e. when queries look suspicious (Vovk, Nouretdinov and Gammerman, *Testing
exchangeability on-line*, ICML 2003; Volkhonskiy, Burnaev, Nouretdinov, Gammerman and Vovk,
*Inductive conformal martingales for change-point detection*, PMLR 60, 2017). The mixture is the
average over a grid of ``ε``, itself a test martingale. Three statistics are offered, each per ``ε``
then averaged over the grid:

- ``"ville"``: the martingale ``M_n = Π g(p_i)``. If a client's p-values are independent and
  (super-)uniform, Ville's inequality gives ``P(sup_n M_n >= 1/δ) <= δ``: this client is **ever**
  alarmed with probability at most ``δ``, however long it queries.
- ``"cusum"``: ``R_n = max(1, R_{n-1}) g(p_n)`` with ``R_0 = 1``; and ``"shiryaev-roberts"``:
  ``R_n = (1 + R_{n-1}) g(p_n)`` with ``R_0 = 0``. Both react fast when a client turns from benign
  to attacking, but under the null they do reach any threshold eventually; their guarantee is on
  the average run length to a false alarm: for Shiryaev–Roberts ``R_n - n`` is a martingale, so the
  expected number of queries before ``R_n >= 1/δ`` is at least ``1/δ``, and CUSUM never exceeds
  Shiryaev–Roberts on the same bets, so the same bound holds (Vovk, *Testing randomness online*,
  arXiv 1906.09256). Averaging over ``ε`` (or over detectors) keeps ``R_n - n`` a martingale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..validation import check_choice, check_fraction, check_int
from .compiled import kernels

__all__ = ["MODES", "P_FLOOR", "MixtureMartingale", "default_epsilons", "log_mean_exp", "log_power_bet",
           "logsumexp_list"]

#: Statistics offered by :class:`MixtureMartingale`.
MODES = ("ville", "cusum", "shiryaev-roberts")
#: p-values are clipped to ``[P_FLOOR, 1]`` before betting (a bet on p = 0 would be infinite).
P_FLOOR = 1e-12


def default_epsilons(size: int = 20) -> torch.Tensor:
    """``(size,)`` float64 midpoints of ``size`` equal cells of (0, 1): 0.025, 0.075, ..., 0.975 for 20.

    Equal weights on these points are the midpoint-rule approximation of Vovk's simple mixture
    ``∫_0^1 ε p^(ε-1) dε``; any grid gives a valid test martingale (an average of test martingales).
    Why a uniform grid: when a client's p-values have ``E[-log p] = L``, the single power bet that
    grows fastest is ``ε = 1/L``. Conformal p-values are never below ``1/(m+1)`` (``m`` calibration
    scores), so with ``m <= 10^5`` even a blatant attacker has ``L <= 12.5``, an optimum ``ε >= 0.08``,
    which the grid covers with several points; mild shifts (``L`` slightly above 1) want ``ε`` near
    1, also covered. A grid denser towards 0 buys nothing at these p-values. Mixing costs at most
    ``log(size)`` nats against the best grid point in hindsight.
    """
    size = check_int(size, "size", minimum=1)
    return (torch.arange(size, dtype=torch.float64) + 0.5) / size


def log_power_bet(p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``log(ε p^(ε-1))`` for every p-value and every ``ε``.

    Args:
        p: ``(..., N)`` p-values in [0, 1], clipped to ``[1e-12, 1]``.
        eps: ``(G,)`` bets in (0, 1).

    Returns:
        ``(..., N, G)`` float64 log bets. Unclipped, each ``g_ε`` integrates to 1 over p in [0, 1];
        the clip lowers the integral to ``1 - (1 - ε) 1e-12^ε <= 1`` (a supermartingale, still
        valid for Ville's inequality; it only matters for p below 1e-12).
    """
    log_p = p.to(torch.float64).clamp(P_FLOOR, 1.0).log().unsqueeze(-1)
    eps = eps.to(torch.float64)
    return torch.log(eps) + (eps - 1.0) * log_p


class MixtureMartingale:
    """An equal-weight mixture of power test martingales (or CUSUM / Shiryaev–Roberts statistics).

    The object holds no client data: a client's state is the ``(G,)`` float64 tensor of the log
    statistic per ``ε`` (``log M``, or ``log R``), made by :meth:`initial_state` and advanced by
    :meth:`update`. Every method also accepts leading batch dimensions (many clients at once).

    Args:
        epsilons: the number ``G`` of grid points of :func:`default_epsilons` (default 20, see there
            for the choice), or the ``ε`` values themselves, each in (0, 1).
        mode: ``"ville"`` (the mixture martingale; ``P(ever >= 1/δ) <= δ`` for a benign client),
            ``"cusum"`` or ``"shiryaev-roberts"`` (fast reaction to a change; the guarantee is an
            average run length of at least ``1/δ`` queries before a false alarm). See the module
            docstring.
    """

    def __init__(self, epsilons: int | Sequence[float] = 20, mode: str = "ville") -> None:
        self.mode = check_choice(mode, "mode", MODES)
        if isinstance(epsilons, int) and not isinstance(epsilons, bool):
            self.epsilons = default_epsilons(check_int(epsilons, "epsilons", minimum=1))
        else:
            if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, (Sequence, torch.Tensor)) \
                    or len(epsilons) == 0:
                raise ValueError(f"epsilons must be a positive integer or a non-empty sequence of numbers "
                                 f"in (0, 1), got {epsilons!r}.")
            values = [float(e) if isinstance(e, torch.Tensor) else e for e in epsilons]
            values = [check_fraction(e, "each epsilon", include_low=False, include_high=False) for e in values]
            self.epsilons = torch.tensor(values, dtype=torch.float64)

    @property
    def size(self) -> int:
        """Number ``G`` of grid points."""
        return self.epsilons.numel()

    def initial_state(self) -> torch.Tensor:
        """``(G,)`` float64 log statistic at the start: ``log 1 = 0`` (``log 0 = -inf`` for Shiryaev–Roberts)."""
        fill = float("-inf") if self.mode == "shiryaev-roberts" else 0.0
        return torch.full((self.size,), fill, dtype=torch.float64)

    def log_value(self, state: torch.Tensor) -> torch.Tensor:
        """Log of the mixture of a state ``(..., G)``: ``logsumexp - log G``, shape ``(...)``."""
        return torch.logsumexp(state, dim=-1) - math.log(self.size)

    def update(self, state: torch.Tensor, p_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance a state by ``N`` p-values, in order.

        Args:
            state: ``(..., G)`` float64 log statistic per ``ε``.
            p_values: ``(..., N)`` p-values in [0, 1] (not NaN), oldest first, ``N >= 0``.

        Returns:
            ``(new_state, log_evidence)``: the ``(..., G)`` state after the last p-value, and the
            ``(..., N)`` float64 natural log of the mixture after each p-value, so the caller can
            tell at which query a threshold was first crossed.
        """
        state = self._check_state(state)
        p = self._check_p(p_values)
        bets = log_power_bet(p, self.epsilons)                                   # (..., N, G)
        if bets.shape[-2] == 0:
            return state.clone(), torch.empty(bets.shape[:-1], dtype=torch.float64)
        if self.mode == "ville":
            path = state.unsqueeze(-2) + bets.cumsum(dim=-2)
        elif self.mode == "cusum":
            path = _cusum_path(state, bets)
        else:
            path = _shiryaev_roberts_path(state, bets)
        return path[..., -1, :].clone(), self.log_value(path)

    def update_array(self, state: np.ndarray, p_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`update` on NumPy arrays without checks: ``advance(state, p_values)[:2]``."""
        new, log_paths, _ = self.advance(state, p_values)
        return new, log_paths

    def advance(self, state: np.ndarray, p_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`update` of several sources on NumPy arrays, without checks, plus their combination: the
        per-request path of the monitor, one compiled call
        (:func:`~sameguard.evidence.martingale_kernel.advance`).

        Same formulas as :meth:`update`, in float64, one p-value after another; the results agree with it
        to rounding (``exp`` and ``log`` may differ in the last bit, and :meth:`update` sums the bets
        before adding them to the state).

        Args:
            state: ``(S, G)`` float64 log statistic per source and ``ε``.
            p_values: ``(S, N)`` float64 p-values in [0, 1], ``N >= 1``, oldest first (not checked).

        Returns:
            ``(new_state (S, G), log_evidence (S, N), combined (N,))``: the first two as in :meth:`update`,
            and the log of the average of the ``S`` mixtures after each p-value.
        """
        kernel = kernels("martingale_kernel")
        log_eps, eps_minus_1 = self._bet_arrays()
        sources, n = p_values.shape
        new = np.empty((sources, self.size), dtype=np.float64)
        log_paths = np.empty((sources, n), dtype=np.float64)
        combined = np.empty(n, dtype=np.float64)
        kernel.advance(np.ascontiguousarray(state, dtype=np.float64), np.ascontiguousarray(p_values, dtype=np.float64),
                       log_eps, eps_minus_1, kernel.MODE_CODES[self.mode], P_FLOOR, new, log_paths, combined)
        return new, log_paths, combined

    def _bet_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(log ε, ε - 1)`` as ``(G,)`` float64 arrays, computed once per grid."""
        cached = getattr(self, "_bets", None)
        if cached is None or cached[0] is not self.epsilons:
            eps = self.epsilons.to(torch.float64)
            cached = (self.epsilons, torch.log(eps).numpy(), (eps - 1.0).numpy())
            self._bets = cached
        return cached[1], cached[2]

    def _check_state(self, state: object) -> torch.Tensor:
        if not isinstance(state, torch.Tensor) or state.dim() < 1 or state.shape[-1] != self.size:
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must be a tensor of shape (..., {self.size}) (one log value per epsilon), "
                             f"got {shape}.")
        return state.to(torch.float64)

    @staticmethod
    def _check_p(p_values: object) -> torch.Tensor:
        if not isinstance(p_values, torch.Tensor) or p_values.dim() < 1:
            raise ValueError("p_values must be a tensor of shape (..., N) of p-values in [0, 1].")
        p = p_values.detach().to("cpu", torch.float64)
        if p.numel() and (bool(torch.isnan(p).any()) or float(p.min()) < 0.0 or float(p.max()) > 1.0):
            raise ValueError("p_values must lie in [0, 1] and not be NaN; got values outside that range.")
        return p


def _cusum_path(state: torch.Tensor, bets: torch.Tensor) -> torch.Tensor:
    """``log R_n = b_n + max(0, log R_{n-1})`` for n = 1..N, without a Python loop.

    With ``W_n = max(0, log R_n)`` and ``S_n = b_1 + ... + b_n`` (``S_0 = 0``) this is Lindley's
    recursion ``W_n = max(0, W_{n-1} + b_n)``, solved by ``W_n = S_n - min(-W_0, S_1, ..., S_n)``.
    Shapes: state ``(..., G)``, bets ``(..., N, G)``, result ``(..., N, G)``.
    """
    w0 = state.clamp(min=0.0).unsqueeze(-2)                                      # (..., 1, G)
    s = bets.cumsum(dim=-2)
    running_min = torch.cat([-w0, s], dim=-2).cummin(dim=-2).values              # (..., N + 1, G)
    w = torch.cat([torch.zeros_like(w0), s], dim=-2) - running_min               # W_0 .. W_N
    return bets + w[..., :-1, :]


def _shiryaev_roberts_path(state: torch.Tensor, bets: torch.Tensor) -> torch.Tensor:
    """``log R_n = b_n + log(1 + R_{n-1})`` for n = 1..N, without a Python loop.

    Unrolled, ``R_n = e^{S_n} (R_0 + Σ_{k=0}^{n-1} e^{-S_k})``, so
    ``log R_n = S_n + logcumsumexp(log(R_0 + 1), -S_1, ..., -S_{N-1})_{n-1}``.
    Shapes: state ``(..., G)``, bets ``(..., N, G)``, result ``(..., N, G)``.
    """
    s = bets.cumsum(dim=-2)
    first = torch.logaddexp(state, torch.zeros_like(state)).unsqueeze(-2)       # log(1 + R_0)
    terms = torch.cat([first, -s[..., :-1, :]], dim=-2)
    return s + terms.logcumsumexp(dim=-2)


def logsumexp_list(values: Sequence[float]) -> float:
    """``log Σ exp(v)`` of ``n >= 1`` floats other than NaN, on Python floats (``-inf`` when all are
    ``-inf``, ``+inf`` when one is)."""
    top = max(values)
    if not math.isfinite(top):
        return top
    return top + math.log(math.fsum([math.exp(v - top) for v in values]))


def log_mean_exp(values: Sequence[float]) -> float:
    """``log((1/n) Σ exp(v))`` of ``n >= 1`` floats: the log of the average of martingales given by
    their logs (``-inf`` when all are ``-inf``, ``+inf`` when one is)."""
    return logsumexp_list(values) - math.log(len(values))
