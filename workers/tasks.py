"""Celery tasks. Messages carry row ids only (integers), never payloads.

``relay`` is the after-commit kick: it wakes a relay at once (kicks from one process within
``OUTBOX_KICK_COALESCE_SECONDS`` of each other are merged). ``sweep`` runs periodically (beat)
and delivers anything a kick missed, returns rows of dead workers, expires, erases and purges.
The due time of a retry lives in the table; no task is ever scheduled with a long countdown.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from outbox.settings import load_settings
from workers import runtime
from workers.app import RELAY_TASK, SWEEP_TASK, app

logger = logging.getLogger("workers.tasks")

# A kick sent this long before this process's relay last caught up (a claim that took every
# claimable row) is redundant. The margin absorbs clock skew between the application's host and
# the worker's; a kick skipped wrongly only costs latency (the sweep delivers).
KICK_SKEW_SECONDS = 0.1


def _drain(rt: runtime.Runtime) -> Any:
    report = rt.relay.drain(max_seconds=rt.settings.drain_seconds)
    if not report.exhausted:
        # The drain ran out of time with rows still due: carry on in a new task (other tasks
        # queued meanwhile get their turn) rather than leave them to the sweep.
        _kick_again()
    return report


def _kick_again() -> None:
    try:
        send_kick(())
    except Exception as exc:  # noqa: BLE001 - the sweep delivers; the task's work is done
        logger.warning(
            "outbox could not queue the follow-up relay task; the sweep will deliver the rows",
            extra={"error_class": type(exc).__name__},
        )


@app.task(name=RELAY_TASK, ignore_result=True)
def relay(row_ids: Sequence[int] = (), sent_at: float | None = None) -> dict[str, int]:
    """Deliver due rows now. ``row_ids`` are hints for logs; order comes from the table.

    Kicks coalesce: under load many kicks queue up while a drain runs, and every one sent before
    this process's relay last caught up is skipped without touching the database.
    """
    if not all(isinstance(row_id, int) for row_id in row_ids):
        raise TypeError("relay task takes integer row ids only")
    rt = runtime.get()
    if sent_at is not None and sent_at < rt.relay.caught_up_at - KICK_SKEW_SECONDS:
        return {"skipped": 1}
    return _counts(_drain(rt))


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> dict[str, int]:
    """Deliver what kicks missed, reclaim expired leases, expire, erase and purge (bounded)."""
    rt = runtime.get()
    settings = rt.settings
    report = rt.relay.sweep(max_seconds=settings.drain_seconds)
    erased = rt.store.erase_payloads(
        phi_retention_seconds=settings.phi_retention_seconds,
        payload_retention_seconds=settings.payload_retention_seconds,
        dead_retention_seconds=settings.dead_retention_seconds,
    )
    purged = rt.store.purge(older_than_seconds=settings.row_retention_seconds)
    if not report.exhausted:
        _kick_again()  # more is due than one drain delivers: carry on in a relay task
    counts = _counts(report)
    counts.update(erased=erased, purged=purged)
    return counts


def _counts(report: Any) -> dict[str, int]:
    return {
        "claimed": report.claimed,
        "sent": report.sent,
        "retried": report.retried,
        "dead": report.dead,
        "expired": report.expired,
        "released": report.released,
    }


def send_kick(row_ids: Sequence[int]) -> None:
    """Enqueue one relay task now.

    Fails fast (no publish retries, short connect timeout) so an app's request never waits on a
    broker that is down; the periodic sweep delivers the rows anyway.
    """
    relay.apply_async(
        args=([int(row_id) for row_id in row_ids],),
        kwargs={"sent_at": time.time()},
        retry=False,
    )


# Row ids a coalesced kick carries as hints (the relay reads the table, not the ids).
KICK_HINT_LIMIT = 100


class KickCoalescer:
    """At most one kick per ``window`` seconds from this process, and none delayed needlessly.

    The first kick after a quiet window goes out at once. Kicks that follow within the window
    are merged into one, sent when the window closes: one relay task then delivers them all.
    Each kick costs the application a broker round trip and the worker a task dispatch (about
    2 ms of CPU each); under load most kicks are redundant, since one drain claims everything
    due. ``window`` 0 sends every kick at once.
    """

    def __init__(self, window: float, send: Callable[[Sequence[int]], None]) -> None:
        self.window = window
        self.send = send
        self._lock = threading.Lock()
        self._last_sent = -float("inf")
        self._waiting: list[int] | None = None  # the merged kick, while its timer runs

    def __call__(self, row_ids: Sequence[int]) -> None:
        ids = [int(row_id) for row_id in row_ids]
        with self._lock:
            if self._waiting is not None:
                self._waiting.extend(ids[: KICK_HINT_LIMIT - len(self._waiting)])
                return
            now = time.monotonic()
            if now - self._last_sent < self.window:
                timer = threading.Timer(self._last_sent + self.window - now, self._flush)
                timer.daemon = True
                try:
                    timer.start()  # it waits for this lock before reading _waiting
                except RuntimeError:
                    pass  # no thread to spare: send this kick now rather than wedge the rest
                else:
                    self._waiting = ids[:KICK_HINT_LIMIT]
                    return
            self._last_sent = now
        self.send(ids)  # a failure reaches the caller (the after-commit hook logs it)

    def flush(self) -> None:
        """Send the merged kick now, if one is waiting (at exit)."""
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            ids, self._waiting = self._waiting, None
            self._last_sent = time.monotonic()
        if ids is None:
            return
        try:
            self.send(ids)
        except Exception as exc:  # noqa: BLE001 - the sweep delivers; never kill the timer thread
            logger.warning(
                "outbox kick failed; the periodic sweep will deliver the rows",
                extra={"rows": len(ids), "error_class": type(exc).__name__},
            )


_coalescer: KickCoalescer | None = None
_coalescer_lock = threading.Lock()


def _reset_coalescer() -> None:
    global _coalescer, _coalescer_lock
    _coalescer, _coalescer_lock = None, threading.Lock()


def _flush_at_exit() -> None:
    if _coalescer is not None:  # a forked child starts with none: never the parent's kicks
        _coalescer.flush()


os.register_at_fork(after_in_child=_reset_coalescer)
atexit.register(_flush_at_exit)


def kick(row_ids: Sequence[int]) -> None:
    """The ``on_commit`` callback for :class:`outbox.Outbox`: wake a relay.

    Coalesced per process (``OUTBOX_KICK_COALESCE_SECONDS``, see :class:`KickCoalescer`).
    """
    global _coalescer
    coalescer = _coalescer
    if coalescer is None:
        with _coalescer_lock:
            if _coalescer is None:
                _coalescer = KickCoalescer(load_settings().kick_coalesce_seconds, send_kick)
            coalescer = _coalescer
    coalescer(row_ids)
