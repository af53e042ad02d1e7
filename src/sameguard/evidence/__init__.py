"""Per-client evidence of extraction with a guaranteed false-alarm rate.

Each detector score becomes a conformal p-value against benign calibration of the query's predicted
class, which is (super-)uniform for a benign query exchangeable with that calibration; a client's
p-values drive power-mixture test martingales, one per detector plus an optional online test of
exchangeability of the client's own stream, and the client's evidence is their average. By Ville's
inequality a benign client whose p-values are independent and (super-)uniform reaches evidence
``1/δ``, and is alarmed, with probability at most ``δ`` however long it queries, so among ``C``
benign clients at most ``δ·C`` false alarms are expected.

Modules: :mod:`.conformal` (p-values), :mod:`.martingale` (betting in log space), :mod:`.stream`
(the JBDA-oriented stream statistic), :mod:`.store` (per-client state storage), :mod:`.state`
(the per-client record) and :mod:`.monitor` (the combination and the latched alarms). The
per-request loops are compiled with Numba (:mod:`.stream_kernel`, :mod:`.monitor_kernel`,
:mod:`.martingale_kernel`, loaded by :mod:`.compiled` on first use).
"""

from .conformal import ConformalCalibrator, conformal_p_values
from .martingale import MODES, MixtureMartingale, default_epsilons, log_power_bet
from .monitor import STREAM_NAME, ClientEvidence, EvidenceMonitor
from .state import ClientState
from .store import InMemoryStore, StateFormatError, StateStore
from .stream import StreamExchangeabilityTest, StreamState, stream_p_value, stream_test

__all__ = [
    "MODES",
    "STREAM_NAME",
    "ClientEvidence",
    "ClientState",
    "ConformalCalibrator",
    "EvidenceMonitor",
    "InMemoryStore",
    "MixtureMartingale",
    "StateFormatError",
    "StateStore",
    "StreamExchangeabilityTest",
    "StreamState",
    "conformal_p_values",
    "default_epsilons",
    "log_power_bet",
    "stream_p_value",
    "stream_test",
]
