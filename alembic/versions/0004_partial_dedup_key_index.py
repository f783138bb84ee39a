"""dedup_key unique among the rows that have one (a partial unique index)

Most rows have no deduplication key. The full unique constraint indexed every row's NULL, and
every update of a row (a claim, a mark) wrote a new entry into it. The partial index keeps the
same guarantee for the rows with a key and costs the others nothing.

Deploy the code of this release first, then migrate: its insert names the index's predicate
(``ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL``), which both databases also match to
the old constraint; the insert of earlier releases matches only the old constraint. Going back,
downgrade the schema first, then the code.

On PostgreSQL the index is built under a temporary name while the old constraint still guards
the keys: writes to the outbox wait during the build (one read of the table), reads do not.
Dropping the constraint and renaming the index then take an exclusive lock until the migration
commits, a moment later. SQLite rebuilds the table (batch mode), which holds the database's
write lock while it copies the table.

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

TABLE = "outbox_events"
NAME = "uq_outbox_events_dedup_key"
BUILDING = "uq_outbox_events_dedup_key_0004"
WHERE = sa.text("dedup_key IS NOT NULL")


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        op.create_index(BUILDING, TABLE, ["dedup_key"], unique=True, postgresql_where=WHERE)
        op.drop_constraint(NAME, TABLE, type_="unique")
        op.execute(sa.text(f"ALTER INDEX {BUILDING} RENAME TO {NAME}"))
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_constraint(NAME, type_="unique")
        batch_op.create_index(NAME, ["dedup_key"], unique=True, sqlite_where=WHERE)


def downgrade() -> None:
    if _postgresql():
        # The constraint adopts an index built beforehand (and takes its name).
        op.create_index(BUILDING, TABLE, ["dedup_key"], unique=True)
        op.drop_index(NAME, table_name=TABLE)
        op.execute(
            sa.text(f"ALTER TABLE {TABLE} ADD CONSTRAINT {NAME} UNIQUE USING INDEX {BUILDING}")
        )
        return
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_index(NAME, sqlite_where=WHERE)
        batch_op.create_unique_constraint(NAME, ["dedup_key"])
