"""Per-client alarms: ``evidence`` and ``alarmed`` on the audit log, and ``sg_alarm_events``.

Revision ID: 0002
Revises: 0001

Written to also complete a database made before the schema was versioned, which may already
have some of these (each step checks first).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    present = {c["name"] for c in inspector.get_columns("sg_audit_log")}
    if "evidence" not in present:
        op.add_column("sg_audit_log", sa.Column("evidence", sa.Float, nullable=True))
    if "alarmed" not in present:
        op.add_column("sg_audit_log", sa.Column("alarmed", sa.Boolean, nullable=False, server_default=sa.false()))
    if not inspector.has_table("sg_alarm_events"):
        op.create_table(
            "sg_alarm_events",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("ts", sa.Float, nullable=False),
            sa.Column("client", sa.String(64), nullable=False),
            sa.Column("event", sa.String(16), nullable=False),
            sa.Column("queries", sa.Integer, nullable=True),
            sa.Column("evidence", sa.Float, nullable=True),
            sa.Column("request_id", sa.String(64), nullable=True),
        )
        op.create_index("ix_sg_alarm_events_client", "sg_alarm_events", ["client"])
