"""Run a local soketi (Pusher-protocol server) for tests and the demo.

soketi is installed from npm by ``make install`` (``npm ci``) into ``node_modules`` at the
repository root. :class:`Soketi` starts one server per instance on a free port, in its own
process group, with credentials generated per instance, and promises to stop it: on
``stop()``, on leaving the ``with`` block, and at interpreter exit.

Settings worth knowing:

- soketi measures its event size limit in KiB (``SOKETI_EVENT_MAX_SIZE_IN_KB=10`` rejects data
  strings above 10,240 bytes); the default here is 10 to match Pusher's documented 10 KB.
- the process runs in a private temporary directory: soketi loads a ``.env`` file from its
  working directory, and the project's own ``.env`` must not reconfigure it.
- the metrics/usage server soketi always opens gets its own free port too.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "Soketi",
    "SoketiError",
    "SoketiNotInstalledError",
    "SoketiStartError",
    "find_free_port",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SOKETI_BIN = Path("node_modules") / ".bin" / "soketi"
_LOG_TAIL_LINES = 40
# Attempts when a free port picked by us is taken by someone else before soketi binds it.
_PORT_ATTEMPTS = 3


class SoketiError(RuntimeError):
    """Base class of the errors of the soketi runner."""


class SoketiNotInstalledError(SoketiError):
    """node or the npm packages are missing: run ``make install``."""


class SoketiStartError(SoketiError):
    """soketi did not become ready in time, exited, or another server answers on its port."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# Direct connections only: a proxy configured in the environment must not see test traffic.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_running: set[Soketi] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _running_lock:
        instances = list(_running)
    for instance in instances:
        with contextlib.suppress(Exception):
            instance.close()


