"""The real components a benchmark run uses: databases, the broker, soketi and Celery workers.

Every database, queue and process made here is removed or stopped by the ``close``/``stop``
methods, which the runner calls from ``finally`` blocks.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Celery
from psycopg import sql

from bench import procs

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS_URL = "redis://127.0.0.1:6379/12"
DB_PREFIX = "outbox_bench_"
POSTGRESQL = "postgresql"
SQLITE = "sqlite"
DATABASES = (POSTGRESQL, SQLITE)

logger = logging.getLogger("bench")


LOCK_PATH = Path(tempfile.gettempdir()) / "pusher-outbox-bench.lock"


@contextlib.contextmanager
def exclusive_run(timeout_seconds: float) -> Iterator[None]:
    """Hold the benchmark lock: two runs would share Redis db 12 and the machine's cores."""
    with LOCK_PATH.open("a") as handle:
        deadline = time.monotonic() + timeout_seconds
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another benchmark holds {LOCK_PATH} (waited {timeout_seconds:g}s)"
                    ) from None
                if not announced:
                    logger.info("another benchmark is running; waiting for it to finish")
                    announced = True
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ServiceUnavailable(RuntimeError):
    """PostgreSQL, Redis or soketi is not there: ``scripts/ensure_services.sh`` starts them."""


def check_services() -> None:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise ServiceUnavailable(f"PostgreSQL on 127.0.0.1:5432: {exc}") from None
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis at {REDIS_URL}: {exc}") from None
    finally:
        client.close()


def flush_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def queue_length(queue: str) -> int:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def new_master_key_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# -- databases ------------------------------------------------------------------------------


class Databases:
    """Migrated databases made from one template per kind; everything dropped by :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # The owner's pid in every name: a later run drops only databases of dead runs.
        self.run_id = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._postgres: list[str] = []
        self._pg_template: str | None = None
        self._sqlite_template: Path | None = None
        self._counter = 0

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)

    def _new_name(self) -> str:
        self._counter += 1
        return f"{DB_PREFIX}{self.run_id}_{self._counter}"

    def create(self, kind: str) -> str:
        """A fresh, migrated, empty database of ``kind``; returns its SQLAlchemy URL."""
        from outbox.migration import upgrade_to_head

        if kind == SQLITE:
            if self._sqlite_template is None:
                self._sqlite_template = self.workdir / "template.sqlite3"
                upgrade_to_head(f"sqlite:///{self._sqlite_template}")
            path = self.workdir / f"{self._new_name()}.sqlite3"
            shutil.copyfile(self._sqlite_template, path)
            return f"sqlite:///{path}"
        with self._admin() as conn:
            if self._pg_template is None:
                template = self._new_name()
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
                self._postgres.append(template)
                upgrade_to_head(POSTGRES_URL.format(name=template))
                self._pg_template = template
            name = self._new_name()
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(self._pg_template)
                )
            )
            self._postgres.append(name)
        return POSTGRES_URL.format(name=name)

    def drop(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{path}{suffix}").unlink()
            return
        name = url.rsplit("/", 1)[1]
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        with contextlib.suppress(ValueError):
            self._postgres.remove(name)

    def close(self) -> None:
        names = list(reversed(self._postgres))
        self._postgres.clear()
        if not names:
            return
        with contextlib.suppress(psycopg.Error), self._admin() as conn:
            for name in names:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )


def drop_leftover_databases() -> None:
    """Drop databases that interrupted earlier runs left behind (``outbox_bench_<pid>_*`` whose
    process is gone)."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (DB_PREFIX + "%",)
        ).fetchall()
        for (name,) in rows:
            owner = name.removeprefix(DB_PREFIX).split("_", 1)[0]
            if owner.isdigit() and Path(f"/proc/{owner}").exists():
                continue
            with contextlib.suppress(psycopg.Error):
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


# -- environment of the subprocesses ---------------------------------------------------------


def child_env(pusher_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of workers and producers.

    Inherits the caller's environment (so ``OUTBOX_CLAIM_BATCH_SIZE=…`` and the other relay
    settings can be tuned from the command line) but never its database, broker or Pusher target.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PUSHER_", "SOKETI_"))
        and k not in ("OUTBOX_DATABASE_URL", "OUTBOX_BROKER_URL", "OUTBOX_BROKER_DIR")
    }
    env.update(pusher_env)
    env["OUTBOX_BROKER_URL"] = REDIS_URL
    env["BENCH_BROKER_URL"] = REDIS_URL
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- Celery workers -------------------------------------------------------------------------


def control_app() -> Celery:
    """A bare Celery app on the benchmark broker, for remote control of any worker."""
    return Celery("bench_control", broker=REDIS_URL, set_as_current=False)


class Workers:
    """``celery -A <app> worker`` with ``concurrency`` prefork processes, in its own group."""

    def __init__(
        self,
        *,
        app: str,
        queue: str,
        concurrency: int,
        env: dict[str, str],
        workdir: Path,
        label: str,
    ) -> None:
        self.app = app
        self.queue = queue
        self.concurrency = concurrency
        self.env = env
        self.workdir = workdir
        self.name = f"bench-{label}-{uuid.uuid4().hex[:6]}@bench"
        self.log_path = workdir / f"worker-{label}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._control = control_app()

    def start(self, timeout_seconds: float = 60.0) -> None:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-P",
            "prefork",
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            self.name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]
        self.process = procs.spawn(argv, env=self.env, log_path=self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.app} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            pong = self._control.control.ping(destination=[self.name], timeout=0.5)
            if pong and len(self.child_pids()) >= self.concurrency:
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.app} not ready in {timeout_seconds:g}s")

    def child_pids(self) -> list[int]:
        return procs.children(self.process.pid) if self.process is not None else []

    def pause(self) -> None:
        """Stop taking messages from the queue (they pile up in Redis)."""
        replies = self._control.control.cancel_consumer(
            self.queue, destination=[self.name], reply=True, timeout=5
        )
        if not replies:
            raise RuntimeError(f"worker {self.name} did not answer cancel_consumer")

    def resume(self) -> None:
        replies = self._control.control.add_consumer(
            self.queue, destination=[self.name], reply=True, timeout=5
        )
        if not replies:
            raise RuntimeError(f"worker {self.name} did not answer add_consumer")

    def purge(self) -> int:
        """Drop the messages still queued (e.g. kicks for rows already delivered)."""
        with self._control.connection_for_write() as conn:
            return int(conn.default_channel.queue_purge(self.queue) or 0)

    def rss(self) -> dict[str, float | None]:
        """RSS in MiB of the main process and the largest pool process (/proc VmRSS)."""
        if self.process is None:
            return {"main_mib": None, "pool_max_mib": None}
        main = procs.rss_bytes(self.process.pid)
        pool = [r for r in (procs.rss_bytes(p) for p in self.child_pids()) if r is not None]
        return {
            "main_mib": main / 2**20 if main else None,
            "pool_max_mib": max(pool) / 2**20 if pool else None,
        }

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)
            self.process = None
        with contextlib.suppress(Exception):
            self._control.close()
