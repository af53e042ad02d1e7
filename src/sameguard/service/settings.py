"""The service's settings: one validated, typed object (pydantic v2), from arguments or the environment.

Every field can be set as an environment variable ``SAMEGUARD_<FIELD>`` (upper case), e.g.
``SAMEGUARD_DB_URL=postgresql+psycopg://...`` or ``SAMEGUARD_POW_SECRET=<hex>``; explicit
arguments win. Secrets (the proof-of-work HMAC key, the admin token) come from the environment
only and never appear in ``repr`` or logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["ServiceSettings", "ENV_PREFIX", "SERVICE_POLICIES", "parse_name_dirs"]

ENV_PREFIX = "SAMEGUARD_"
#: ``off`` serves the bare victim (no detector, no scoring); the others are action policies.
SERVICE_POLICIES = ("off", "monitor", "reject", "misinformation", "pow")


def parse_name_dirs(items: list[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` -> ``{NAME: DIR}`` (``ValueError`` for a malformed or repeated item)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.strip().partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"expected NAME=DIR, got {item!r}")
        if name.strip() in out:
            raise ValueError(f"the scorer {name.strip()!r} is given twice")
        out[name.strip()] = folder.strip()
    return out


class ServiceSettings(BaseModel):
    """Settings of :func:`~sameguard.service.create_app`.

    Attributes:
        victim: folder of a saved :class:`~sameguard.victim.Victim`.
        detector: folder of a saved detector (e.g. SAME); required unless ``policy="off"``.
        policy: ``off``, ``monitor`` (default), ``reject``, ``misinformation`` or ``pow``.
        db_url: SQLAlchemy URL of the keys and audit database (default SQLite ``sameguard.db``).
        output: ``probabilities`` (default) or ``labels`` served to clients.
        threshold: overrides the detector's calibrated threshold.
        device: torch device for the models.
        max_request_bytes: largest request body accepted (413 beyond; default 8 MiB).
        max_batch: most images per request (413 beyond; default 256).
        rate_per_second, rate_burst: per-key image (query) limit (see :mod:`.ratelimit`; default
            50/s, burst 256).
        request_rate_per_second, request_burst: per-key request limit, charged for every request
            of a key, valid or not (default 10/s, burst 20). The defaults are set from the measured
            capacity of one worker (``docs/service.md``, "Rate limits"): one key alone cannot take
            more than a fraction of it.
        state_url: where rate limits, proof-of-work challenges, key revocations and per-client
            alarm state live: ``memory://`` (default, one process) or ``redis://HOST:PORT/DB``
            (shared by every worker and host using it).
        state_prefix: prefix of every Redis key the service writes (default ``sameguard:``).
        workers: worker processes ``sameguard serve`` starts (more than 1 needs a shared ``state_url``).
        worker_sockets: how ``workers`` processes take connections: ``balanced`` (default) gives each
            its own listening socket on the port (``SO_REUSEPORT``: the kernel deals new connections
            out among them; Linux only, elsewhere ``shared``) and has each worker close, after their next
            response, the keep-alive connections it holds beyond its share; ``reuse-port`` the sockets
            alone; ``shared``, uvicorn's way, has every worker accept from one socket, and a burst of
            connections can all land on one worker.
        engine: what serves the app: ``uvicorn`` (default; ``workers`` processes on one host) or
            ``ray`` (a Ray Serve deployment of ``ray_replicas`` replicas, see :mod:`.ray_engine`).
        ray_replicas: replicas of the Ray Serve deployment (more than 1 needs a shared ``state_url``);
            with ``ray_max_replicas`` the autoscaler's lower bound.
        ray_max_replicas: with a value above ``ray_replicas``, Ray Serve autoscales the replicas
            between the two on the requests in flight (``None``: a fixed number).
        ray_replica_cpus: CPUs Ray reserves for each replica (fractions allowed).
        ray_max_ongoing_requests: requests a replica handles at once (Ray's own default, 5, would
            leave the dynamic batcher little to batch; default 64).
        ray_address: the Ray cluster to deploy to (``auto``: the one this host belongs to,
            ``ray://HOST:10001``: a remote one); ``None`` starts a local Ray instance.
        batch_max_size, batch_max_wait_ms: dynamic batching of concurrent requests
            (:mod:`.batching`): at most this many images share one forward pass of the victim and
            of the detector, and a request waits at most this long for others (``0``: off).
            Applies to the guard the service loads itself (default 64 images, 2 ms).
        pow_benign_bits, pow_bits_per_spread, pow_max_bits, pow_quantile: the proof-of-work map
            (see :class:`~sameguard.actions.ProofOfWork`).
        pow_ttl_s: seconds a challenge stays valid (default 120).
        pow_secret: HMAC key for challenges (environment only; random per process when unset).
        misinformation_nu: steepness of the misinformation switch (default 1e4, the authors').
        calibration: benign images for the proof-of-work calibration: a ``.npy`` file, a folder
            of PNGs, or ``dataset:NAME[:SPLIT]`` (default: the victim's dataset, test split).
        calibration_limit: at most this many calibration images (default 1000).
        key_cache_s: seconds a verified key is cached (revocation delay; default 5).
        host, port: where ``sameguard serve`` listens (default 127.0.0.1:8000).
        torch_threads: torch intra-op threads (``None``: torch's default).
        compile: compile the victim's and the detectors' networks with ``torch.compile`` at start-up
            (:mod:`sameguard.compilation`; needs a C compiler with the default backend, and tens of
            seconds per worker before it answers).
        compile_backend: ``torch.compile``'s backend (default ``inductor``).
        gc_freeze: at start-up, move every object then alive to the garbage collector's permanent
            generation (:func:`gc.freeze`), so that full collections, which stop every request thread,
            skip the models and libraries (default ``True``; ``serve --no-gc-freeze``).
        alarms: folder of per-client alarms (``sameguard alarms calibrate``); once a client's
            evidence reaches ``1/delta`` every later query of it gets the policy's action.
        alarm_detectors: scorer name -> detector folder, overriding (or completing) the folders
            recorded next to the alarms (``detectors.json``); as a string ``NAME=DIR[,NAME=DIR]``.
        admin_token_env: name of the environment variable that holds the operator's token for the
            ``/v1/admin`` routes (at least 16 bytes); unset: the admin routes answer 403.
        artifact_key: HMAC key that authenticates artifact folders (``SAMEGUARD_ARTIFACT_KEY``,
            at least 16 bytes; see :mod:`sameguard.artifact_auth`).
        artifact_digests: pinned folder digests, comma-separated hex (``sameguard artifacts digest``).
        require_authenticated_artifacts: refuse to start unless the victim, the detector and the
            alarms are each signed with ``artifact_key`` or pinned.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    victim: Path | None = None
    detector: Path | None = None
    policy: Literal["off", "monitor", "reject", "misinformation", "pow"] = "monitor"
    db_url: str = "sqlite:///sameguard.db"
    output: Literal["probabilities", "labels"] = "probabilities"
    threshold: float | None = None
    device: str = "cpu"
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_batch: int = Field(256, gt=0)
    rate_per_second: float = Field(50.0, gt=0)
    rate_burst: int = Field(256, gt=0)
    request_rate_per_second: float = Field(10.0, gt=0)
    request_burst: int = Field(20, gt=0)
    state_url: str = Field("memory://", pattern=r"^(memory://|redis://|rediss://|unix://)", repr=False)
    state_prefix: str = Field("sameguard:", pattern=r"^[A-Za-z0-9_.:{}-]{1,64}$")
    workers: int = Field(1, ge=1, le=64)
    worker_sockets: Literal["balanced", "reuse-port", "shared"] = "balanced"
    engine: Literal["uvicorn", "ray"] = "uvicorn"
    ray_replicas: int = Field(1, ge=1, le=1024)
    ray_max_replicas: int | None = Field(None, ge=1, le=1024)
    ray_replica_cpus: float = Field(1.0, gt=0, le=512)
    ray_max_ongoing_requests: int = Field(64, ge=1, le=100_000)
    ray_address: str | None = Field(None, min_length=1)
    batch_max_size: int = Field(64, ge=1, le=4096)
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    pow_benign_bits: int = Field(12, ge=0, le=64)
    pow_bits_per_spread: float = Field(4.0, gt=0)
    pow_max_bits: int = Field(26, ge=0, le=64)
    pow_quantile: float = Field(0.99, gt=0.5, lt=1.0)
    pow_ttl_s: float = Field(120.0, gt=0)
    pow_secret: SecretStr | None = None
    misinformation_nu: float = Field(1e4, gt=0)
    calibration: str | None = None
    calibration_limit: int = Field(1000, gt=1)
    key_cache_s: float = Field(5.0, ge=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    torch_threads: int | None = Field(None, gt=0)
    compile: bool = False
    compile_backend: str = Field("inductor", pattern=r"^[A-Za-z0-9_]{1,64}$")
    gc_freeze: bool = True
    alarms: Path | None = None
    alarm_detectors: dict[str, Path] = Field(default_factory=dict)
    admin_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    artifact_key: SecretStr | None = Field(None, repr=False)
    artifact_digests: str = Field("", pattern=r"^([0-9a-fA-F]{64}(,[0-9a-fA-F]{64})*)?$")
    require_authenticated_artifacts: bool = False

    @field_validator("alarm_detectors", mode="before")
    @classmethod
    def _parse_alarm_detectors(cls, v: Any) -> Any:
        """``"a=dir1,b=dir2"`` (the environment's form) -> ``{"a": "dir1", "b": "dir2"}``."""
        if isinstance(v, str):
            return parse_name_dirs([part for part in v.split(",") if part.strip()])
        return v

    def admin_token(self, environ: dict[str, str] | None = None) -> SecretStr | None:
        """The admin token from the variable named by :attr:`admin_token_env` (``None`` when unset).

        Raises:
            ValueError: the variable is named but unset, or holds fewer than 16 bytes.
        """
        if self.admin_token_env is None:
            return None
        value = (os.environ if environ is None else environ).get(self.admin_token_env)
        if value is None or len(value.strip().encode()) < 16:
            raise ValueError(f"The admin token variable {self.admin_token_env} must be set to at least 16 bytes "
                             "(e.g. 64 hex characters).")
        return SecretStr(value.strip())

    def artifact_trust(self) -> Any:
        """The :class:`~sameguard.artifact_auth.ArtifactTrust` that artifacts are loaded under."""
        from ..artifact_auth import ArtifactTrust

        key = self.artifact_key.get_secret_value().strip().encode() if self.artifact_key is not None else None
        pinned = frozenset(d for d in self.artifact_digests.split(",") if d)
        return ArtifactTrust(key=key or None, pinned=pinned, required=self.require_authenticated_artifacts)

    @field_validator("pow_secret", "artifact_key")
    @classmethod
    def _secret_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().encode()) < 16:
            raise ValueError("the secret must be at least 16 bytes long (e.g. 64 hex characters).")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.workers > 1 and self.state_url.startswith("memory"):
            raise ValueError(
                f"{self.workers} workers need a shared state store: with state_url memory:// each worker keeps its "
                "own rate limits, proof-of-work challenges and key revocations, so N workers would let N times the "
                "burst through, refuse solutions of challenges another worker issued and accept replays. Start "
                "Redis and pass --state redis://HOST:6379/0 (SAMEGUARD_STATE_URL), or run one worker")
        if self.engine == "ray":
            if self.workers > 1:
                raise ValueError(f"workers ({self.workers}) are uvicorn processes: with the ray engine set the "
                                 "number of Ray Serve replicas instead (--ray-replicas N)")
            if self.ray_max_replicas is not None and self.ray_max_replicas < self.ray_replicas:
                raise ValueError(f"ray_max_replicas ({self.ray_max_replicas}) must be at least ray_replicas "
                                 f"({self.ray_replicas}), the autoscaler's lower bound")
            most = max(self.ray_replicas, self.ray_max_replicas or 1)
            if most > 1 and self.state_url.startswith("memory"):
                raise ValueError(
                    f"{most} Ray Serve replicas need a shared state store: with state_url memory:// each replica "
                    "keeps its own rate limits, proof-of-work challenges and key revocations, so N replicas would "
                    "let N times the burst through, refuse solutions of challenges another replica issued and "
                    "accept replays. Start Redis and pass --state redis://HOST:6379/0 (SAMEGUARD_STATE_URL), or "
                    "run one replica")
        if self.pow_benign_bits > self.pow_max_bits:
            raise ValueError(f"pow_benign_bits ({self.pow_benign_bits}) must not exceed pow_max_bits "
                             f"({self.pow_max_bits}).")
        return self

    def to_env(self) -> dict[str, str]:
        """The settings as ``SAMEGUARD_*`` variables that :meth:`from_env` reads back to equal settings
        (unset optional fields are left out; secrets are included: hand them only to child processes)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
                if not value:
                    continue
            env[ENV_PREFIX + name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Settings from ``SAMEGUARD_*`` variables, with ``overrides`` (``None`` values ignored) on top.

        Raises:
            ValueError: a value does not validate; the message names the field.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"Invalid service settings: {problems}.") from None