class Soketi:
    """One soketi server process.

    Use it as a context manager (``with Soketi() as server:``) or call :meth:`start` and
    :meth:`close`. The server listens on ``host`` only. ``port`` and ``metrics_port`` are
    chosen when not given, and kept across :meth:`restart` so that clients can reconnect.

    ``key`` and ``secret`` are random per instance unless given, so a request signed for this
    instance fails on any other server that happens to answer on the same port; :meth:`start`
    uses that to make sure it talks to its own process.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        metrics_port: int | None = None,
        app_id: str = "12345",
        key: str | None = None,
        secret: str | None = None,
        event_max_size_kb: float = 10,
        root: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout_seconds: float = 30.0,
        stop_timeout_seconds: float = 5.0,
        extra_env: dict[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if not app_id.isdigit():
            raise ValueError(
                "app_id must be digits: the Python Pusher SDK accepts numeric ids only"
            )
        if event_max_size_kb <= 0:
            raise ValueError("event_max_size_kb must be positive")
        self.host = host
        self._requested_port = port
        self._requested_metrics_port = metrics_port
        self.port = port or 0
        self.metrics_port = metrics_port or 0
        self.app_id = app_id
        self.key = key or f"key-{secrets.token_hex(8)}"
        self.secret = secret or secrets.token_hex(16)
        self.event_max_size_kb = event_max_size_kb
        self.root = Path(root) if root is not None else _REPO_ROOT
        self.start_timeout_seconds = start_timeout_seconds
        self.stop_timeout_seconds = stop_timeout_seconds
        self.extra_env = dict(extra_env or {})
        self.die_with_parent = die_with_parent
        self._workdir: Path | None = None
        self._given_log_path = Path(log_path) if log_path is not None else None
        self._log_file: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<Soketi {self.host}:{self.port} app_id={self.app_id} {state}>"

    # -- addresses and settings -------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API, e.g. ``http://127.0.0.1:6001``."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Base URL of the websocket server, e.g. ``ws://127.0.0.1:6001``."""
        return f"ws://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """File receiving soketi's stdout and stderr (appended across restarts)."""
        if self._given_log_path is not None:
            return self._given_log_path
        return self._ensure_workdir() / "soketi.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def env(self) -> dict[str, str]:
        """The ``PUSHER_*`` variables that point our settings at this server."""
        return {
            "PUSHER_APP_ID": self.app_id,
            "PUSHER_KEY": self.key,
            "PUSHER_SECRET": self.secret,
            "PUSHER_HOST": self.host,
            "PUSHER_PORT": str(self.port),
            "PUSHER_SCHEME": "http",
        }

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def api_get(self, suffix: str) -> tuple[int, object]:
        """Signed GET on ``/apps/<app_id><suffix>`` (e.g. ``/channels``): (status, JSON body).

        For tests that inspect the server (occupied channels, connection counts).
        """
        status, body = self._get_text(self._signed_path(suffix))
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: clean up here (the error holds the log tail)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Start the server and return once it answers on ``http_url`` as this instance.

        Raises :class:`SoketiNotInstalledError` when node or ``node_modules`` are missing and
        :class:`SoketiStartError` (with the log tail) when it is not ready in
        ``start_timeout_seconds``. Nothing is left running when it raises.
        """
        if self.is_running:
            return self
        node, script = self._locate()
        attempts = 1 if self._requested_port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self._requested_port and (attempt > 1 or not self.port):
                self.port = find_free_port(self.host)
            if not self._requested_metrics_port and (attempt > 1 or not self.metrics_port):
                self.metrics_port = find_free_port(self.host)
            self._spawn(node, script)
            try:
                self._wait_ready()
            except _PortTakenError:
                self.stop()
                if attempt == attempts:
                    raise SoketiStartError(
                        f"another server answers on {self.host}:{self.port}; choose another port"
                    ) from None
            except BaseException:
                self.stop()
                raise
            else:
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after ``stop_timeout_seconds``.

        Keeps the port, the credentials and the log so that :meth:`start` can bring the same
        server back. Safe to call when nothing runs.
        """
        process = self._process
        self._process = None
        with _running_lock:
            _running.discard(self)
        if process is not None:
            _terminate_group(process, self.stop_timeout_seconds)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> Self:
        """Stop, then start again on the same port with the same credentials."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and delete the private working directory (and the log kept there)."""
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- internals ------------------------------------------------------------------------

    def _locate(self) -> tuple[str, Path]:
        node = shutil.which("node")
        if node is None:
            raise SoketiNotInstalledError(
                "node is not on PATH: install Node.js 20, then run `make install`"
            )
        script = self.root / _SOKETI_BIN
        if not script.exists():
            raise SoketiNotInstalledError(
                f"{script} is missing: run `make install` (it runs `npm ci`) in {self.root}"
            )
        return node, script.resolve()

    def _ensure_workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="outbox-soketi-"))
        return self._workdir

    def _child_env(self) -> dict[str, str]:
        # Inherited SOKETI_* variables would silently change the server under test.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOKETI_")}
        env.update(
            {
                "SOKETI_HOST": self.host,
                "SOKETI_PORT": str(self.port),
                "SOKETI_METRICS_ENABLED": "false",
                "SOKETI_METRICS_HOST": self.host,
                "SOKETI_METRICS_SERVER_PORT": str(self.metrics_port),
                "SOKETI_DEFAULT_APP_ID": self.app_id,
                "SOKETI_DEFAULT_APP_KEY": self.key,
                "SOKETI_DEFAULT_APP_SECRET": self.secret,
                "SOKETI_DEFAULT_APP_ENABLE_CLIENT_MESSAGES": "false",
                "SOKETI_EVENT_MAX_SIZE_IN_KB": format(self.event_max_size_kb, "g"),
                "SOKETI_SHUTDOWN_GRACE_PERIOD": "100",
                "SOKETI_DEBUG": "false",
            }
        )
        env.update(self.extra_env)
        return env

    def _spawn(self, node: str, script: Path) -> None:
        workdir = self._ensure_workdir()
        log_path = self.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log_path.open("ab")
        self._log_file.write(f"--- starting soketi on {self.host}:{self.port}\n".encode())
        self._log_file.flush()
        # argv is node plus a resolved path inside node_modules; no shell is involved.
        self._process = subprocess.Popen(  # noqa: S603
            [node, str(script), "start"],
            cwd=workdir,
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=parent_death_signal(os.getpid()) if self.die_with_parent else None,
        )
        with _running_lock:
            _running.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_seconds
        while True:
            process = self._process
            assert process is not None
            code = process.poll()
            if code is not None:
                raise SoketiStartError(
                    f"soketi exited with code {code} during startup; log tail:\n{self.log_tail()}"
                )
            if self._get_text("/") == (200, "OK"):
                status, body = self._get_text(self._signed_path("/channels"))
                if status == 200 and '"channels"' in body:
                    if _listens_on(process.pid, self.port) is False:
                        # An older server with the same credentials owns the port and ours
                        # failed to bind (uWebSockets does not report that).
                        raise _PortTakenError
                    return
                if status in (401, 404) or '"code":401' in body or '"code":404' in body:
                    # Someone else's server (other credentials) owns the port.
                    raise _PortTakenError
            if time.monotonic() >= deadline:
                raise SoketiStartError(
                    f"soketi did not answer on {self.http_url} within "
                    f"{self.start_timeout_seconds:g}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _signed_path(self, suffix: str) -> str:
        """A signed GET path for the HTTP API (Pusher's auth_signature scheme)."""
        path = f"/apps/{self.app_id}{suffix}"
        query = f"auth_key={self.key}&auth_timestamp={int(time.time())}&auth_version=1.0"
        signature = hmac.new(
            self.secret.encode(), f"GET\n{path}\n{query}".encode(), hashlib.sha256
        ).hexdigest()
        return f"{path}?{query}&auth_signature={signature}"

    def _get_text(self, path: str) -> tuple[int, str]:
        """GET ``path``: (status, body), or (0, "") when nothing answers."""
        url = f"{self.http_url}{path}"
        try:
            with _opener.open(url, timeout=1.0) as response:
                return int(response.status), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return 0, ""


class _PortTakenError(Exception):
    pass


def parent_death_signal(parent_pid: int) -> Callable[[], None] | None:
    """On Linux, a pre-exec hook asking the kernel to SIGTERM the child when we die.

    atexit does not run when the test runner is killed (CI timeout, SIGKILL); this does. The
    kernel ties it to the thread that spawned the child: start children from a long-lived
    thread (normally the main one). Every subprocess the kit, the benchmark, the acceptance
    tests and the demo start uses this hook.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether ``pid`` holds a listening TCP socket on ``port``; None when /proc can't tell."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        fd_dir = Path(f"/proc/{pid}/fd")
        if not fd_dir.is_dir():
            return None
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                    return True
    except (OSError, IndexError, ValueError):
        return None
    return False


def _terminate_group(process: subprocess.Popen[bytes], timeout_seconds: float) -> None:
    """SIGTERM the process group, SIGKILL it if the leader is still there after the timeout."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_seconds)
