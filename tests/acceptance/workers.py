"""Run the real relay as users do: Celery worker and beat subprocesses, plus probes of their sinks.

- :class:`CeleryProcess` is one ``celery`` subprocess in its own process group, logging to a file;
  it is stopped with SIGTERM to the group, then SIGKILL after ``stop_timeout_seconds``.
- :func:`relay_worker` starts a worker (and optionally beat), waits until the worker is ready and
  stops everything on exit, also when the test fails.
- :func:`producer_app` points this process's ``workers.app`` (used by ``workers.kick``) at a broker.
- :class:`RedisMonitor` records every command Redis executes (``MONITOR``), and
  :func:`redis_snapshot` reads every key and value of one database: sinks to search for canaries.
- :func:`canary_forms` gives the canary and its base64 forms (kombu stores bodies in base64).

Every wait here is bounded.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import redis

from outbox.testing.soketi import parent_death_signal

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 40

_running: set[CeleryProcess] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:  # a safety net; tests stop their processes themselves
    with _running_lock:
        leftovers = list(_running)
    for process in leftovers:
        with contextlib.suppress(Exception):
            process.stop(timeout=2)


def child_env(values: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ``OUTBOX_*``/``PUSHER_*``, plus ``values``.

    The repository root goes first on ``PYTHONPATH`` so ``-A workers`` imports this checkout.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PUSHER_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


def relay_env(
    *,
    database_url: str,
    broker_url: str,
    pusher: Mapping[str, str],
    **overrides: str,
) -> dict[str, str]:
    """The variables a relay deployment sets, tuned for fast tests (sweep every 0.5 s)."""
    values = {
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_BROKER_URL": broker_url,
        "OUTBOX_SWEEP_INTERVAL_SECONDS": "0.5",
        "OUTBOX_DRAIN_SECONDS": "2",
        "OUTBOX_PUBLISH_TIMEOUT_SECONDS": "3",
        **pusher,
    }
    values.update(overrides)
    return values


class ProcessFailed(RuntimeError):
    """A celery process exited early or did not become ready in time (message has the log)."""


class CeleryProcess:
    """One ``python -m celery …`` subprocess in its own process group."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        stop_timeout_seconds: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "celery", *args]
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.stop_timeout_seconds = stop_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<CeleryProcess {self.name} pid={self.pid} rc={self.returncode}>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        if self._process is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.cwd.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        with _running_lock:
            self._process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(os.getpid()),
            )
            _running.add(self)
        return self

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Return once ``text`` is in the log; raise :class:`ProcessFailed` on exit or timeout."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            code = self.returncode
            if code is not None:
                raise ProcessFailed(
                    f"{self.name} exited with code {code} before logging {text!r}; log tail:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ProcessFailed(
                    f"{self.name} did not log {text!r} within {timeout:g}s; log tail:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; :class:`ProcessFailed` when still running after ``timeout``."""
        assert self._process is not None, "not started"
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(
                f"{self.name} still running after {timeout:g}s; log tail:\n{self.log_tail()}"
            ) from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (main process and pool children)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, sig)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the group, SIGKILL it after ``timeout``. Idempotent."""
        timeout = self.stop_timeout_seconds if timeout is None else timeout
        process = self._process
        try:
            if process is not None and process.poll() is None:
                self.kill(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill(signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=5)
            if process is not None:
                # Pool children may outlive a leader that exited on its own.
                self.kill(signal.SIGKILL)
        finally:
            with _running_lock:
                _running.discard(self)
            if self._log is not None:
                self._log.close()
                self._log = None


def worker_process(
    env: Mapping[str, str],
    workdir: Path,
    *,
    n: int = 1,
    loglevel: str = "INFO",
    concurrency: int = 2,
) -> CeleryProcess:
    """A relay worker (not started): prefork, queue ``outbox``, named ``w<n>@%h``."""
    return CeleryProcess(
        f"worker w{n}",
        [
            "-A",
            "workers",
            "worker",
            f"--loglevel={loglevel}",
            "--pool=prefork",
            f"--concurrency={concurrency}",
            "-Q",
            "outbox",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"w{n}@%h",
        ],
        env=env,
        cwd=workdir,
        log_path=workdir / f"worker-w{n}.log",
    )


def beat_process(env: Mapping[str, str], workdir: Path, *, loglevel: str = "INFO") -> CeleryProcess:
    """Celery beat (not started), its schedule file inside ``workdir``."""
    return CeleryProcess(
        "beat",
        ["-A", "workers", "beat", f"--loglevel={loglevel}", "-s", str(workdir / "schedule")],
        env=env,
        cwd=workdir,
        log_path=workdir / "beat.log",
    )


class RelayWorker:
    """A running relay: one or more workers and, optionally, beat."""

    def __init__(self, env: Mapping[str, str], workdir: Path, *, loglevel: str = "INFO") -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.loglevel = loglevel
        self.workers: list[CeleryProcess] = []
        self.beat: CeleryProcess | None = None

    @property
    def worker(self) -> CeleryProcess:
        return self.workers[0]

    def add_worker(
        self,
        *,
        concurrency: int = 2,
        wait_ready: bool = True,
        timeout: float = READY_TIMEOUT_SECONDS,
    ) -> CeleryProcess:
        process = worker_process(
            self.env,
            self.workdir,
            n=len(self.workers) + 1,
            loglevel=self.loglevel,
            concurrency=concurrency,
        )
        self.workers.append(process)
        process.start()
        if wait_ready:
            process.wait_for_log(" ready.", timeout)
        return process

    def start_beat(self, *, timeout: float = READY_TIMEOUT_SECONDS) -> CeleryProcess:
        if self.beat is not None:
            raise RuntimeError("beat already started")
        self.beat = beat_process(self.env, self.workdir, loglevel=self.loglevel)
        self.beat.start()
        self.beat.wait_for_log("beat: Starting", timeout)
        return self.beat

    def processes(self) -> list[CeleryProcess]:
        return [*self.workers, *([self.beat] if self.beat else [])]

    def log_text(self) -> str:
        """All logs (workers, then beat), each headed by the process name."""
        return "\n".join(f"===== {p.name}\n{p.log_text()}" for p in self.processes())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every worker's process group (not beat)."""
        for process in self.workers:
            process.kill(sig)

    def stop(self) -> None:
        """Stop beat first (no new sweeps), then the workers, in parallel."""
        if self.beat is not None:
            self.beat.stop()
        threads = [threading.Thread(target=p.stop) for p in self.workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STOP_TIMEOUT_SECONDS + 10)


