"""The per-client record of :class:`~sameguard.evidence.EvidenceMonitor` and its byte format."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .store import StateFormatError, pack, unpack
from .stream import StreamState

__all__ = ["ClientState"]

_FORMAT = "sameguard-client-evidence"


@dataclasses.dataclass(frozen=True)
class ClientState:
    """Everything the monitor keeps about one client (treat as immutable; small and serialisable).

    Attributes:
        queries: queries of this client seen so far (all of them, also before a cleared alarm).
        martingales: detector name -> ``(G,)`` float64 log statistic per ``ε`` of its martingale.
        stream_martingale: ``(G,)`` float64 state of the stream test's martingale, or ``None``.
        stream: the stream test's bag, or ``None`` when the monitor has no stream test.
        alarm_query: 1-based index (in the client's stream) of the query at which the combined
            evidence first reached the threshold since the last cleared alarm; ``None`` if not.
        alarm_time: unix time (seconds) when that alarm was raised, or ``None``.
    """

    queries: int
    martingales: dict[str, torch.Tensor]
    stream_martingale: torch.Tensor | None = None
    stream: StreamState | None = None
    alarm_query: int | None = None
    alarm_time: float | None = None
    # The (S, G) array the monitor's martingale tensors are rows of (detectors in name order, then the
    # stream test), when it made this state; not part of the state's value.
    _stacked: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def stacked_martingales(self) -> np.ndarray:
        """``(S, G)`` float64: the detectors' martingale states in name order, then the stream test's."""
        if self._stacked is not None:
            return self._stacked
        rows = [self.martingales[name] for name in sorted(self.martingales)]
        if self.stream_martingale is not None:
            rows.append(self.stream_martingale)
        return torch.stack(rows).to(torch.float64).numpy()

    def to_bytes(self) -> bytes:
        """safetensors bytes with a JSON header (no pickle), for stores shared between processes."""
        # the monitor's tensors may be rows of one array: pack writes each through NumPy, which copies them
        tensors = {f"martingale/{name}": value for name, value in self.martingales.items()}
        header = {"format": _FORMAT, "queries": self.queries, "detectors": sorted(self.martingales),
                  "alarm_query": self.alarm_query, "alarm_time": self.alarm_time,
                  "stream_seen": None if self.stream is None else self.stream.seen}
        if self.stream_martingale is not None:
            tensors["stream_martingale"] = self.stream_martingale
        if self.stream is not None:
            tensors["stream/points"] = self.stream.points
            tensors["stream/nn_dist"] = self.stream.nn_dist
        return pack(tensors, header)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientState:
        """Inverse of :meth:`to_bytes` (raises :class:`StateFormatError` on malformed data)."""
        tensors, header = unpack(data, _FORMAT)
        try:
            martingales = {name: tensors[f"martingale/{name}"] for name in header["detectors"]}
            stream = None
            if header["stream_seen"] is not None:
                stream = StreamState(tensors["stream/points"].to(torch.float32),
                                     tensors["stream/nn_dist"].to(torch.float64), header["stream_seen"])
            return cls(queries=header["queries"], martingales=martingales,
                       stream_martingale=tensors.get("stream_martingale"), stream=stream,
                       alarm_query=header["alarm_query"], alarm_time=header["alarm_time"])
        except (KeyError, TypeError) as exc:
            raise StateFormatError(f"A serialised client state lacks or mangles {exc}.") from None
