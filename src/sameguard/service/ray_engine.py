"""The Ray Serve engine: ``sameguard serve --engine ray`` runs the service as a Ray Serve deployment.

Each replica of the deployment builds the service's own FastAPI app with
:func:`~sameguard.service.app.create_app` from the same settings as ``sameguard serve`` (passed to
it as ``SAMEGUARD_*`` values) and serves it through ``@serve.ingress``, so the routes, API keys,
rate limits, proof-of-work, per-client alarms, audit rows and errors are those of the uvicorn
engine. Ray Serve brings the rest: the HTTP proxy on every node, routing of requests to the
replicas, replica placement over the hosts of a Ray cluster, health checks and restarts, and
autoscaling between ``ray_replicas`` and ``ray_max_replicas``.

What the replicas share is what uvicorn workers share: the state store (``state_url``: Redis for
more than one replica, which :class:`~.settings.ServiceSettings` enforces) and the database
(``db_url``). One proof-of-work HMAC key is drawn here when none is set, so that every replica
signs and checks challenges alike.

Batching: each replica batches concurrent requests with the service's own
:class:`~sameguard.service.batching.DynamicBatcher` (``batch_max_size`` images, ``batch_max_wait_ms``),
exactly as a uvicorn worker does, rather than with ``@serve.batch``: the guard runs each request on
a thread of the app, the batcher counts images rather than calls, runs a large request alone,
and isolates a failing request, and it is the batcher whose per-request results the tests compare
with unbatched ones. A replica takes up to ``ray_max_ongoing_requests`` requests at once (Ray's
default of 5 would leave it little to batch).

Ray's HTTP proxy differs from uvicorn in two visible details: it gives a request without an
``X-Request-ID`` one of its own (the service then records it as the client's request id, beside
its own), and its answers carry Ray's ``X-Request-ID`` header after the service's.

This module imports Ray; :func:`require_ray` says what to install when it is missing.
"""

from __future__ import annotations

import logging
import re
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

from ..api import SameguardError
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = [
    "APP_NAME",
    "RayEngineError",
    "build_application",
    "deploy",
    "deployment_options",
    "replica_env",
    "require_ray",
    "serve_with_ray",
]

#: The name of the Ray Serve application (``serve status``, ``serve.delete``).
APP_NAME = "sameguard"
#: The oldest Ray this engine runs on (replicas build their app in ``__serve_build_asgi_app__``).
MIN_RAY = (2, 60)
#: The extra that installs Ray Serve.
RAY_INSTALL_HINT = "pip install 'sameguard[ray]'"


class RayEngineError(SameguardError):
    """The Ray Serve deployment could not be started."""


def require_ray() -> None:
    """Raise :class:`~.commands.MissingDependencyError` (one sentence: what to install) unless
    ``ray.serve`` imports."""
    import importlib.util

    from .commands import MissingDependencyError

    if importlib.util.find_spec("ray") is None:
        raise MissingDependencyError(f"--engine ray needs Ray Serve, which is not installed: {RAY_INSTALL_HINT}.")
    try:
        import ray.serve  # binds ray too
    except ImportError as exc:
        raise MissingDependencyError(f"--engine ray needs Ray Serve, which could not be imported ({exc}): "
                                     f"{RAY_INSTALL_HINT}.") from None
    found = tuple(int(part) for part in re.findall(r"\d+", ray.__version__)[:2])
    if found < MIN_RAY:
        raise MissingDependencyError(f"--engine ray needs Ray {MIN_RAY[0]}.{MIN_RAY[1]} or newer (late-bound "
                                     f"@serve.ingress apps), found {ray.__version__}: pip install -U "
                                     "'sameguard[ray]'.")


def _absolute(path: str | Path | None) -> str | None:
    """``path`` made absolute when it names an existing file or folder (replicas may run elsewhere)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def _absolute_sqlite(url: str) -> str:
    """A SQLite URL with a relative file path made absolute (a replica's working folder is Ray's)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or not database or database == ":memory:" \
            or database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(database).resolve())).render_as_string(hide_password=False)


