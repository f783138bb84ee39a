"""Schema migrations: Alembic owns the schema; this module runs it from code and the CLI."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from alembic import command
from outbox.errors import ConfigurationError

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the project's migration scripts and ``database_url``."""
    if not (ALEMBIC_DIR / "env.py").is_file():
        raise ConfigurationError(
            f"migration scripts not found at {ALEMBIC_DIR}: install pusher-outbox from its "
            "source tree (pip install -e .) so the alembic/ folder sits next to outbox/"
        )
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["database_url"] = database_url
    return config


def _ensure_sqlite_directory(database_url: str) -> None:
    prefix = "sqlite:///"
    if database_url.startswith(prefix) and ":memory:" not in database_url:
        path = Path(database_url[len(prefix) :].split("?", 1)[0])
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)


def upgrade_to_head(database_url: str) -> None:
    """Apply every migration up to the newest one. Idempotent."""
    _ensure_sqlite_directory(database_url)
    command.upgrade(alembic_config(database_url), "head")


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
