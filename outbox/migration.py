"""Schema migrations: Alembic owns the schema; this module runs it from code and the CLI."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, pool
from sqlalchemy.exc import ArgumentError

from alembic import command
from outbox.errors import ConfigurationError
from outbox.settings import DEFAULT_MIGRATION_LOCK_TIMEOUT_SECONDS

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(database_url: str, *, lock_timeout_seconds: float | None = None) -> Config:
    """An Alembic config pointing at the project's migration scripts and ``database_url``.

    ``lock_timeout_seconds``: how long a migration on PostgreSQL waits for a lock (default
    :data:`~outbox.settings.DEFAULT_MIGRATION_LOCK_TIMEOUT_SECONDS`)."""
    if not (ALEMBIC_DIR / "env.py").is_file():
        raise ConfigurationError(
            f"migration scripts not found at {ALEMBIC_DIR}: install pusher-outbox from its "
            "source tree (pip install -e .) so the alembic/ folder sits next to outbox/"
        )
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["database_url"] = database_url
    config.attributes["lock_timeout_seconds"] = (
        DEFAULT_MIGRATION_LOCK_TIMEOUT_SECONDS
        if lock_timeout_seconds is None
        else lock_timeout_seconds
    )
    return config


def sqlite_file(database_url: str) -> Path | None:
    """The file a SQLite URL names (``sqlite:///x.db`` is relative to the current folder), or
    ``None`` for an in-memory SQLite database, another database or a URL that does not parse
    (opening it reports that)."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def ensure_sqlite_directory(database_url: str) -> None:
    """Create the folder of a SQLite database file if it is missing."""
    path = sqlite_file(database_url)
    if path is not None and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)


def upgrade_to_head(database_url: str, *, lock_timeout_seconds: float | None = None) -> None:
    """Apply every migration up to the newest one. Idempotent.

    On PostgreSQL the migrations run in one transaction: if one fails (a lock not granted
    within ``lock_timeout_seconds``, say), nothing is changed."""
    ensure_sqlite_directory(database_url)
    command.upgrade(alembic_config(database_url, lock_timeout_seconds=lock_timeout_seconds), "head")


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, or ``None`` when it was never migrated."""
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this version of pusher-outbox."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
