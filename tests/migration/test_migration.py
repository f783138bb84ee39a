"""Alembic owns the schema: `upgrade head` must produce exactly the SQLAlchemy metadata."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from alembic import command
from outbox import models
from outbox.migration import alembic_config, current_revision, head_revision, upgrade_to_head


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
        unique_indexes = {
            ix["name"] for ix in inspector.get_indexes(models.EVENTS_TABLE) if ix["unique"]
        }
    finally:
        engine.dispose()
    assert {models.IX_DUE, models.IX_LEASED, models.IX_KEY_OPEN, models.IX_FINISHED} <= indexes
    assert models.UQ_EVENT_ID in uniques
    assert models.UQ_DEDUP_KEY in unique_indexes  # partial: rows without a key are not in it


def test_deduplication_holds_across_the_partial_index_migration(database_url):
    """A database made before 0004 (dedup_key a full unique constraint), with rows: after the
    upgrade a repeated key is still refused, rows without a key still coexist, and going back
    down restores the constraint."""
    config = alembic_config(database_url)
    command.downgrade(config, "0003")
    engine = sa.create_engine(database_url)
    events = models.events

    def insert(number: int, dedup_key: str | None) -> None:
        now = dt.datetime.now(dt.UTC)
        with engine.begin() as conn:
            conn.execute(
                events.insert().values(
                    event_id=f"evt_{number:022d}",
                    type_name="t",
                    channel="c",
                    event_name="e",
                    ordering_key="c",
                    data="{}",
                    data_bytes=2,
                    encrypted=False,
                    contains_phi=False,
                    dedup_key=dedup_key,
                    created_at=now,
                    available_at=now,
                )
            )

    try:
        insert(1, "order_1:created")
        insert(2, None)
        command.upgrade(config, "head")
        insert(3, None)  # many rows without a key
        with pytest.raises(sa.exc.IntegrityError):
            insert(4, "order_1:created")  # the key of a row made before the upgrade
        insert(5, "order_2:created")
        with pytest.raises(sa.exc.IntegrityError):
            insert(6, "order_2:created")
        command.downgrade(config, "0003")
        with pytest.raises(sa.exc.IntegrityError):
            insert(7, "order_2:created")
        command.upgrade(config, "head")
        with engine.connect() as conn:
            keys = conn.execute(sa.select(events.c.dedup_key).order_by(events.c.id)).scalars()
            assert list(keys) == ["order_1:created", None, None, "order_2:created"]
    finally:
        engine.dispose()
        upgrade_to_head(database_url)


def test_this_versions_enqueue_deduplicates_on_a_schema_not_yet_migrated(database_url):
    """Deploy the code first, then migrate: the insert names the partial index's predicate,
    which both databases also match to the full unique constraint of 0003."""
    from sqlalchemy.orm import Session

    from outbox import new_opaque_id
    from tests.integration.helpers import ORDER_CREATED, make_outbox

    command.downgrade(alembic_config(database_url), "0003")
    engine = sa.create_engine(database_url)
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")

    def enqueue(dedup_key: str | None) -> int:
        with Session(engine) as session, session.begin():
            return outbox.enqueue(
                session,
                ORDER_CREATED,
                ids={"pharmacy_id": pharmacy},
                data={"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
                dedup_key=dedup_key,
            ).id

    try:
        first = enqueue("order_1:created")
        assert enqueue("order_1:created") == first
        assert len({enqueue(None), enqueue(None), first}) == 3
    finally:
        engine.dispose()
        upgrade_to_head(database_url)


def test_fresh_sqlite_file_in_a_missing_folder_is_created(tmp_path):
    url = f"sqlite:///{tmp_path}/nested/dir/outbox.db"
    upgrade_to_head(url)
    assert current_revision(url) == head_revision()
