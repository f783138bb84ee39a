"""Bounded subprocesses: each in its own process group, always stopped (SIGTERM, then SIGKILL).

Every process the benchmark starts goes through :func:`spawn` and is registered here, so that
:func:`stop_all` (called from ``finally`` blocks, at interpreter exit and on SIGTERM/SIGINT) stops
whatever is left. On Linux the kernel also sends SIGTERM to a child whose parent dies (even by
SIGKILL), so nothing outlives an interrupted benchmark.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from outbox.testing.soketi import parent_death_signal

STOP_TIMEOUT_SECONDS = 5.0

_running: dict[int, subprocess.Popen[bytes]] = {}
_lock = threading.Lock()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (its own process group), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = log_path.open("ab")
    try:
        # argv is built by the benchmark itself (python/celery paths); no shell is involved.
        process = subprocess.Popen(  # noqa: S603
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=parent_death_signal(os.getpid()),
        )
    finally:
        log.close()  # the child holds its own descriptor
    with _lock:
        _running[process.pid] = process
    return process


def stop(process: subprocess.Popen[bytes], timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM the process group; SIGKILL it when the leader has not exited in time."""
    with _lock:
        _running.pop(process.pid, None)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_seconds)
    # The leader may be gone while children of its group linger (celery prefork children).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_seconds)


def wait(process: subprocess.Popen[bytes], timeout_seconds: float, what: str) -> int:
    """Wait for ``process`` to exit; stop it and raise ``TimeoutError`` after the timeout."""
    try:
        return process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        stop(process)
        raise TimeoutError(f"{what} did not finish within {timeout_seconds:g}s") from None


def stop_all() -> None:
    with _lock:
        processes = list(_running.values())
    for process in processes:
        with contextlib.suppress(Exception):
            stop(process)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    with contextlib.suppress(OSError):
        for task in task_dir.iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from /proc/<pid>/status (VmRSS), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def install_signal_handlers() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop every child."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def wait_until(
    predicate: Callable[[], bool], timeout_seconds: float, interval: float = 0.05
) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


atexit.register(stop_all)
