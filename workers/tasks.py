"""Celery tasks. Messages carry row ids only (integers), never payloads.

``relay`` is the after-commit kick: it wakes a relay at once. ``sweep`` runs periodically (beat)
and delivers anything a kick missed, returns rows of dead workers, expires, erases and purges.
The due time of a retry lives in the table; no task is ever scheduled with a long countdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from workers import runtime
from workers.app import RELAY_TASK, SWEEP_TASK, app

logger = logging.getLogger("workers.tasks")

# A kick sent this long before this process last started a drain is redundant: that drain began
# after the kick's rows were committed and claimed everything due. The margin absorbs clock skew
# between the application's host and the worker's; a kick skipped wrongly only costs latency
# (the sweep delivers).
KICK_SKEW_SECONDS = 0.1
_last_drain_started = 0.0


def _drain(rt: runtime.Runtime) -> Any:
    global _last_drain_started
    _last_drain_started = time.time()
    return rt.relay.drain(max_seconds=rt.settings.drain_seconds)


@app.task(name=RELAY_TASK, ignore_result=True)
def relay(row_ids: Sequence[int] = (), sent_at: float | None = None) -> dict[str, int]:
    """Deliver due rows now. ``row_ids`` are hints for logs; order comes from the table.

    Kicks coalesce: under load many kicks queue up while a drain runs, and every one sent before
    the latest drain of this process started is skipped without touching the database.
    """
    if not all(isinstance(row_id, int) for row_id in row_ids):
        raise TypeError("relay task takes integer row ids only")
    if sent_at is not None and sent_at < _last_drain_started - KICK_SKEW_SECONDS:
        return {"skipped": 1}
    return _counts(_drain(runtime.get()))


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> dict[str, int]:
    """Deliver what kicks missed, reclaim expired leases, expire, erase and purge (bounded)."""
    rt = runtime.get()
    settings = rt.settings
    global _last_drain_started
    _last_drain_started = time.time()
    report = rt.relay.sweep(max_seconds=settings.drain_seconds)
    erased = rt.store.erase_payloads(
        phi_retention_seconds=settings.phi_retention_seconds,
        payload_retention_seconds=settings.payload_retention_seconds,
        dead_retention_seconds=settings.dead_retention_seconds,
    )
    purged = rt.store.purge(older_than_seconds=settings.row_retention_seconds)
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


def kick(row_ids: Sequence[int]) -> None:
    """The ``on_commit`` callback for :class:`outbox.Outbox`: enqueue one relay task.

    Fails fast (no publish retries, short connect timeout) so an app's request never waits on a
    broker that is down; the periodic sweep delivers the rows anyway.
    """
    relay.apply_async(
        args=([int(row_id) for row_id in row_ids],),
        kwargs={"sent_at": time.time()},
        retry=False,
    )