@contextlib.contextmanager
def relay_worker(
    env: Mapping[str, str],
    workdir: Path,
    *,
    workers: int = 1,
    beat: bool = False,
    loglevel: str = "INFO",
    concurrency: int = 2,
) -> Iterator[RelayWorker]:
    """Start ``workers`` ready workers (and beat); stop them all on exit, even on failure."""
    relay = RelayWorker(env, workdir, loglevel=loglevel)
    try:
        for _ in range(workers):
            relay.add_worker(concurrency=concurrency)
        if beat:
            relay.start_beat()
        yield relay
    finally:
        relay.stop()


# -- this process as a producer ------------------------------------------------------------------


BROKER_DEPENDENT_KEYS = ("broker_transport", "broker_transport_options")


@contextlib.contextmanager
def producer_app(broker_url: str) -> Iterator[Any]:
    """Point this process's ``workers.app`` at ``broker_url`` while the block runs.

    The Celery app reads its configuration once, lazily, from the environment; a test that needs
    another broker than the one the app first saw re-derives the whole configuration from the
    current settings (``celery_config(load_settings(...))``, as a fresh process would) and makes
    the app forget its cached broker pools. Celery has no public call for the latter: we do what
    ``Celery._after_fork`` does. On exit the previous configuration comes back.
    """
    from celery.app.defaults import DEFAULTS

    from outbox.settings import load_settings
    from workers.app import app, celery_config

    wanted = celery_config(load_settings(broker_url=broker_url))
    # Keys that celery_config sets for one kind of broker only (the embedded broker's transport
    # class) must not survive from an earlier configuration: reset them to Celery's defaults.
    for key in BROKER_DEPENDENT_KEYS:
        wanted.setdefault(key, DEFAULTS.get(key))
    previous = {key: app.conf.get(key) for key in wanted}
    _forget_broker_connections(app)
    app.conf.update(wanted)
    try:
        yield app
    finally:
        _forget_broker_connections(app)
        app.conf.update(previous)


