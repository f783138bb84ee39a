"""dedup_key unique among the rows that have one (a partial unique index)

Most rows have no deduplication key. The full unique constraint indexed every row's NULL, and
every update of a row (a claim, a mark) wrote a new entry into it. The partial index keeps the
same guarantee for the rows with a key and costs the others nothing.

On PostgreSQL both steps run in the migration's transaction: inserts into the outbox wait
until the index is built (it reads the whole table once). SQLite rebuilds the table (batch
mode), which holds the database's write lock while it copies the table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 13:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "uq_outbox_events_dedup_key"
WHERE = sa.text("dedup_key IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("outbox_events", schema=None) as batch_op:
        batch_op.drop_constraint(NAME, type_="unique")
        batch_op.create_index(
            NAME, ["dedup_key"], unique=True, postgresql_where=WHERE, sqlite_where=WHERE
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox_events", schema=None) as batch_op:
        batch_op.drop_index(NAME, postgresql_where=WHERE, sqlite_where=WHERE)
        batch_op.create_unique_constraint(NAME, ["dedup_key"])
