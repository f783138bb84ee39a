"""Alembic owns the schema: `upgrade head` must produce exactly the SQLAlchemy metadata."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from outbox import models
from outbox.migration import current_revision, head_revision, upgrade_to_head


def test_upgrade_head_matches_the_models(database_url):
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, models.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_migrate_is_idempotent_and_records_the_head(database_url):
    upgrade_to_head(database_url)
    assert current_revision(database_url) == head_revision()


def test_named_constraints_and_indexes_exist(database_url):
    engine = sa.create_engine(database_url)
    try:
        inspector = sa.inspect(engine)
        indexes = {ix["name"] for ix in inspector.get_indexes(models.EVENTS_TABLE)}
        uniques = {uq["name"] for uq in inspector.get_unique_constraints(models.EVENTS_TABLE)}
    finally:
        engine.dispose()
    assert {models.IX_DUE, models.IX_LEASED, models.IX_KEY_OPEN, models.IX_FINISHED} <= indexes
    assert {models.UQ_EVENT_ID, models.UQ_DEDUP_KEY} <= uniques


def test_fresh_sqlite_file_in_a_missing_folder_is_created(tmp_path):
    url = f"sqlite:///{tmp_path}/nested/dir/outbox.db"
    upgrade_to_head(url)
    assert current_revision(url) == head_revision()