def _forget_broker_connections(app: Any) -> None:
    # kombu keeps one pool per broker URL in a process-wide registry; the app caches the pools of
    # the URL it saw first. Forgetting the cache makes the app look the pools up again for its
    # current URL (the registry's pools stay open and usable for whoever shares them).
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


# -- sinks ---------------------------------------------------------------------------------------


def canary_forms(canary: str) -> list[str]:
    """``canary`` and the text its bytes become inside any base64 string, at all 3 alignments."""
    raw = canary.encode()
    forms = [canary]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        start = -(-8 * shift // 6)  # first character made of canary bits only
        end = 8 * (shift + len(raw)) // 6
        forms.append(encoded[start:end])
    return forms


def find_canary(canary: str, text: str | bytes) -> str | None:
    """The form of ``canary`` present in ``text`` (plain or base64), else None."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    for form in canary_forms(canary):
        if form in text:
            return form
    return None


def decode_kombu_message(raw: bytes | str) -> tuple[dict[str, Any], Any]:
    """A kombu Redis message: (envelope, decoded body). Bodies are base64 JSON for Celery."""
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return envelope, json.loads(body)


class RedisMonitor:
    """Records every command the Redis server executes (``MONITOR``) while the block runs."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_connect_timeout=3)
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self.error: BaseException | None = None

    def __enter__(self) -> Self:
        connection = self._client.connection_pool.get_connection()
        connection.send_command("MONITOR")
        if connection.read_response() not in (b"OK", "OK"):
            raise RuntimeError("MONITOR refused")
        self._connection = connection
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._connection is not None:
            self._connection.disconnect()
            self._client.connection_pool.release(self._connection)
        self._client.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._connection.can_read(timeout=0.1):
                    line = self._connection.read_response(disable_decoding=True)
                    with self._lock:
                        self._lines.append(line if isinstance(line, bytes) else str(line).encode())
        except Exception as exc:  # recorded; the test asserts monitor.error is None
            self.error = exc

    @property
    def lines(self) -> list[bytes]:
        with self._lock:
            return list(self._lines)


def redis_snapshot(url: str) -> dict[bytes, list[bytes]]:
    """Every key of the database in ``url`` with its values (type-aware) and its ``DUMP``."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
    snapshot: dict[bytes, list[bytes]] = {}
    try:
        for key in client.scan_iter(count=500):
            kind = client.type(key)
            values: list[bytes] = []
            if kind == b"string":
                values.append(client.get(key) or b"")
            elif kind == b"list":
                values.extend(client.lrange(key, 0, -1))
            elif kind == b"hash":
                for field, value in client.hgetall(key).items():
                    values.extend((field, value))
            elif kind == b"set":
                values.extend(client.smembers(key))
            elif kind == b"zset":
                values.extend(member for member, _ in client.zrange(key, 0, -1, withscores=True))
            elif kind == b"stream":
                for entry_id, fields in client.xrange(key):
                    values.append(entry_id)
                    for field, value in fields.items():
                        values.extend((field, value))
            dumped = client.dump(key)
            if dumped is not None:
                values.append(dumped)
            snapshot[key] = values
    finally:
        client.close()
    return snapshot
