"""Session fixtures: a real Mosquitto on a free loopback port, a firmware bundle, databases.

Databases (``db_url``, parametrized over ``sqlite`` and ``postgresql``): a SQLite file in the
test's ``tmp_path``, or a fresh PostgreSQL database created for the test and dropped after it.
PostgreSQL comes from ``TINYDRIFT_TEST_POSTGRES_URL`` (a role allowed to ``CREATE DATABASE``;
.ci/run sets it) or, when that is unset, from Debian's local cluster, which the fixture starts and
provisions itself (role and database ``tinydrift``, as root via ``runuser -u postgres``). Without
either the PostgreSQL tests fail, naming the fix; they are never skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from service.embedded_broker import EmbeddedBroker, start_mosquitto
from service.firmware_bundle import Bundle, create_bundle

# Every Service a test starts serves its operator API on a free port, not on the default 8080
# (which may be taken, or shared by tests running side by side). A test may still set api_port.
os.environ.setdefault("TINYDRIFT_API_PORT", "0")


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[EmbeddedBroker]:
    """Mosquitto for this test session (``apt-get install -y mosquitto``; .ci/run does it)."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (see .ci/run)")
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Keys, factory model and firmware bundle, created once per session."""
    return create_bundle(tmp_path_factory.mktemp("bundle"), seed=0)


# --------------------------------------------------------------------------------------------
# databases

POSTGRES_URL_ENV = "TINYDRIFT_TEST_POSTGRES_URL"
_PG_ROLE = "tinydrift"  # role, password and database created on a local cluster
_PG_FIX = (
    "apt-get install -y postgresql (or run .ci/run), or set "
    f"{POSTGRES_URL_ENV}=postgresql+psycopg://user:password@host:port/db for a role that may "
    "CREATE DATABASE"
)
# The same statements as .ci/run: idempotent, run by psql as the postgres OS user.
_PG_PROVISION_SQL = rf"""
SELECT 'CREATE ROLE {_PG_ROLE} LOGIN CREATEDB PASSWORD ''{_PG_ROLE}'''
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{_PG_ROLE}')\gexec
SELECT 'CREATE DATABASE {_PG_ROLE} OWNER {_PG_ROLE}'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{_PG_ROLE}')\gexec
"""


def _as_postgres(*cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as the ``postgres`` OS user (the sandbox runs as root)."""
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd],
        input=stdin,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )


def _local_postgres_url() -> str:
    """Start Debian's newest local cluster if needed, create the test role; its URL."""
    versions = sorted(
        (int(p.parent.parent.name) for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")),
        reverse=True,
    )
    if shutil.which("pg_ctlcluster") is None or not versions:
        pytest.fail(f"PostgreSQL is not installed: {_PG_FIX}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail(
            f"cannot start the local PostgreSQL cluster without root: {_PG_FIX}", pytrace=False
        )
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout
    # Ver Cluster Port Status Owner Data-directory Log-file
    rows = [line.split() for line in listing.splitlines() if line.strip()]
    rows = [r for r in rows if int(r[0]) == versions[0]] or rows
    if not rows:
        subprocess.run(["pg_createcluster", str(versions[0]), "main"], check=True)
        rows = [[str(versions[0]), "main", "5432", "down"]]
    version, name, port, status = rows[0][:4]
    if status != "online":
        started = subprocess.run(
            ["pg_ctlcluster", version, name, "start"], capture_output=True, text=True, check=False
        )
        if started.returncode != 0:
            pytest.fail(
                f"pg_ctlcluster {version} {name} start failed: {started.stderr.strip()} "
                f"(see /var/log/postgresql/postgresql-{version}-{name}.log)"
            )
    made = _as_postgres(
        "psql", "-q", "-v", "ON_ERROR_STOP=1", "-p", port, "-d", "postgres",
        stdin=_PG_PROVISION_SQL,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.fail(f"creating the PostgreSQL test role failed: {made.stderr.strip()}")
    return f"postgresql+psycopg://{_PG_ROLE}:{_PG_ROLE}@127.0.0.1:{port}/{_PG_ROLE}"


def _libpq_url(url: str) -> str:
    """``url`` as psycopg's ``connect`` takes it (no ``+driver``, password kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """A PostgreSQL URL whose role may create databases (see the module docstring)."""
    url = os.environ.get(POSTGRES_URL_ENV) or _local_postgres_url()
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=10):
            return url
    except psycopg.Error as exc:
        error = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    shown = make_url(url).render_as_string(hide_password=True)
    pytest.fail(f"cannot connect to the test PostgreSQL {shown}: {error}; {_PG_FIX}", pytrace=False)


def _postgres_database(admin_url: str, label: str) -> Iterator[str]:
    """A fresh database named after ``label``, dropped afterwards; yields its URL."""
    name = "td_" + re.sub(r"[^a-z0-9]+", "_", label.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    admin = _libpq_url(admin_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest, postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped after it)."""
    yield from _postgres_database(postgres_admin_url, request.node.name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file (not yet created) in this test's ``tmp_path``."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty registry database on each backend: ``sqlite`` file, fresh ``postgresql`` db."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty registry database shared by one test module, on each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('module-db') / 'registry.db'}"
        return
    admin: str = request.getfixturevalue("postgres_admin_url")
    yield from _postgres_database(admin, request.module.__name__.rsplit(".", 1)[-1])
