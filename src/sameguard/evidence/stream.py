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

import numpy as np
import torch

from ..validation import check_choice, check_int, check_optional_int
from .compiled import kernels
from .store import StateFormatError, pack, unpack

__all__ = ["DEFAULT_POOL_SIZE", "DEFAULT_WINDOW", "StreamExchangeabilityTest", "StreamState", "stream_p_value", "stream_test"]

#: The default ``pool_size`` of :class:`StreamExchangeabilityTest` (after 0.3.0; 0.3.0 compared every pixel): images are compared
#: average-pooled to 14 x 14 (``None``: every pixel). On the ``standard`` benchmark's three seeds it
#: alarms JBDA and JBDA-TR as every pixel does, with no benign alarm, at a quarter of the memory per
#: client (README, "The stream test's pooling").
DEFAULT_POOL_SIZE = 14

#: The default ``window`` of :class:`StreamExchangeabilityTest` (after 0.3.0; 0.3.0 had 2000): the bag restarts
#: empty every 1 000 queries of a client. A query's p-value depends only on the queries of its own block, so
#: the first 1 000 p-values of a client are those of any window of at least 1 000: every alarm the
#: ``standard`` benchmark measures (attack streams alarmed within 200 queries, benign clients of 300) is the
#: same as with 2 000. A smaller window halves the state per client (0.8 MB at 14 x 14) and the bag a query
#: is compared with (500 queries on average, instead of 1 000); what it gives up is closeness between
#: queries of different blocks (README, "The price").
DEFAULT_WINDOW = 1000

_NOT_FINITE = "x contains NaN or infinite values; the stream test needs finite images."

_FORMAT = "sameguard-stream-state"


class _Bag:
    """Row storage with spare capacity, shared by the successive states of one client's block.

    Appending a query writes one row past the rows the newest state sees, instead of copying the
    whole bag (``O(D)`` instead of ``O(n·D)`` per query). Only the state that ends at ``length``
    (the newest) may append in place; an older state, or one with no room left, copies into a new
    bag, so no state ever sees its rows change.
    """

    __slots__ = ("array", "data", "length")

    def __init__(self, rows: torch.Tensor, capacity: int) -> None:
        self.data = torch.empty(max(capacity, rows.shape[0]), rows.shape[1], dtype=torch.float32)
        self.array = self.data.numpy()  # the same memory, for the kernel (no conversion per query)
        self.array[:rows.shape[0]] = rows.numpy()  # NumPy's copy: no intra-op threads for a memcpy
        self.length = rows.shape[0]


