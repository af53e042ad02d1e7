"""The service database's schema versions (Alembic): ``versions/`` holds one file per change.

:func:`sameguard.service.db.init_db` upgrades any database to the newest version at start-up (and
``sameguard keys`` / ``audit`` do too): a new database runs the whole chain, an existing one only
the steps it lacks, and a database made before the schema was versioned is recognised and stamped
first. The version is kept in the table ``sg_alembic_version`` (so a provider's own Alembic
history in the same database is left alone). To change the schema, change the tables in
:mod:`sameguard.service.db` and add a revision here whose ``down_revision`` is the current head;
``tests/service/test_db_migrations.py`` checks that the chain ends at exactly those tables.
"""
