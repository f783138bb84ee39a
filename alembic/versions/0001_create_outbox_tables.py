"""create outbox tables

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-03 13:55:58.673347
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_ref", sa.String(length=200), nullable=True),
        sa.Column("channel", sa.String(length=200), nullable=False),
        sa.Column("socket_id", sa.String(length=64), nullable=True),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.CheckConstraint(
            "decision IN ('grant', 'deny')", name=op.f("ck_outbox_audit_decision_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_audit")),
    )
    with op.batch_alter_table("outbox_audit", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_audit_at", ["at"], unique=False)

    op.create_table(
        "outbox_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("type_name", sa.String(length=100), nullable=False),
        sa.Column("channel", sa.String(length=200), nullable=False),
        sa.Column("event_name", sa.String(length=200), nullable=False),
        sa.Column("ordering_key", sa.String(length=200), nullable=False),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("data_bytes", sa.Integer(), nullable=False),
        sa.Column("encrypted", sa.Boolean(), nullable=False),
        sa.Column("contains_phi", sa.Boolean(), nullable=False),
        sa.Column("exclude_socket_id", sa.String(length=64), nullable=True),
        sa.Column("dedup_key", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_token", sa.String(length=36), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payload_erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("attempt_log", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'sent', 'dead', 'expired')",
            name=op.f("ck_outbox_events_status_valid"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_outbox_events_attempts_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_events")),
        sa.UniqueConstraint("dedup_key", name="uq_outbox_events_dedup_key"),
        sa.UniqueConstraint("event_id", name="uq_outbox_events_event_id"),
    )
    with op.batch_alter_table("outbox_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outbox_events_due",
            ["id"],
            unique=False,
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )
        batch_op.create_index(
            "ix_outbox_events_finished",
            ["finished_at"],
            unique=False,
            postgresql_where=sa.text("finished_at IS NOT NULL"),
            sqlite_where=sa.text("finished_at IS NOT NULL"),
        )
        batch_op.create_index(
            "ix_outbox_events_key_open",
            ["ordering_key", "id"],
            unique=False,
            postgresql_where=sa.text("status IN ('pending', 'in_flight')"),
            sqlite_where=sa.text("status IN ('pending', 'in_flight')"),
        )
        batch_op.create_index(
            "ix_outbox_events_leased",
            ["lease_expires_at"],
            unique=False,
            postgresql_where=sa.text("status = 'in_flight'"),
            sqlite_where=sa.text("status = 'in_flight'"),
        )
        batch_op.create_index(
            "ix_outbox_events_payload_held",
            ["finished_at"],
            unique=False,
            postgresql_where=sa.text("data IS NOT NULL AND finished_at IS NOT NULL"),
            sqlite_where=sa.text("data IS NOT NULL AND finished_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox_events", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_outbox_events_payload_held",
            postgresql_where=sa.text("data IS NOT NULL AND finished_at IS NOT NULL"),
            sqlite_where=sa.text("data IS NOT NULL AND finished_at IS NOT NULL"),
        )
        batch_op.drop_index(
            "ix_outbox_events_leased",
            postgresql_where=sa.text("status = 'in_flight'"),
            sqlite_where=sa.text("status = 'in_flight'"),
        )
        batch_op.drop_index(
            "ix_outbox_events_key_open",
            postgresql_where=sa.text("status IN ('pending', 'in_flight')"),
            sqlite_where=sa.text("status IN ('pending', 'in_flight')"),
        )
        batch_op.drop_index(
            "ix_outbox_events_finished",
            postgresql_where=sa.text("finished_at IS NOT NULL"),
            sqlite_where=sa.text("finished_at IS NOT NULL"),
        )
        batch_op.drop_index(
            "ix_outbox_events_due",
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )

    op.drop_table("outbox_events")
    with op.batch_alter_table("outbox_audit", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_audit_at")

    op.drop_table("outbox_audit")