@dataclasses.dataclass(frozen=True)
class StreamState:
    """One client's bag for :class:`StreamExchangeabilityTest` (treat as immutable).

    Attributes:
        points: ``(n, D)`` float32 feature vectors of the current block's queries, oldest first,
            ``n <= window`` (``D = 0`` before the first query).
        nn_dist: ``(n,)`` float64 distance of each point to its nearest other point in the bag
            (``+inf`` for a lone point).
        seen: number of queries the client has sent in total (all blocks).
    """

    points: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, 0))
    nn_dist: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
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
        return cls(points.to(torch.float32), nn_dist.to(torch.float64), seen)


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
            ``window`` queries, which keeps p-values exactly valid; default :data:`DEFAULT_WINDOW`); the
            state holds at most ``window x D`` floats, ``4·window·D`` bytes.
        metric: distance between flattened features, ``"l2"`` or ``"l1"``.
        pool_size: images larger than ``pool_size x pool_size`` are first average-pooled to that size
            (adaptive average pooling, the cells of ``torch.nn.functional.adaptive_avg_pool2d``) to cut
            memory and time (default :data:`DEFAULT_POOL_SIZE`); ``None`` keeps every pixel. Any fixed
            feature map leaves the p-values valid.

    Cost: one query takes ``O(n·D)`` time for a bag of ``n`` points, in one compiled pass over the bag
    (:mod:`~sameguard.evidence.stream_kernel`; on one CPU core, a bag of 1 500: about 0.05 ms for
    ``D = 49``, images pooled to 7x7, and 0.25 ms for ``D = 784``, every pixel of 28x28). Distances are
    computed from differences in float64, not from a Gram matrix, so each pair's distance is exact to
    float64 rounding and symmetric.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, metric: str = "l2", pool_size: int | None = DEFAULT_POOL_SIZE) -> None:
        self.window = check_int(window, "window", minimum=2)
        self.metric = check_choice(metric, "metric", ("l2", "l1"))
        self.pool_size = check_optional_int(pool_size, "pool_size", minimum=1)

    def initial_state(self) -> StreamState:
        """An empty bag."""
        return StreamState()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` finite images (any range) -> ``(N, D)`` float32 CPU feature vectors."""
        feats = self._features(x)
        if not np.isfinite(feats).all():
            raise ValueError(_NOT_FINITE)
        return torch.from_numpy(feats)

    def _features(self, x: torch.Tensor) -> np.ndarray:
        """:meth:`features` as a NumPy array, without the finiteness check (:meth:`update` checks while it
        appends). Pooling is :func:`~sameguard.evidence.stream_kernel.average_pool`'s."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0 or not torch.is_floating_point(x):
            raise ValueError(f"x must be a non-empty floating-point (N, C, H, W) tensor of images, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                             f"{'' if not isinstance(x, torch.Tensor) else f' of dtype {x.dtype}'}.")
        # no copy for a guarded request's validated images (float32, CPU, contiguous): .to returns them as they are
        images = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        n, channels, height, width = images.shape
        if self.pool_size is None or (width <= self.pool_size and height <= self.pool_size):
            return images.reshape(n, -1)
        out_h, out_w = min(self.pool_size, height), min(self.pool_size, width)
        pooled = np.empty((n, channels * out_h * out_w), dtype=np.float32)
        kernels("stream_kernel").average_pool(images, out_h, out_w, pooled)
        return pooled

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
        new = self._features(x)
        k = new.shape[0]
        if theta is None:
            theta = 1.0 - torch.rand(k, generator=generator, dtype=torch.float64)
        elif not isinstance(theta, torch.Tensor) or theta.shape != (k,):
            raise ValueError(f"theta must be a tensor of {k} smoothing uniforms, one per query.")
        p = np.empty(k, dtype=np.float64)
        state = self._append(state, new, np.ascontiguousarray(theta.detach().to("cpu").numpy(), dtype=np.float64), p)
        return state, torch.from_numpy(p)

    def extend(self, state: StreamState, x: torch.Tensor, theta: np.ndarray, p: np.ndarray) -> StreamState:
        """:meth:`update` for the monitor's per-request path, on NumPy arrays: ``theta`` ``(N,)`` float64
        smoothing uniforms in (0, 1]; the ``N`` p-values are written to ``p`` ``(N,)`` float64 (a view
        the caller owns). Returns the new state."""
        return self._append(state, self._features(x), theta, p)

    def _append(self, state: StreamState, new: np.ndarray, thetas: np.ndarray, p: np.ndarray) -> StreamState:
        """Add the feature rows ``new`` ``(k, D)`` to ``state``'s bag (new blocks as the window fills),
        writing their p-values to ``p``."""
        k, dim = new.shape
        points = state.points
        if points.shape[0] and points.shape[1] != dim:
            raise ValueError(f"x has {dim} features per query, but this client's earlier queries had "
                             f"{points.shape[1]}; one client's queries must all have one image shape.")
        n0, bag = points.shape[0], state._bag
        nn_dist = state.nn_dist
        dists = (nn_dist if nn_dist.dtype == torch.float64 else nn_dist.to(torch.float64)).numpy()
        start = 0
        while start < k:
            if n0 >= self.window:  # the block is full: start a new bag
                n0, bag, dists = 0, None, np.empty(0)
            stop = min(k, start + self.window - n0)
            bag, dists = self._extend(bag, points, n0, dists, new[start:stop], thetas[start:stop], p[start:stop])
            n0 = stop - start + n0
            start = stop
        return StreamState(bag.data[:n0], torch.from_numpy(dists), state.seen + k, bag)

    def _extend(self, bag: _Bag | None, points: torch.Tensor, n0: int, dists: np.ndarray, new: np.ndarray,
                theta: np.ndarray, p: np.ndarray) -> tuple[_Bag, np.ndarray]:
        """Append ``new`` ``(k, D)`` to a bag of ``n0`` points (``dists`` their nearest-neighbour distances) that
        has room for them, writing the k p-values to ``p``; returns the storage and the ``n0 + k`` distances.

        ``bag`` is the storage the bag's rows are in, if any: written in place when the bag is its newest
        state (``bag.length == n0``) and it has room, else the rows (``points``, the state's own) are copied
        into a new storage with spare capacity. The loop over the queries is
        :func:`~sameguard.evidence.stream_kernel.extend_bag`'s (compiled).
        """
        k = new.shape[0]
        if bag is None or bag.length != n0 or bag.array.shape[0] < n0 + k or bag.array.shape[1] != new.shape[1]:
            rows = points[:n0] if n0 else torch.empty(0, new.shape[1])
            bag = _Bag(rows, min(self.window, max(2 * (n0 + k), 64)))
        d = np.empty(n0 + k, dtype=np.float64)
        d[:n0] = dists
        if not kernels("stream_kernel").extend_bag(bag.array, n0, new, d, theta, self.metric == "l2", p):
            raise ValueError(_NOT_FINITE)
        bag.length = n0 + k
        return bag, d


def stream_test(stream: bool | StreamExchangeabilityTest, pool_size: int | None = DEFAULT_POOL_SIZE,
                window: int = DEFAULT_WINDOW) -> StreamExchangeabilityTest | None:
    """The stream test a setting asks for: ``stream`` itself when it is one, a new test comparing images
    pooled to ``pool_size`` (``None``: every pixel) in blocks of ``window`` queries when it is ``True``, none
    when it is ``False``."""
    if isinstance(stream, StreamExchangeabilityTest):
        return stream
    return StreamExchangeabilityTest(window=window, pool_size=pool_size) if stream else None
