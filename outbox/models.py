"""The outbox schema: SQLAlchemy Core tables shared by the store, the producer and Alembic.

Constraint and index names are constants so that code and migrations refer to the same names.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

EVENTS_TABLE = "outbox_events"
AUDIT_TABLE = "outbox_audit"
SEQUENCES_TABLE = "outbox_channel_sequences"
WORKERS_TABLE = "outbox_workers"

UQ_EVENT_ID = "uq_outbox_events_event_id"
UQ_DEDUP_KEY = "uq_outbox_events_dedup_key"
IX_DUE = "ix_outbox_events_due"
IX_LEASED = "ix_outbox_events_leased"
IX_KEY_OPEN = "ix_outbox_events_key_open"
IX_FINISHED = "ix_outbox_events_finished"
IX_PAYLOAD_HELD = "ix_outbox_events_payload_held"
IX_AUDIT_AT = "ix_outbox_audit_at"
IX_CHANNEL_SEQ = "ix_outbox_events_channel_seq"
IX_WAITING = "ix_outbox_events_waiting"


class Status(enum.StrEnum):
    """Life cycle of a row: pending → in_flight → sent | pending (retry) | dead | expired."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SENT = "sent"
    DEAD = "dead"
    EXPIRED = "expired"


OPEN_STATUSES = (Status.PENDING.value, Status.IN_FLIGHT.value)
TERMINAL_STATUSES = (Status.SENT.value, Status.DEAD.value, Status.EXPIRED.value)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every database.

    PostgreSQL stores ``timestamptz``; SQLite stores naive UTC text in a fixed format so that
    comparisons in SQL are correct. Values read back are always aware (UTC).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware datetimes")
        utc: dt.datetime = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError("expected a datetime from the database")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events = sa.Table(
    EVENTS_TABLE,
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(40), nullable=False),
    sa.Column("type_name", sa.String(100), nullable=False),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("event_name", sa.String(200), nullable=False),
    sa.Column("ordering_key", sa.String(200), nullable=False),
    # Gap-free per-channel sequence number in commit order (see store.next_sequence).
    sa.Column("seq", sa.BigInteger(), nullable=True),
    # The exact data string to send (JSON). NULL once erased by retention.
    sa.Column("data", sa.Text(), nullable=True),
    sa.Column("data_bytes", sa.Integer(), nullable=False),
    sa.Column("encrypted", sa.Boolean(), nullable=False),
    sa.Column("contains_phi", sa.Boolean(), nullable=False),
    sa.Column("exclude_socket_id", sa.String(64), nullable=True),
    sa.Column("dedup_key", sa.String(200), nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default=Status.PENDING.value),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("available_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("lease_token", sa.String(36), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("sent_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("payload_erased_at", UTCDateTime(), nullable=True),
    # Sanitized, payload-free reason of the last failure and a bounded attempt history (JSON).
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.Column("attempt_log", sa.Text(), nullable=True),
    sa.UniqueConstraint("event_id", name=UQ_EVENT_ID),
    sa.CheckConstraint(
        "status IN ('pending', 'in_flight', 'sent', 'dead', 'expired')", name="status_valid"
    ),
    sa.CheckConstraint("attempts >= 0", name="attempts_non_negative"),
    sa.Index(
        IX_DUE,
        "id",
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    ),
    # Pending rows by due time: the claim finds the few rows waiting for a retry (whose keys
    # are held back) without reading every pending row.
    sa.Index(
        IX_WAITING,
        "available_at",
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    ),
    sa.Index(
        IX_LEASED,
        "lease_expires_at",
        postgresql_where=sa.text("status = 'in_flight'"),
        sqlite_where=sa.text("status = 'in_flight'"),
    ),
    sa.Index(
        IX_KEY_OPEN,
        "ordering_key",
        "id",
        postgresql_where=sa.text("status IN ('pending', 'in_flight')"),
        sqlite_where=sa.text("status IN ('pending', 'in_flight')"),
    ),
    sa.Index(
        IX_FINISHED,
        "finished_at",
        postgresql_where=sa.text("finished_at IS NOT NULL"),
        sqlite_where=sa.text("finished_at IS NOT NULL"),
    ),
    sa.Index(IX_CHANNEL_SEQ, "channel", "seq"),
    # Unique among the rows that have a key. Partial: most rows have none, and a full index
    # took an entry of every row at every update (a claim and a mark each write a new row
    # version into every index that covers the row).
    sa.Index(
        UQ_DEDUP_KEY,
        "dedup_key",
        unique=True,
        postgresql_where=sa.text("dedup_key IS NOT NULL"),
        sqlite_where=sa.text("dedup_key IS NOT NULL"),
    ),
    sa.Index(
        IX_PAYLOAD_HELD,
        "finished_at",
        postgresql_where=sa.text("data IS NOT NULL AND finished_at IS NOT NULL"),
        sqlite_where=sa.text("data IS NOT NULL AND finished_at IS NOT NULL"),
    ),
)

audit = sa.Table(
    AUDIT_TABLE,
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("user_ref", sa.String(200), nullable=True),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("socket_id", sa.String(64), nullable=True),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False),
    sa.CheckConstraint("decision IN ('grant', 'deny')", name="decision_valid"),
    sa.Index(IX_AUDIT_AT, "at"),
)

channel_sequences = sa.Table(
    SEQUENCES_TABLE,
    metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("last_seq", sa.BigInteger(), nullable=False),
)

workers = sa.Table(
    WORKERS_TABLE,
    metadata,
    sa.Column("worker_id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("last_beat_at", UTCDateTime(), nullable=False),
)
