"""Alembic environment: runs on the connection :func:`sameguard.service.db.init_db` hands over."""

from __future__ import annotations

from alembic import context

from sameguard.service.db import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
