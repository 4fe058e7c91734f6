"""The packaged Alembic migrations against a real SQLite file and a real PostgreSQL database.

Head must produce exactly the ORM models' schema (``compare_metadata`` finds no difference),
migrating must be repeatable, and the revisions must run down and up again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, inspect

from service.registry.engine import create_registry_engine
from service.registry.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    upgrade_to_head,
)
from service.registry.models import Base
from service.registry.store import Registry

pytestmark = pytest.mark.integration

TABLES = {
    "fleets",
    "devices",
    "parameter_sets",
    "drift_events",
    "detector_checkpoints",
    "label_buffer",
    "audit_log",
    "api_tokens",
    "rollouts",
    "rollout_events",
}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_registry_engine(db_url)
    yield eng
    eng.dispose()


def schema_diff(engine: Engine, metadata: MetaData) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))


def test_head_schema_equals_the_models(db_url: str, engine: Engine):
    assert current_revision(engine) is None
    upgrade_to_head(db_url)
    assert current_revision(engine) == head_revision() == "0003"
    assert set(inspect(engine).get_table_names()) >= TABLES
    assert schema_diff(engine, Base.metadata) == []


def test_the_comparison_would_see_a_model_change(db_url: str, engine: Engine):
    upgrade_to_head(db_url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["devices"].append_column(Column("added_later", Integer))
    diffs = schema_diff(engine, changed)
    assert [d[0] for d in diffs if isinstance(d, tuple)] == ["add_column"]


def test_migrating_again_is_a_no_op_and_registry_open_migrates(db_url: str, engine: Engine):
    with Registry(db_url) as reg:  # migrates an empty database at open
        reg.append_audit("test", "opened", "registry")
    assert current_revision(engine) == head_revision()
    upgrade_to_head(db_url)
    with Registry(db_url) as reg:
        assert [a.action for a in reg.list_audit()] == ["opened"]


def test_downgrade_to_base_and_up_again(db_url: str, engine: Engine):
    upgrade_to_head(db_url)
    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), "base")
        conn.commit()
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade_to_head(db_url)
    assert schema_diff(engine, Base.metadata) == []


def test_a_0001_database_upgrades_to_api_tokens(db_url: str, engine: Engine):
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.commit()
    assert "api_tokens" not in inspect(engine).get_table_names()
    with Registry(db_url) as reg:  # opening migrates 0001 → head
        record, plaintext = reg.create_token("first-admin", "admin", actor="test")
        assert reg.verify_token(plaintext) == record
    assert current_revision(engine) == head_revision()
    assert schema_diff(engine, Base.metadata) == []


def test_migrations_ship_inside_the_package():
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0002_api_tokens.py").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0003_rollouts.py").is_file()
    assert MIGRATIONS_DIR.parent.name == "registry"
