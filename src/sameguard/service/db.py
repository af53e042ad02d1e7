"""The service's database: API keys, the append-only audit log and proof-of-work events.

One SQLAlchemy URL decides where they live: SQLite (``sqlite:///sameguard.db``, the default,
opened in WAL mode with a busy timeout so readers never block the writer) on one host, or
PostgreSQL (``postgresql+psycopg://user@host/db``, with the driver installed) when several
processes or hosts write. Only SQLAlchemy Core and portable column types are used.

The schema is versioned with Alembic (:mod:`sameguard.service.migrations`, version table
``sg_alembic_version``): :func:`init_db` brings any database, including one made before the schema
was versioned, to the newest version. A schema change is a change of the tables below plus a new
revision file in ``migrations/versions``.

Tables (all prefixed ``sg_``):

* ``sg_api_keys``: ``key_id`` (public, 16 hex), ``name`` (the client), ``key_sha256`` (the
  SHA-256 of the whole token; the token itself is never stored), ``created_at``, ``revoked_at``.
* ``sg_audit_log``: one row per query: time, request id (assigned by the server, unique per
  request; the client's own ``X-Request-ID`` is kept in ``client_request_id``), position in the batch, client, input
  SHA-256, score, threshold, flagged, action, proof-of-work bits, and the model versions
  (victim and detector weights SHA-256, detector class, policy, sameguard version).
  Append-only: on SQLite, triggers abort any ``UPDATE`` or ``DELETE``; on PostgreSQL grant the
  service's role ``INSERT`` and ``SELECT`` only.
  With per-client alarms it also holds ``evidence`` (log10 of the client's test martingale after
  the query; ``NULL`` without alarms) and ``alarmed`` (the client was alarmed when the query was
  decided).
* ``sg_pow_events``: one row per proof-of-work challenge issued or redeemed (and per refused
  redemption), with its outcome.
* ``sg_alarm_events``: one row when a client's alarm is raised (time of the alarm, client, the
  client's query count at the alarm, the evidence) and one when an operator clears it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    false,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool

logger = logging.getLogger(__name__)

__all__ = ["metadata", "api_keys", "audit_log", "pow_events", "alarm_events", "make_engine", "init_db", "redact_url",
           "schema_version", "head_version", "VERSION_TABLE"]

#: The table holding the schema version (Alembic's), named apart from a provider's own Alembic table.
VERSION_TABLE = "sg_alembic_version"
_MIGRATION_LOCK = 0x53474442  # pg_advisory_xact_lock key ("SGDB")

metadata = MetaData()

api_keys = Table(
    "sg_api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), nullable=False, unique=True),
    Column("name", String(64), nullable=False, index=True),
    Column("key_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

audit_log = Table(
    "sg_audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("client", String(64), nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("score", Float, nullable=True),
    Column("threshold", Float, nullable=True),
    Column("flagged", Boolean, nullable=False),
    Column("action", String(16), nullable=False),
    Column("work_bits", Integer, nullable=False),
    Column("victim_sha256", String(64), nullable=True),
    Column("detector", String(64), nullable=True),
    Column("detector_sha256", String(64), nullable=True),
    Column("policy", String(64), nullable=False),
    Column("sameguard_version", String(32), nullable=False),
    Column("evidence", Float, nullable=True),
    Column("alarmed", Boolean, nullable=False, default=False, server_default=false()),
    Column("client_request_id", String(64), nullable=True),
    Index("ix_sg_audit_log_client_ts", "client", "ts"),
    Index("ix_sg_audit_log_request_id", "request_id"),
    # Request ids are assigned by the server; a database created with this index refuses duplicates.
    Index("ux_sg_audit_log_request_idx", "request_id", "idx", unique=True),
)

pow_events = Table(
    "sg_pow_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("client", String(64), nullable=False),
    Column("challenge_id", String(32), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("bits", Integer, nullable=True),
    Column("outcome", String(32), nullable=False),
)

alarm_events = Table(
    "sg_alarm_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("client", String(64), nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("queries", Integer, nullable=True),
    Column("evidence", Float, nullable=True),
    Column("request_id", String(64), nullable=True),
)

_SQLITE_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS sg_audit_log_no_update BEFORE UPDATE ON sg_audit_log "
    "BEGIN SELECT RAISE(ABORT, 'sg_audit_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS sg_audit_log_no_delete BEFORE DELETE ON sg_audit_log "
    "BEGIN SELECT RAISE(ABORT, 'sg_audit_log is append-only'); END",
]


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a 30 s busy timeout and cross-thread connections.

    Raises:
        ValueError: the URL cannot be parsed or names an unknown driver.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ValueError(f"The database URL {url!r} is not a valid SQLAlchemy URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if memory:
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - exercised via connections
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except Exception as exc:
        raise ValueError(f"Cannot open the database {redact_url(url)}: {exc}") from None


def _alembic_config(conn: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    cfg.attributes["connection"] = conn
    return cfg


def schema_version(engine: Engine) -> str | None:
    """The database's schema version (an Alembic revision id such as ``"0003"``), ``None`` when unversioned."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def head_version() -> str:
    """The newest schema version this sameguard knows."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_alembic_config(None)).get_current_head())


def _upgrade(conn: Any) -> None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    if conn.dialect.name == "postgresql":  # one migrating process at a time (workers start together)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    cfg = _alembic_config(conn)
    current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    if current is None and inspect(conn).has_table(audit_log.name):
        # Made before the schema was versioned: complete the missing tables, then take it from the first
        # version (the later steps check what is already there).
        metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if not inspect(conn).has_table(t.name)])
        command.stamp(cfg, "0001")
        logger.info("Versioning an existing sameguard database from schema 0001")
    command.upgrade(cfg, "head")
    if conn.dialect.name == "sqlite":
        for statement in _SQLITE_TRIGGERS:  # idempotent; kept even if a step ever rebuilds the table
            conn.execute(text(statement))


def init_db(engine: Engine) -> None:
    """Bring the database to the newest schema version (Alembic, :mod:`sameguard.service.migrations`).

    A new database gets every table (and SQLite's append-only triggers); an older one only the
    steps it lacks; one made before the schema was versioned is recognised and upgraded. On
    PostgreSQL an advisory lock makes workers that start together migrate one after another.
    """
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                _upgrade(conn)
            break
        except OperationalError:
            if attempt == 2 or engine.dialect.name != "sqlite":
                raise
            time.sleep(0.2 * (attempt + 1))  # another process was creating the same tables; look again
    logger.info("Database ready at %s (schema %s)", engine.url.render_as_string(hide_password=True), head_version())
