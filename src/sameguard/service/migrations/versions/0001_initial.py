"""The first release: API keys, the audit log, proof-of-work events (and SQLite's append-only triggers).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQLITE_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS sg_audit_log_no_update BEFORE UPDATE ON sg_audit_log "
    "BEGIN SELECT RAISE(ABORT, 'sg_audit_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS sg_audit_log_no_delete BEFORE DELETE ON sg_audit_log "
    "BEGIN SELECT RAISE(ABORT, 'sg_audit_log is append-only'); END",
]


def upgrade() -> None:
    op.create_table(
        "sg_api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(32), nullable=False, unique=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_index("ix_sg_api_keys_name", "sg_api_keys", ["name"])
    op.create_table(
        "sg_audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("work_bits", sa.Integer, nullable=False),
        sa.Column("victim_sha256", sa.String(64), nullable=True),
        sa.Column("detector", sa.String(64), nullable=True),
        sa.Column("detector_sha256", sa.String(64), nullable=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("sameguard_version", sa.String(32), nullable=False),
    )
    op.create_index("ix_sg_audit_log_client_ts", "sg_audit_log", ["client", "ts"])
    op.create_index("ix_sg_audit_log_request_id", "sg_audit_log", ["request_id"])
    op.create_table(
        "sg_pow_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("challenge_id", sa.String(32), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("bits", sa.Integer, nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
