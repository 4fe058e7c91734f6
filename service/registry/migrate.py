"""Running the registry's Alembic migrations from code (no ``alembic.ini`` needed).

The Alembic environment ships inside the package (``service/registry/migrations``), so migrations
work from an installed wheel. :class:`service.registry.store.Registry` migrates at open; by hand::

    python -m service.registry sqlite:///registry.db

The ``alembic`` command line works with any config whose ``script_location`` is
``service.registry:migrations``, given ``-x url=…``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from service.registry.engine import (
    WRITE_OPTION,
    check_connection,
    create_registry_engine,
    masked,
)
from service.registry.errors import RegistryError, first_line

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
"""The Alembic script directory inside the package."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` pointing at the packaged migrations, optionally bound to a connection.

    >>> alembic_config().get_main_option("script_location") == str(MIGRATIONS_DIR)
    True
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision shipped with this package.

    >>> head_revision()
    '0003'
    """
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RegistryError(f"no migrations found in {MIGRATIONS_DIR}: the package is incomplete")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` for an empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine) -> None:
    """Migrate the database behind ``engine`` to the head revision (a no-op when it is there)."""
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(**{WRITE_OPTION: True})
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
    except DBAPIError as exc:
        raise RegistryError(
            f"migrating {masked(engine.url)} to {head_revision()} failed: {first_line(exc)}"
        ) from exc


def upgrade_to_head(url: str) -> None:
    """Open ``url``, migrate it to the head revision, close it (``alembic upgrade head``)."""
    engine = create_registry_engine(url)
    try:
        check_connection(engine)
        upgrade_engine(engine)
    finally:
        engine.dispose()
