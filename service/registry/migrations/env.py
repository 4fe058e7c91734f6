"""Alembic's environment script for the registry (run by Alembic, not imported by the service).

:func:`service.registry.migrate.upgrade_to_head` passes an open connection in
``config.attributes["connection"]``; the ``alembic`` command line (``-x url=…`` or
``sqlalchemy.url``) gets an engine of its own. On PostgreSQL the migration holds a
transaction-scoped advisory lock, so services starting together migrate one at a time; on SQLite
the migration's ``BEGIN IMMEDIATE`` does the same.
"""

from __future__ import annotations

from typing import Final

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from service.registry.engine import WRITE_OPTION, create_registry_engine
from service.registry.models import Base

MIGRATION_LOCK_ID: Final = 0x7464_7269_6674  # "tdrift": pg_advisory_xact_lock key


def _run(connection: Connection) -> None:
    connection = connection.execution_options(**{WRITE_OPTION: True})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})
        context.run_migrations()


def run_migrations() -> None:
    """Migrate the connection handed over by the caller, or the configured URL."""
    given = context.config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("no database URL: pass -x url=sqlite:///registry.db")
    engine = create_registry_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


# Imported outside Alembic (e.g. by pytest --doctest-modules) there is no context: do nothing.
if hasattr(context, "config"):
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported; run against a database")
    run_migrations()
