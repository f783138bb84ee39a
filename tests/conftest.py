"""Shared fixtures: real services, isolated per test.

- ``database_url`` runs a test on SQLite (a fresh migrated file) and on PostgreSQL (a fresh
  database cloned from a migrated template). ``engine`` is a SQLAlchemy engine on it.
- ``redis_url`` is a dedicated Redis database number, flushed before and after the test.
- ``soketi`` is one Pusher-protocol server per session; ``pusher_env`` points the ``PUSHER_*``
  settings at it; ``make_subscriber`` opens websocket subscribers that are closed afterwards.

A missing service skips the test locally and fails it when ``CI=true``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
import redis
import sqlalchemy
from psycopg import sql

from outbox.testing.soketi import Soketi, SoketiError
from outbox.testing.subscriber import Subscriber

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_ROLES = ("postgres", "root")
REDIS_TEST_URL = "redis://127.0.0.1:6379/13"
TEMPLATE_PREFIX = "outbox_tpl_"
TEST_DB_PREFIX = "outbox_test_"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def service_missing(message: str) -> NoReturn:
    """Skip locally, fail under ``CI=true``: CI must never go green by skipping."""
    if _in_ci():
        pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(f"{message}; `scripts/ensure_services.sh` starts the local services")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the services their fixtures use, so ``-m "not soketi"`` works."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"soketi", "pusher_env", "make_subscriber"}:
            item.add_marker(pytest.mark.soketi)
        if "redis_url" in fixtures:
            item.add_marker(pytest.mark.redis)


# -- soketi --------------------------------------------------------------------------------


@contextlib.contextmanager
def running_soketi() -> Iterator[Soketi]:
    """A started soketi on its own free port (skip or, under CI, fail when it cannot start)."""
    server = Soketi()
    try:
        server.start()
    except SoketiError as exc:
        server.close()
        service_missing(f"soketi unavailable: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def soketi() -> Iterator[Soketi]:
    """A soketi server for the whole session."""
    with running_soketi() as server:
        yield server


@pytest.fixture
def own_soketi() -> Iterator[Soketi]:
    """A soketi for one test alone, which may stop and restart it to cause failures."""
    with running_soketi() as server:
        yield server


@pytest.fixture
def pusher_env(soketi: Soketi, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the ``PUSHER_*`` variables for ``soketi`` plus a fresh encryption master key."""
    env = soketi.env()
    env["PUSHER_ENCRYPTION_MASTER_KEY_BASE64"] = base64.b64encode(os.urandom(32)).decode()
    for name in ("PUSHER_CLUSTER",):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def make_subscriber(soketi: Soketi) -> Iterator[Callable[..., Subscriber]]:
    """Factory of connected :class:`Subscriber` objects on ``soketi``, all closed afterwards."""
    opened: list[Subscriber] = []

    def make(**kwargs: Any) -> Subscriber:
        subscriber = Subscriber(soketi.ws_url, soketi.key, **kwargs)
        opened.append(subscriber)
        return subscriber.connect()

    yield make
    for subscriber in opened:
        subscriber.close()


# -- PostgreSQL ----------------------------------------------------------------------------


def _postgres_url(role: str, database: str, driver: str = "postgresql+psycopg") -> str:
    return f"{driver}://{role}@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"


def _admin_connect(role: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        _postgres_url(role, "postgres", driver="postgresql"), autocommit=True, connect_timeout=3
    )


def _schema_hash() -> str:
    """Hash of the migration scripts: a schema change gets a new template database."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "alembic").rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _database_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def _drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_role() -> str:
    """The role that can log in (trust auth): ``postgres``, else ``root``."""
    errors = []
    for role in POSTGRES_ROLES:
        try:
            with _admin_connect(role) as conn:
                conn.execute("SELECT 1")
            return role
        except psycopg.OperationalError as exc:
            errors.append(f"{role}: {str(exc).strip().splitlines()[0] if str(exc) else exc}")
    service_missing(
        f"PostgreSQL unavailable on {POSTGRES_HOST}:{POSTGRES_PORT} ({'; '.join(errors)})"
    )


@pytest.fixture(scope="session")
def postgres_template(postgres_role: str) -> str:
    """Name of a migrated template database, built once per schema version.

    Built under a temporary name and renamed when complete, so an interrupted build is never
    reused; templates of other schema versions are dropped when nobody uses them.
    """
    from outbox.migration import upgrade_to_head

    name = f"{TEMPLATE_PREFIX}{_schema_hash()}"
    with _admin_connect(postgres_role) as conn:
        stale = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s AND datname <> %s",
            (TEMPLATE_PREFIX + "%", name),
        ).fetchall()
        for (old,) in stale:
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(old)))
        if _database_exists(conn, name):
            return name
        building = f"{name}_building_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(building)))
        try:
            upgrade_to_head(_postgres_url(postgres_role, building))
            # CREATE DATABASE ... TEMPLATE needs the template free of connections.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (building,),
            )
            # DuplicateDatabase: another session finished the same template first.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(building), sql.Identifier(name)
                    )
                )
        finally:
            _drop_database(conn, building)
    return name


@pytest.fixture
def postgres_database_url(postgres_role: str, postgres_template: str) -> Iterator[str]:
    """A fresh migrated PostgreSQL database for this test, dropped afterwards."""
    name = f"{TEST_DB_PREFIX}{uuid.uuid4().hex[:16]}"
    with _admin_connect(postgres_role) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(postgres_template)
            )
        )
    try:
        yield _postgres_url(postgres_role, name)
    finally:
        with _admin_connect(postgres_role) as conn:
            _drop_database(conn, name)


# -- SQLite --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, built once per session and copied for each test."""
    from outbox.migration import upgrade_to_head

    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_database_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh migrated SQLite file in ``tmp_path``."""
    path = tmp_path / "outbox.sqlite3"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


# -- any database --------------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """A freshly migrated database of each supported kind (the test runs once per kind)."""
    url: str = request.getfixturevalue(f"{request.param}_database_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[sqlalchemy.Engine]:
    """A SQLAlchemy engine on ``database_url``, disposed after the test."""
    engine = sqlalchemy.create_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A dedicated Redis database number, flushed before and after the test."""
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        service_missing(f"Redis unavailable at {REDIS_TEST_URL}: {exc}")
    try:
        client.flushdb()
        yield REDIS_TEST_URL
    finally:
        with contextlib.suppress(redis.RedisError):
            client.flushdb()
        client.close()
