"""Server-assigned request ids: ``client_request_id`` on the audit log, ``(request_id, idx)`` unique.

Revision ID: 0003
Revises: 0002

The unique index is created in a new (empty) audit log only, as before the schema was versioned:
a database written before request ids were assigned by the server may hold repeated pairs, and
keeps working without the index.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

logger = logging.getLogger("sameguard.service.db")


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    present = {c["name"] for c in inspector.get_columns("sg_audit_log")}
    if "client_request_id" not in present:
        op.add_column("sg_audit_log", sa.Column("client_request_id", sa.String(64), nullable=True))
    if "ux_sg_audit_log_request_idx" in {ix["name"] for ix in inspector.get_indexes("sg_audit_log")}:
        return
    if bind.execute(sa.text("SELECT COUNT(*) FROM sg_audit_log")).scalar_one():
        logger.info("An audit log with rows from before server-assigned request ids: no unique (request_id, idx) "
                    "index")
        return
    op.create_index("ux_sg_audit_log_request_idx", "sg_audit_log", ["request_id", "idx"], unique=True)
