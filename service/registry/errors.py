"""How the registry fails: one-line errors that name the fix, and which failures are transient.

A *transient* failure is one that retrying the same transaction later can cure: a locked SQLite
database, a lost or refused PostgreSQL connection, a serialization failure or a deadlock. The
writer retries those with backoff; everything else (a constraint violation, bad data) is a
permanent error of that write.

>>> import sqlite3
>>> from sqlalchemy.exc import OperationalError
>>> is_transient(OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")))
True
>>> is_transient(ValueError("no"))
False
"""

from __future__ import annotations

from typing import Final

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message is one line and names the fix."""


class RegistryUnavailableError(RegistryError):
    """The database cannot be reached or opened (bad URL, server down, missing directory)."""


class RegistryOperationError(RegistryError):
    """A read or write failed in the database; ``transient`` says whether a retry may succeed."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class RegistryConflictError(RegistryError):
    """The write clashes with what is stored (e.g. a parameter set that already exists)."""


class UnknownParameterSetError(RegistryError, LookupError):
    """No parameter set has the given ``(schema_id, version)``."""


class UnknownTokenError(RegistryError, LookupError):
    """No API token has the given name."""


class WriterBackpressureError(RegistryError):
    """The writer's queue stayed full for the whole put timeout; the write was not queued."""


class WriterClosedError(RegistryError):
    """A write was submitted to a writer that has been closed."""


_SQLITE_TRANSIENT: Final = ("database is locked", "database table is locked", "database is busy")
# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock, lock not available, too
# many connections, operator intervention (admin shutdown, crash shutdown, cannot connect now),
# and the whole connection-exception class 08.
_PG_TRANSIENT_STATES: Final = frozenset(
    {"40001", "40P01", "55P03", "53300", "57P01", "57P02", "57P03"}
)
_PG_TRANSIENT_CLASSES: Final = frozenset({"08"})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the failed transaction later may succeed (see the module docstring)."""
    if isinstance(exc, RegistryOperationError):
        return exc.transient
    if isinstance(exc, DisconnectionError | PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate in _PG_TRANSIENT_STATES or sqlstate[:2] in _PG_TRANSIENT_CLASSES
    if isinstance(exc, OperationalError):
        text = str(orig).lower()
        if any(marker in text for marker in _SQLITE_TRANSIENT):
            return True
        # psycopg reports a lost or refused connection as OperationalError without a SQLSTATE.
        return "sqlite" not in type(orig).__module__
    return False


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's driver message, for one-line reports."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    for line in str(orig).splitlines():
        if line.strip():
            return line.strip()
    return type(orig).__name__
