"""Alembic environment for pusher-outbox.

The database URL comes from ``config.attributes["database_url"]`` (set by
``outbox.migration``) or, for plain ``alembic`` commands, from ``OUTBOX_DATABASE_URL``; so does
the lock timeout of migrations on PostgreSQL (``OUTBOX_MIGRATION_LOCK_TIMEOUT_SECONDS``).
"""

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from outbox.models import metadata
from outbox.settings import load_settings

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    return load_settings().database_url


def _lock_timeout_seconds() -> float:
    value = config.attributes.get("lock_timeout_seconds")
    if value is not None:
        return float(value)
    return load_settings().migration_lock_timeout_seconds


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # For this transaction: a lock not granted in time fails the migration (and rolls
            # it back) instead of queueing every other query on the table behind it.
            milliseconds = max(1, round(_lock_timeout_seconds() * 1000))
            connection.execute(text(f"SET LOCAL lock_timeout = {milliseconds}"))
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
