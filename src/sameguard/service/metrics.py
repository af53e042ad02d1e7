"""The service's Prometheus metrics, in the app's own registry (served at ``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from .gc_pauses import GCPauseTimer

__all__ = ["ServiceMetrics", "CONTENT_TYPE_LATEST"]

#: Latency histogram buckets, in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Garbage collection pause buckets, in seconds.
GC_PAUSE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServiceMetrics:
    """Requests, latency, queries by action, flagged queries and proof-of-work outcomes.

    Attributes:
        registry: the app's own collector registry (several apps in one process do not collide).
        requests: ``sameguard_http_requests_total{method, route, status}``.
        latency: ``sameguard_http_request_seconds{route}``.
        queries: ``sameguard_queries_total{action}``, one per image decided.
        flagged: ``sameguard_flagged_queries_total``.
        pow: ``sameguard_pow_challenges_total{outcome}`` (``issued``, ``redeemed``, or why refused).
        alarms: ``sameguard_alarms_total``, per-client alarms raised.
        alarms_cleared: ``sameguard_alarms_cleared_total``, alarms cleared by an operator.
        alarm_refused: ``sameguard_alarm_refused_queries_total``, queries refused because their
            client is alarmed.
        connections_shed: ``sameguard_connections_shed_total``, responses answered with ``Connection:
            close`` because this worker held more than its share of the keep-alive connections
            (:mod:`~sameguard.service.connection_balance`, ``serve --workers N``).
        gc_pauses: ``sameguard_gc_pause_seconds{generation}``, this process's garbage collections and
            how long each stopped every thread (while :meth:`watch_gc` is on: the app's lifetime).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sameguard_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("sameguard_http_request_seconds", "HTTP request latency in seconds", ["route"],
                                 registry=self.registry, buckets=LATENCY_BUCKETS)
        self.queries = Counter("sameguard_queries", "Queries (images) decided, by action", ["action"],
                               registry=self.registry)
        self.flagged = Counter("sameguard_flagged_queries", "Queries flagged by the detector", registry=self.registry)
        self.pow = Counter("sameguard_pow_challenges", "Proof-of-work challenges by outcome", ["outcome"],
                           registry=self.registry)
        self.alarms = Counter("sameguard_alarms", "Per-client alarms raised", registry=self.registry)
        self.alarms_cleared = Counter("sameguard_alarms_cleared", "Per-client alarms cleared by an operator",
                                      registry=self.registry)
        self.alarm_refused = Counter("sameguard_alarm_refused_queries",
                                     "Queries refused because their client is alarmed", registry=self.registry)
        self.connections_shed = Counter("sameguard_connections_shed", "Responses that closed their keep-alive "
                                        "connection to even out the workers' connections", registry=self.registry)
        self.gc_pauses = Histogram("sameguard_gc_pause_seconds", "Garbage collections of this process by generation, "
                                   "and how long each stopped every thread", ["generation"], registry=self.registry,
                                   buckets=GC_PAUSE_BUCKETS)
        self._gc_timer = GCPauseTimer(lambda generation, seconds: self.gc_pauses.labels(str(generation)).observe(seconds))

    def watch_gc(self) -> None:
        """Time every garbage collection of this process into :attr:`gc_pauses` (a :data:`gc.callbacks` hook)."""
        self._gc_timer.start()

    def unwatch_gc(self) -> None:
        """Stop :meth:`watch_gc`."""
        self._gc_timer.stop()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_decisions(self, decisions: Iterable[Any]) -> None:
        """Count a batch's :class:`~sameguard.guard.Decision` s by action, the flagged ones, and those
        refused because the client is alarmed."""
        n_flagged = n_alarm_refused = 0
        for d in decisions:
            self.queries.labels(d.action).inc()
            n_flagged += bool(d.flagged)
            n_alarm_refused += bool(getattr(d, "alarmed", False)) and d.action == "reject"
        if n_flagged:
            self.flagged.inc(n_flagged)
        if n_alarm_refused:
            self.alarm_refused.inc(n_alarm_refused)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (media type :data:`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)
