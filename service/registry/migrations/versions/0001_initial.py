"""Initial registry schema: every table, and the append-only triggers of ``audit_log``.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

Frozen: this revision spells out its columns instead of reading the models, so later model
changes need a new revision (the test ``test_registry_migrations`` compares head with the models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = 64


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _pk_id() -> sa.Column[int]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    )


_PG_APPEND_ONLY = (
    """
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION USING
            MESSAGE = 'audit_log is append-only: ' || TG_OP || ' refused',
            ERRCODE = 'insufficient_privilege';
    END;
    $$
    """,
    """
    CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()
    """,
    """
    CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()
    """,
)

_SQLITE_APPEND_ONLY = (
    """
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END
    """,
)


def upgrade() -> None:
    """Create the tables, indexes and the audit-log triggers."""
    op.create_table(
        "fleets",
        sa.Column("name", sa.String(_ID), nullable=False),
        sa.Column("created", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_fleets"),
    )
    op.create_table(
        "devices",
        _pk_id(),
        sa.Column("fleet", sa.String(_ID), nullable=False),
        sa.Column("device_id", sa.String(_ID), nullable=False),
        sa.Column("schema_id", sa.String(64), nullable=True),
        sa.Column("active_version", sa.BigInteger(), nullable=True),
        sa.Column("previous_version", sa.BigInteger(), nullable=True),
        sa.Column("update_state", sa.String(16), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("fw", sa.String(128), nullable=True),
        sa.Column("boot", sa.BigInteger(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=True),
        sa.Column("first_seen", _ts(), nullable=False),
        sa.Column("last_seen", _ts(), nullable=False),
        sa.Column("caps", _json(), nullable=True),
        sa.Column("drift_state", sa.String(255), nullable=False),
        sa.Column("n_features", sa.Integer(), nullable=True),
        sa.Column("n_classes", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.ForeignKeyConstraint(["fleet"], ["fleets.name"], name="fk_devices_fleet_fleets"),
        sa.UniqueConstraint("fleet", "device_id", name="uq_devices_fleet_device_id"),
    )
    op.create_table(
        "parameter_sets",
        _pk_id(),
        sa.Column("schema_id", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("security_epoch", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("created", _ts(), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", _json(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_parameter_sets"),
        sa.UniqueConstraint("schema_id", "version", name="uq_parameter_sets_schema_id_version"),
        sa.UniqueConstraint("sha256", name="uq_parameter_sets_sha256"),
        sa.CheckConstraint(
            "status IN ('good', 'bad', 'candidate')", name="ck_parameter_sets_status"
        ),
    )
    op.create_table(
        "drift_events",
        _pk_id(),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("fleet", sa.String(_ID), nullable=False),
        sa.Column("device", sa.String(_ID), nullable=True),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("signal", sa.String(32), nullable=False),
        sa.Column("feature", sa.String(128), nullable=True),
        sa.Column("detector", sa.String(32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("model_version", sa.BigInteger(), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("readings", sa.BigInteger(), nullable=False),
        sa.Column("details", _json(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_drift_events"),
        sa.ForeignKeyConstraint(["fleet"], ["fleets.name"], name="fk_drift_events_fleet_fleets"),
        sa.CheckConstraint("scope IN ('device', 'cohort')", name="ck_drift_events_scope"),
    )
    op.create_index("ix_drift_events_fleet_ts", "drift_events", ["fleet", "ts"])
    op.create_index("ix_drift_events_fleet_device_ts", "drift_events", ["fleet", "device", "ts"])
    op.create_index("ix_drift_events_ts", "drift_events", ["ts"])
    op.create_table(
        "detector_checkpoints",
        sa.Column("fleet", sa.String(_ID), nullable=False),
        sa.Column("device", sa.String(_ID), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("updated", _ts(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("last_boot", sa.BigInteger(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("fleet", "device", "kind", name="pk_detector_checkpoints"),
        sa.ForeignKeyConstraint(
            ["fleet"], ["fleets.name"], name="fk_detector_checkpoints_fleet_fleets"
        ),
    )
    op.create_table(
        "label_buffer",
        _pk_id(),
        sa.Column("fleet", sa.String(_ID), nullable=False),
        sa.Column("device", sa.String(_ID), nullable=False),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("param_version", sa.BigInteger(), nullable=False),
        sa.Column("features", sa.LargeBinary(), nullable=False),
        sa.Column("pred", sa.Integer(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_label_buffer"),
        sa.ForeignKeyConstraint(["fleet"], ["fleets.name"], name="fk_label_buffer_fleet_fleets"),
    )
    op.create_index("ix_label_buffer_fleet_device_ts", "label_buffer", ["fleet", "device", "ts"])
    op.create_table(
        "audit_log",
        _pk_id(),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("details", _json(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_index("ix_audit_log_target_ts", "audit_log", ["target", "ts"])

    dialect = op.get_context().dialect.name
    for ddl in {"postgresql": _PG_APPEND_ONLY, "sqlite": _SQLITE_APPEND_ONLY}.get(dialect, ()):
        op.execute(ddl)


def downgrade() -> None:
    """Drop everything this revision created."""
    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update_delete ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    for table in (
        "audit_log",
        "label_buffer",
        "detector_checkpoints",
        "drift_events",
        "parameter_sets",
        "devices",
        "fleets",
    ):
        op.drop_table(table)
