"""Opening the registry's database: URL checks, SQLite pragmas, PostgreSQL via psycopg 3.

- ``sqlite:///path/to/file.db``: WAL journal (readers never wait for the writer),
  ``busy_timeout`` (5000 ms by default), foreign keys on, ``synchronous=NORMAL`` (safe with WAL).
  pysqlite's own transaction handling is switched off and the engine emits ``BEGIN`` itself, so
  a transaction really starts at its first statement; connections used for writes begin with
  ``BEGIN IMMEDIATE`` (take the write lock up front, so a busy database waits in SQLite's busy
  handler instead of failing on a lock upgrade). In-memory SQLite is refused: every thread needs
  its own connection to the same database.
- ``postgresql://`` and ``postgres://`` mean ``postgresql+psycopg://`` (psycopg 3); connections are
  pre-pinged, so one lost in a server restart is replaced instead of failing a write.

>>> normalize_url("postgres://u@db/tinydrift").render_as_string()
'postgresql+psycopg://u@db/tinydrift'
>>> normalize_url("mysql://x/y")
Traceback (most recent call last):
...
service.registry.errors.RegistryUnavailableError: unsupported database URL mysql://x/y: use \
sqlite:///path/to/registry.db or postgresql+psycopg://user:password@host/dbname
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from service.registry.errors import RegistryUnavailableError, first_line

WRITE_OPTION: Final = "tinydrift_write"
"""Execution option marking a connection whose transactions write (SQLite: ``BEGIN IMMEDIATE``)."""

DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
PG_CONNECT_TIMEOUT_S: Final = 5
_HINT: Final = "use sqlite:///path/to/registry.db or postgresql+psycopg://user:password@host/dbname"


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pick the driver: psycopg 3 for PostgreSQL, pysqlite for SQLite."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RegistryUnavailableError(f"invalid database URL {url!r}: {_HINT}") from None
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql":
        driver = parsed.get_driver_name() if "+" in parsed.drivername else "psycopg"
        return parsed.set(drivername=f"postgresql+{driver}")
    if backend == "sqlite":
        return parsed
    raise RegistryUnavailableError(f"unsupported database URL {masked(parsed)}: {_HINT}")


def masked(url: URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    return url.render_as_string(hide_password=True)


def create_registry_engine(
    url: str | URL, *, sqlite_busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
) -> Engine:
    """An engine for ``url`` configured as in the module docstring (not yet connected)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, sqlite_busy_timeout_ms)
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    try:
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise RegistryUnavailableError(
            f"no driver for {masked(parsed)} ({exc}): install psycopg 3 "
            "(pip install 'psycopg[binary]') and use postgresql+psycopg://"
        ) from None


def _sqlite_engine(url: URL, busy_timeout_ms: int) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise RegistryUnavailableError(
            f"in-memory SQLite ({url}) cannot be shared by the writer thread: "
            "use sqlite:///path/to/registry.db"
        )
    if not url.query.get("uri"):
        parent = Path(database).expanduser().resolve().parent
        if not parent.is_dir():
            raise RegistryUnavailableError(
                f"cannot open SQLite database {database}: directory {parent} does not exist; "
                "create it or choose another path"
            )
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the "begin" listener emits BEGIN itself
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def check_connection(engine: Engine) -> None:
    """Connect once; raise :class:`RegistryUnavailableError` with the likely fix when that fails."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise RegistryUnavailableError(describe_connect_error(engine.url, exc)) from None


def describe_connect_error(url: URL, exc: BaseException) -> str:
    """One line: what failed connecting to ``url`` and what to do about it."""
    reason = first_line(exc)
    low = str(getattr(exc, "orig", exc)).lower()
    if url.get_backend_name() == "sqlite":
        return (
            f"cannot open SQLite database {url.database}: {reason}; "
            "check the path and its permissions"
        )
    where = masked(url)
    if "password authentication failed" in low or "no password supplied" in low:
        hint = "check the user and password in the URL"
    elif "does not exist" in low and "database" in low:
        hint = f"create it (createdb {url.database}) or fix the database name in the URL"
    elif "does not exist" in low and "role" in low:
        hint = "create the role (createuser) or fix the user in the URL"
    elif "refused" in low or "no such file" in low:
        hint = "is PostgreSQL running and listening there?"
    elif "timeout" in low or "timed out" in low:
        hint = "is the host reachable and PostgreSQL listening?"
    elif "could not translate host name" in low or "name or service not known" in low:
        hint = "check the host name in the URL"
    else:
        hint = "is PostgreSQL running and the URL right?"
    if "connection refused" in low:
        reason = "connection refused"
    elif "FATAL:" in reason:  # psycopg: 'connection failed: connection to server … FATAL:  why'
        reason = reason.split("FATAL:", 1)[1].strip()
    return f"cannot connect to {where}: {reason}; {hint}"
