"""An online conformal test of exchangeability of one client's own query stream.

For attacks whose single queries look benign: JBDA (Papernot et al., *Practical black-box attacks
against machine learning*, AsiaCCS 2017) and its relatives derive each query from earlier ones by
small Jacobian-sign steps, so a new query is usually much closer to some earlier query of the same
client than natural images are to each other. PRADA (Juuti et al., EuroS&P 2019) uses this signal,
the minimum distance to earlier queries, with a Shapiro–Wilk test and a hand-set threshold. Here the
same signal feeds the online conformal test of exchangeability of Vovk, Nouretdinov and Gammerman
(*Testing exchangeability on-line*, ICML 2003), whose p-values are independent and uniform when the
stream is exchangeable, so a test martingale and Ville's inequality apply with no calibration data.

Definition (exact). Within the current bag ``z_1..z_n`` (the client's queries so far, as flattened
feature vectors), each point's nonconformity is ``α_i = -d_i`` with ``d_i = min_{j <= n, j != i}
dist(z_i, z_j)`` (``+inf`` for a lone point), recomputed for **all** ``i <= n`` when ``z_n`` arrives;
the smoothed p-value of the new query is ``p_n = (#{i <= n : α_i > α_n} + θ_n #{i <= n : α_i = α_n})
/ n`` with ``θ_n`` uniform in (0, 1]. A query close to an earlier one has a small ``d_n``, few points
are closer to their neighbours, so ``p_n`` is small: small = suspicious. Each past ``d_i`` is kept and
lowered when a closer point arrives, so a query costs ``O(n·D)``.

Window. The bag holds at most ``window`` queries; then it is emptied and a new bag starts (blocks of
``window`` queries). This keeps validity exact: an exchangeable stream stays exchangeable given its
earlier blocks, so each block's p-values are i.i.d. uniform given the past and the whole sequence of
p-values is i.i.d. uniform. (Keeping a full bag as a fixed reference instead would make later
p-values dependent through that bag; a sliding window has no such guarantee.) The price: closeness
between queries of different blocks is not used, and the evidence must build up within a block,
which JBDA's seed-then-augment order does early.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..validation import check_choice, check_images, check_int, check_optional_int
from .store import StateFormatError, pack, unpack

__all__ = ["StreamExchangeabilityTest", "StreamState", "stream_p_value", "stream_test"]

_FORMAT = "sameguard-stream-state"
#: Unit roundoff of float32.
_ROUNDING = 2.0 ** -24
#: Squared norms above this skip the screening (its bound assumes no overflow in float32).
_NORM_LIMIT = 1e30


class _Bag:
    """Row storage with spare capacity, shared by the successive states of one client's block.

    Appending a query writes one row past the rows the newest state sees, instead of copying the
    whole bag (``O(D)`` instead of ``O(n·D)`` per query). Only the state that ends at ``length``
    (the newest) may append in place; an older state, or one with no room left, copies into a new
    bag, so no state ever sees its rows change.

    Along with the rows it keeps their squared norms in float64 (``sq``, for the screened nearest
    neighbour search of :meth:`StreamExchangeabilityTest._nearest`), filled as rows are appended.
    """

    __slots__ = ("data", "length", "sq", "max_sq")

    def __init__(self, rows: torch.Tensor, capacity: int) -> None:
        self.data = torch.empty(max(capacity, rows.shape[0]), rows.shape[1], dtype=torch.float32)
        self.data[:rows.shape[0]] = rows
        self.length = rows.shape[0]
        self.sq = np.empty(self.data.shape[0], dtype=np.float64)
        as64 = self.data[:rows.shape[0]].numpy().astype(np.float64)
        self.sq[:rows.shape[0]] = np.einsum("ij,ij->i", as64, as64)
        #: the largest squared norm of the rows written so far (an upper bound for any prefix)
        self.max_sq = float(self.sq[:rows.shape[0]].max()) if rows.shape[0] else 0.0


@dataclasses.dataclass(frozen=True)
class StreamState:
    """One client's bag for :class:`StreamExchangeabilityTest` (treat as immutable).

    Attributes:
        points: ``(n, D)`` float32 feature vectors of the current block's queries, oldest first,
            ``n <= window`` (``D = 0`` before the first query).
        nn_dist: ``(n,)`` float32 distance of each point to its nearest other point in the bag
            (``+inf`` for a lone point).
        seen: number of queries the client has sent in total (all blocks).
    """

    points: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, 0))
    nn_dist: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    seen: int = 0
    # The growable storage ``points`` is a view of (see _Bag); not part of the state's value.
    _bag: _Bag | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_bytes(self) -> bytes:
        """safetensors bytes with a JSON header; no pickle."""
        return pack({"points": self.points, "nn_dist": self.nn_dist}, {"format": _FORMAT, "seen": self.seen})

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamState:
        """Inverse of :meth:`to_bytes` (raises :class:`StateFormatError` on malformed data)."""
        tensors, header = unpack(data, _FORMAT)
        try:
            points, nn_dist, seen = tensors["points"], tensors["nn_dist"], header["seen"]
        except KeyError as exc:
            raise StateFormatError(f"A serialised stream state lacks {exc}.") from None
        if (points.dim() != 2 or nn_dist.shape != (points.shape[0],) or not isinstance(seen, int)
                or seen < points.shape[0]):
            raise StateFormatError("A serialised stream state is inconsistent (shapes or query count).")
        return cls(points.to(torch.float32), nn_dist.to(torch.float32), seen)


def stream_p_value(nn_dist: torch.Tensor, theta: float) -> float:
    """Smoothed conformal p-value of the newest point of a bag, from all NN distances of the bag.

    Args:
        nn_dist: ``(n,)`` current nearest-neighbour distances of the bag, the newest point last.
        theta: tie-breaking uniform in (0, 1].

    Returns:
        ``(#{i: d_i < d_n} + θ #{i: d_i = d_n}) / n`` in (0, 1] (``α = -d``).
    """
    d_new = nn_dist[-1]
    closer = int((nn_dist < d_new).sum())
    ties = int((nn_dist == d_new).sum())
    return (closer + theta * ties) / nn_dist.numel()


class StreamExchangeabilityTest:
    """Per-client conformal p-values that are uniform while the client's stream is exchangeable.

    What it assumes of benign clients: their successive images are exchangeable (e.g. independent
    draws of natural images). Clients whose benign stream is not, such as near-duplicate queries
    (video frames, bursts of crops or edits of one photo, retries of the same image), get small
    p-values and will be alarmed: this is a test of "the order and closeness of this client's
    queries look random", not of "these queries are attacks".

    Args:
        window: most queries in one bag (see the module docstring: the bag restarts empty after
            ``window`` queries, which keeps p-values exactly valid); the state holds at most
            ``window x D`` floats, ``4·window·D`` bytes.
        metric: distance between flattened features, ``"l2"`` or ``"l1"``.
        pool_size: if set, images larger than ``pool_size x pool_size`` are first average-pooled to
            that size (``torch.nn.functional.adaptive_avg_pool2d``) to cut memory and time; ``None``
            keeps every pixel. Any fixed feature map leaves the p-values valid.

    Cost: one query takes ``O(n·D)`` time for a bag of ``n`` points (measured on one CPU core: about
    0.2 ms for ``D = 8`` and 1.5 ms for ``D = 784`` with a full bag of 2000); distances are computed
    from differences, not from a Gram matrix, so each pair's distance is exact and symmetric.
    """

    def __init__(self, window: int = 2000, metric: str = "l2", pool_size: int | None = None) -> None:
        self.window = check_int(window, "window", minimum=2)
        self.metric = check_choice(metric, "metric", ("l2", "l1"))
        self.pool_size = check_optional_int(pool_size, "pool_size", minimum=1)
        #: Compute every distance, without the screening of :meth:`_nearest` (the same results); for tests.
        self._reference = False

    def initial_state(self) -> StreamState:
        """An empty bag."""
        return StreamState()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` finite images (any range) -> ``(N, D)`` float32 CPU feature vectors."""
        x = check_images(x, name="x", check_range=False).detach().to("cpu")
        if self.pool_size is not None and (x.shape[-1] > self.pool_size or x.shape[-2] > self.pool_size):
            x = F.adaptive_avg_pool2d(x, (min(self.pool_size, x.shape[-2]), min(self.pool_size, x.shape[-1])))
        return x.flatten(1).contiguous()

    def update(self, state: StreamState, x: torch.Tensor,
               generator: torch.Generator | None = None,
               theta: torch.Tensor | None = None) -> tuple[StreamState, torch.Tensor]:
        """Add ``N`` queries to a client's bag, in order, and return their p-values.

        Args:
            state: the client's state (not modified).
            x: ``(N, C, H, W)`` finite images of one client, oldest first; every call of one client
                must give the same feature size.
            generator: source of the ``N`` smoothing uniforms (the global generator when ``None``).
            theta: ``(N,)`` the smoothing uniforms in (0, 1] themselves, instead of drawing them.

        Returns:
            ``(new_state, p_values)``, the latter ``(N,)`` float64 in (0, 1], small = suspicious.
        """
        if not isinstance(state, StreamState):
            raise ValueError(f"state must be a StreamState, got {type(state).__name__}.")
        feats = self.features(x)
        if state.points.shape[0] and state.points.shape[1] != feats.shape[1]:
            raise ValueError(f"x has {feats.shape[1]} features per query, but this client's earlier queries had "
                             f"{state.points.shape[1]}; one client's queries must all have one image shape.")
        if theta is None:
            theta = 1.0 - torch.rand(feats.shape[0], generator=generator, dtype=torch.float64)
        elif theta.shape != (feats.shape[0],):
            raise ValueError(f"theta must hold {feats.shape[0]} smoothing uniforms, one per query.")
        points, dists = state.points, state.nn_dist
        if points.shape[0] == 0:
            points, dists = torch.empty(0, feats.shape[1]), torch.empty(0)
        p = torch.empty(feats.shape[0], dtype=torch.float64)
        start = 0
        while start < feats.shape[0]:
            if points.shape[0] >= self.window:  # the block is full: start a new bag
                points, dists = torch.empty(0, feats.shape[1]), torch.empty(0)
            stop = min(feats.shape[0], start + self.window - points.shape[0])
            bag = state._bag if start == 0 and points is state.points else None
            points, dists, p[start:stop], bag = self._extend(points, dists, feats[start:stop], theta[start:stop], bag)
            start = stop
        return StreamState(points, dists, state.seen + feats.shape[0], bag), p

    def _extend(self, points: torch.Tensor, dists: torch.Tensor, new: torch.Tensor, theta: torch.Tensor,
                bag: _Bag | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Bag]:
        """Append ``new`` (k, D) to a bag of ``n0`` points that has room for them; k p-values.

        ``bag`` is the storage ``points`` is a view of, if any: written in place when ``points`` is
        its newest state and it has room, else replaced by a new one with spare capacity.
        """
        n0, k = points.shape[0], new.shape[0]
        if bag is None or bag.length != n0 or bag.data.shape[0] < n0 + k or bag.data.shape[1] != new.shape[1]:
            bag = _Bag(points, min(self.window, max(2 * (n0 + k), 64)))
        bag.length = n0 + k
        buf, buf_array, new_array = bag.data, bag.data.numpy(), new.numpy()
        d_array = np.empty(n0 + k, dtype=np.float32)
        d_array[:n0] = dists.numpy()
        d = torch.from_numpy(d_array)
        p = np.empty(k, dtype=np.float64)
        order = 2.0 if self.metric == "l2" else 1.0
        screen = self.metric == "l2" and not self._reference and _ROUNDING * new.shape[1] < 0.01
        for j in range(k):  # sequential by definition: each p-value uses the bag up to its query
            n = n0 + j
            row = new_array[j].astype(np.float64)
            sq = float(np.dot(row, row))
            if n and not (screen and self._nearest(bag, n, new[j], sq, d_array)):
                dist = torch.linalg.vector_norm(buf[:n] - new[j], ord=order, dim=1)
                d[n] = dist.min()
                torch.minimum(d[:n], dist, out=d[:n])
            elif not n:
                d_array[n] = math.inf
            buf_array[n] = new_array[j]
            bag.sq[n] = sq
            bag.max_sq = max(bag.max_sq, sq)
            d_new = d_array[n]
            # stream_p_value(d[:n + 1], theta), on the array
            p[j] = (int(np.count_nonzero(d_array[:n + 1] < d_new))
                    + float(theta[j]) * int(np.count_nonzero(d_array[:n + 1] == d_new))) / (n + 1)
        return buf[:n0 + k], d, torch.from_numpy(p), bag

    def _nearest(self, bag: _Bag, n: int, new: torch.Tensor, sq: float, d: np.ndarray) -> bool:
        """Lower ``d[:n]`` by the L2 distances of the bag's first ``n`` rows to ``new`` and set ``d[n]`` to
        their minimum, as the reference loop does, computing exact distances for a few rows only.

        One float32 matrix-vector product gives every squared distance ``|a|^2 + |b|^2 - 2 a.b`` up to a
        rigorous rounding bound ``S`` (``γ_D = D u / (1 - D u)`` on the dot product whatever the
        summation order, ``u = 2^-24``, taken twice over, plus the float64 sums' own rounding), and
        each exact distance as the reference computes it lies within a relative ``ρ`` of the true one
        (its own rounding, at most ``γ_{D+3}``, again taken twice over). Only rows that could hold the
        minimum, or come closer than their current nearest-neighbour distance, are computed exactly,
        with the reference's own operation (which gives a row the same bits whatever rows are computed
        with it); every other row provably changes nothing. The result is bit for bit the reference's.

        Args:
            bag: the storage; rows ``[0, n)`` and their squared norms ``bag.sq[:n]`` are set.
            n: the number of earlier points in the bag, ``>= 1``.
            new: ``(D,)`` float32 the new point; ``sq`` its squared norm in float64.
            d: ``(>= n + 1,)`` float32 nearest-neighbour distances, updated in place.

        Returns:
            ``False`` when screening would not pay (too many candidate rows) or the norms are too large
            for the bound; nothing is changed then and the caller computes every distance.
        """
        if not (sq < _NORM_LIMIT and bag.max_sq < _NORM_LIMIT):
            return False
        dim = new.shape[0]
        gamma_dot = _ROUNDING * dim / (1.0 - _ROUNDING * dim)
        rho = 2.0 * _ROUNDING * (dim + 3) / (1.0 - _ROUNDING * (dim + 3))
        slack = 4.0 * gamma_dot * math.sqrt(bag.max_sq * sq) + 4.0 * (dim + 4) * 2.0 ** -53 * (bag.max_sq + sq)
        approx = bag.sq[:n] - 2.0 * torch.mv(bag.data[:n], new).numpy()  # + sq: added to the thresholds
        # row i may hold the minimum iff sqrt(approx_i - S)(1 - ρ) <= min_k sqrt(approx_k + S)(1 + ρ);
        # it may come closer than d_i iff sqrt(approx_i - S)(1 - ρ) < d_i (squares: both sides >= 0)
        widen = ((1.0 + rho) / (1.0 - rho)) ** 2
        for_min = approx <= (float(approx.min()) + sq + slack) * widen + slack - sq
        d_sq = d[:n].astype(np.float64)
        rows = np.flatnonzero(for_min | (approx < d_sq * d_sq / (1.0 - rho) ** 2 + slack - sq))
        if rows.size > max(8, n // 8):
            return False
        index = torch.from_numpy(rows)
        exact = torch.linalg.vector_norm(bag.data[:n].index_select(0, index) - new, ord=2, dim=1).numpy()
        d[n] = exact[for_min[rows]].min()
        d[rows] = np.minimum(d[rows], exact)
        return True


def stream_test(stream: bool | StreamExchangeabilityTest,
                pool_size: int | None = None) -> StreamExchangeabilityTest | None:
    """The stream test a setting asks for: ``stream`` itself when it is one, a new test comparing images
    pooled to ``pool_size`` (``None``: every pixel) when it is ``True``, none when it is ``False``."""
    if isinstance(stream, StreamExchangeabilityTest):
        return stream
    return StreamExchangeabilityTest(pool_size=pool_size) if stream else None