def replica_env(settings: ServiceSettings) -> dict[str, str]:
    """The settings as ``SAMEGUARD_*`` values for the replicas.

    Relative artifact paths and SQLite files are made absolute, and a random proof-of-work HMAC
    key is drawn when none is set, so that every replica signs challenges with the same one. The
    values include the secrets: they travel to the replicas as the deployment's arguments, inside
    the Ray cluster.
    """
    changes: dict[str, Any] = {
        "victim": _absolute(settings.victim), "detector": _absolute(settings.detector),
        "alarms": _absolute(settings.alarms), "db_url": _absolute_sqlite(settings.db_url),
        "alarm_detectors": {name: _absolute(folder) for name, folder in settings.alarm_detectors.items()},
    }
    if settings.calibration is not None and not settings.calibration.startswith("dataset:"):
        changes["calibration"] = _absolute(settings.calibration)
    env = settings.model_copy(update={k: v for k, v in changes.items() if v is not None}).to_env()
    if settings.pow_secret is None:
        env["SAMEGUARD_POW_SECRET"] = secrets.token_hex(32)
    return env


def deployment_options(settings: ServiceSettings) -> dict[str, Any]:
    """The Ray Serve deployment options of ``settings``: a fixed number of replicas, or autoscaling
    between ``ray_replicas`` and ``ray_max_replicas``; CPUs per replica; requests in flight per replica."""
    options: dict[str, Any] = {"max_ongoing_requests": settings.ray_max_ongoing_requests,
                               "ray_actor_options": {"num_cpus": settings.ray_replica_cpus}}
    if settings.ray_max_replicas is not None and settings.ray_max_replicas > settings.ray_replicas:
        options["autoscaling_config"] = {"min_replicas": settings.ray_replicas,
                                         "initial_replicas": settings.ray_replicas,
                                         "max_replicas": settings.ray_max_replicas}
    else:
        options["num_replicas"] = settings.ray_replicas
    return options


def _ingress_class() -> Any:
    """The deployment class (defined on first use: it needs ``ray.serve``)."""
    global _INGRESS
    if _INGRESS is None:
        from ray import serve

        @serve.ingress()
        class SameguardIngress:
            """One replica: the service's FastAPI app, built from the settings in ``env``."""

            def __init__(self, env: dict[str, str]) -> None:
                from sameguard.service.app import create_app  # absolute: the class is pickled by value

                self._app = create_app(ServiceSettings.from_env(environ=dict(env)))

            def __serve_build_asgi_app__(self) -> Any:
                return self._app

        _INGRESS = SameguardIngress
    return _INGRESS


_INGRESS: Any = None


def build_application(settings: ServiceSettings) -> Any:
    """The Ray Serve application (``Deployment.bind(...)``) of ``settings``, ready for ``serve.run``."""
    from ray import serve

    deployment = serve.deployment(_ingress_class(), name="SameguardIngress", **deployment_options(settings))
    return deployment.bind(replica_env(settings))


def deploy(settings: ServiceSettings, *, log_level: str = "info") -> Any:
    """Start Serve's HTTP proxy on ``settings.host:settings.port`` and deploy the service; return once
    every replica is up (its models loaded), with the application's handle.

    Ray must be initialised (``ray.init``); :func:`serve_with_ray` does it from ``settings.ray_address``.

    Raises:
        RayEngineError: the replicas failed to start (the reason from the replica's error).
    """
    from ray import serve

    logging_config = {"log_level": log_level.upper(), "enable_access_log": False}
    serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=logging_config)
    try:
        return serve.run(build_application(settings), name=APP_NAME, route_prefix="/", logging_config=logging_config)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise RayEngineError(f"the Ray Serve replicas of {APP_NAME} did not start: {reason}") from exc


def serve_with_ray(settings: ServiceSettings, *, log_level: str = "info", ready: Any = None) -> None:
    """``sameguard serve --engine ray``: join (``ray_address``) or start a local Ray instance, deploy,
    and serve until interrupted (Ctrl-C or ``SIGTERM``); then delete the application (and stop Serve
    and Ray when they were started here).

    Args:
        settings: the service settings (``engine="ray"``).
        log_level: the replicas' log level.
        ready: called with no argument once the deployment answers (the CLI prints its banner).
    """
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address=settings.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, docker stop) stops cleanly
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        deploy(settings, log_level=log_level)
        if ready is not None:
            ready()
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        logger.info("Stopping: deleting the Ray Serve application %s", APP_NAME)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            serve.delete(APP_NAME)
        except Exception as exc:  # noqa: BLE001 - nothing more to do on the way out
            logger.warning("Could not delete the Ray Serve application %s: %s", APP_NAME, exc)
        if started:
            if settings.ray_address is None:
                serve.shutdown()
            ray.shutdown()
