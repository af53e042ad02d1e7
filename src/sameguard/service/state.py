"""Everything the endpoints use, in one typed object: :class:`ServiceState` (``app.state.sameguard``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import SecretStr

from ..guard import Guard
from .alarm_log import AlarmLedger, ledger_store
from .audit import AuditLog
from .challenges import ChallengeIssuer
from .db import init_db, make_engine
from .keys import KeyStore
from .metrics import ServiceMetrics
from .ratelimit import RateLimiter
from .settings import ServiceSettings
from .store import ServiceStore, open_store

logger = logging.getLogger(__name__)

__all__ = ["ServiceState", "build_state"]


@dataclass
class ServiceState:
    """The service's parts, built once per app by :func:`build_state`.

    Attributes:
        settings: the validated settings.
        guard: victim + detector + policy; :meth:`~sameguard.guard.Guard.protect` decides each batch.
        keys: API keys (hashed) in the database.
        audit: the append-only audit log, written on the request path before anything is answered.
        issuer: proof-of-work challenges (held in ``store``).
        limiter: per-key request and image limits (counted in ``store``).
        metrics: the Prometheus metrics.
        classes: the victim's class names, when it has them.
        admin_token: the operator's token for the ``/v1/admin`` routes (``None``: they are disabled).
        alarm_ledger: the per-client alarms already written to the audit log.
        store: the state store (:mod:`.store`) of rate limits, challenges, revocations and
            per-client alarm state: in memory, or Redis shared by several workers.
    """

    settings: ServiceSettings
    guard: Guard
    keys: KeyStore
    audit: AuditLog
    issuer: ChallengeIssuer
    limiter: RateLimiter
    metrics: ServiceMetrics
    classes: list[str] | None
    admin_token: SecretStr | None = None
    alarm_ledger: AlarmLedger = field(default_factory=AlarmLedger)
    store: ServiceStore | None = None


def build_state(settings: ServiceSettings, *, guard: Guard | None = None,
                issuer: ChallengeIssuer | None = None) -> ServiceState:
    """Load the guard (unless given), open the database (creating its tables) and build the parts.

    Args:
        settings: the service settings.
        guard: a ready guard, used as given; by default loaded from ``settings.victim`` and
            ``settings.detector`` (:func:`~sameguard.service.loading.load_guard`) and batched
            across concurrent requests (:func:`~sameguard.service.batching.batch_guard`, unless
            ``settings.batch_max_wait_ms`` is 0).
        issuer: a challenge issuer; by default one keyed by ``settings.pow_secret`` (a random key
            when unset) with ``settings.pow_ttl_s``.
    """
    admin_token = settings.admin_token()  # fails early when the named variable is unset
    store = open_store(settings.state_url, prefix=settings.state_prefix)
    if guard is None:
        from .loading import load_guard

        guard = load_guard(settings, store=store)
        if settings.batch_max_wait_ms > 0:
            from .batching import batch_guard

            batch_guard(guard, max_batch=settings.batch_max_size, max_wait_s=settings.batch_max_wait_ms / 1000)
    engine = make_engine(settings.db_url)
    init_db(engine)
    if issuer is None:
        secret = settings.pow_secret.get_secret_value().encode() if settings.pow_secret is not None else None
        if secret is None and store.shared:
            logger.warning("No SAMEGUARD_POW_SECRET with a shared state store: each worker draws its own HMAC key, "
                           "so a challenge can only be redeemed at the worker that issued it")
        issuer = ChallengeIssuer(secret, ttl_s=settings.pow_ttl_s, store=store)
    if settings.max_batch > settings.rate_burst:
        logger.warning("max_batch (%d) exceeds the rate limit's burst (%d): larger batches will be refused",
                       settings.max_batch, settings.rate_burst)
    classes = getattr(guard.victim, "classes", None)
    limiter = RateLimiter(settings.rate_per_second, settings.rate_burst, settings.request_rate_per_second,
                          settings.request_burst, store=store)
    return ServiceState(settings=settings, guard=guard,
                        keys=KeyStore(engine, cache_s=settings.key_cache_s, store=store),
                        audit=AuditLog(engine, guard.versions), issuer=issuer, limiter=limiter,
                        metrics=ServiceMetrics(), classes=list(classes) if classes is not None else None,
                        admin_token=admin_token, store=store,
                        alarm_ledger=AlarmLedger(ledger_store(store) if store.shared else None))
