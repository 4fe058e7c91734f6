"""Opening the registry: URL handling, one-line errors naming the fix, failure classification."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from service.embedded_broker import free_port
from service.registry.engine import create_registry_engine, normalize_url
from service.registry.errors import (
    RegistryError,
    RegistryOperationError,
    RegistryUnavailableError,
    is_transient,
)
from service.registry.store import Registry


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg"),
        ("postgres://u:p@h/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_urls_get_the_psycopg3_driver(url: str, driver: str):
    assert normalize_url(url).drivername == driver


def test_unreachable_postgresql_names_the_fix():
    port = free_port()
    with pytest.raises(RegistryUnavailableError) as err:
        Registry(f"postgresql://u:secret@127.0.0.1:{port}/tinydrift")
    message = str(err.value)
    assert message == (
        f"cannot connect to postgresql+psycopg://u:***@127.0.0.1:{port}/tinydrift: "
        "connection refused; is PostgreSQL running and listening there?"
    )
    assert "secret" not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "invalid database URL 'not a url': use sqlite:///"),
        ("mysql://u@h/db", "unsupported database URL mysql://u@h/db: use sqlite:///"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("sqlite:////no/such/dir/registry.db", "directory /no/such/dir does not exist"),
        ("postgresql+psycopg2://u@h/db", "install psycopg 3"),
    ],
)
def test_bad_urls_raise_one_line_registry_errors(url: str, expected: str):
    with pytest.raises(RegistryError, match=re.escape(expected)) as err:
        Registry(url)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_a_database_is_reported(tmp_path: Path):
    bogus = tmp_path / "registry.db"
    bogus.write_bytes(b"this is not a database" * 100)
    with pytest.raises(
        RegistryUnavailableError, match=r"cannot open SQLite database .*registry\.db"
    ):
        Registry(f"sqlite:///{bogus}")


def test_sqlite_pragmas(tmp_path: Path):
    engine = create_registry_engine(f"sqlite:///{tmp_path / 'r.db'}", sqlite_busy_timeout_ms=1234)
    try:
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
    finally:
        engine.dispose()
    assert pragma == {
        "journal_mode": "wal",
        "busy_timeout": 1234,
        "foreign_keys": 1,
        "synchronous": 1,
    }


def test_transient_failures_are_told_from_permanent_ones():
    locked = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    missing = OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x"))
    unique = IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert is_transient(locked)
    assert not is_transient(missing)
    assert not is_transient(unique)
    assert is_transient(RegistryOperationError("x", transient=True))
    assert not is_transient(RegistryOperationError("x", transient=False))


def test_postgresql_sqlstates_are_classified():
    class PgError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    def err(state: str) -> OperationalError:
        return OperationalError("INSERT", {}, PgError(state))

    assert is_transient(err("40001"))  # serialization failure
    assert is_transient(err("40P01"))  # deadlock
    assert is_transient(err("57P01"))  # admin shutdown (terminated backend)
    assert is_transient(err("08006"))  # connection failure
    assert not is_transient(err("23505"))  # unique violation
