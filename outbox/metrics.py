"""Prometheus metrics: what the relay does (counters, histograms) and what the table holds (gauges).

Labels are bounded: notification type names (declared in code), reason classes and HTTP status
codes. Never channel names, ids or payloads.

Prefork workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before the worker starts;
:func:`registry` then aggregates every child process (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from outbox.store import ClaimedEvent, Store, utcnow

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX = "outbox"

PUBLISHED = Counter(f"{PREFIX}_events_published_total", "Events accepted by Pusher.", ["type"])
FAILED = Counter(
    f"{PREFIX}_events_failed_total",
    "Failed publish attempts, by outcome (retry or dead) and reason class.",
    ["type", "outcome", "reason_class"],
)
EXPIRED = Counter(f"{PREFIX}_events_expired_total", "Events past their time-to-live.", ["type"])
RELEASED = Counter(
    f"{PREFIX}_events_released_total", "Claimed events given back unsent (held by their key)."
)
LEASES_LOST = Counter(
    f"{PREFIX}_lease_takeovers_total",
    "Sent events whose lease another worker had taken over before the result was recorded.",
)
RESPONSES = Counter(
    f"{PREFIX}_pusher_responses_total", "Publish requests by HTTP status class.", ["status"]
)
PUBLISH_SECONDS = Histogram(
    f"{PREFIX}_publish_seconds",
    "Duration of one publish request (up to 10 events).",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COMMIT_TO_PUBLISH_SECONDS = Histogram(
    f"{PREFIX}_commit_to_publish_seconds",
    "Time from enqueue to Pusher accepting the event.",
    ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
BATCH_SIZE = Histogram(
    f"{PREFIX}_batch_events",
    "Events per publish request.",
    buckets=(1, 2, 3, 5, 8, 10),
)
CLAIM_SIZE = Histogram(
    f"{PREFIX}_claim_events",
    "Events per claim.",
    buckets=(0, 1, 5, 10, 25, 50, 100, 250, 500, 1000),
)

GAUGE_NAMES = (
    f"{PREFIX}_queue_events",
    f"{PREFIX}_queue_due_events",
    f"{PREFIX}_queue_lag_seconds",
    f"{PREFIX}_workers_alive",
)


def reason_class(status: int | None, transient: bool) -> str:
    """A bounded label for a failure: ``network``, ``http_4xx``, ``http_5xx``, ``http_429``…"""
    if status is None:
        return "network" if transient else "client"
    if status == 429:
        return "http_429"
    return f"http_{status // 100}xx"


class PrometheusObserver:
    """Receives relay events and updates the metrics above."""

    def request(self, size: int, seconds: float, status: int | None) -> None:
        BATCH_SIZE.observe(size)
        PUBLISH_SECONDS.observe(seconds)
        RESPONSES.labels(status="network_error" if status is None else str(status)).inc()

    def claimed(self, count: int) -> None:
        CLAIM_SIZE.observe(count)

    def sent(self, events: Sequence[ClaimedEvent]) -> None:
        # Labelled children looked up once per type and batch, not per event (a third of the
        # cost per event).
        now = utcnow()
        by_type: dict[str, list[ClaimedEvent]] = {}
        for ev in events:
            by_type.setdefault(ev.type_name, []).append(ev)
        for type_name, group in by_type.items():
            PUBLISHED.labels(type=type_name).inc(len(group))
            latency = COMMIT_TO_PUBLISH_SECONDS.labels(type=type_name)
            for ev in group:
                latency.observe(max((now - ev.created_at).total_seconds(), 0.0))

    def failed(self, ev: ClaimedEvent, *, dead: bool, status: int | None, transient: bool) -> None:
        FAILED.labels(
            type=ev.type_name,
            outcome="dead" if dead else "retry",
            reason_class=reason_class(status, transient),
        ).inc()

    def expired(self, count: int, type_names: Iterable[str] = ()) -> None:
        names = list(type_names)
        for name in names:
            EXPIRED.labels(type=name).inc()
        if len(names) < count:
            EXPIRED.labels(type="unknown").inc(count - len(names))

    def released(self, count: int) -> None:
        if count:
            RELEASED.inc(count)

    def leases_lost(self, count: int) -> None:
        if count:
            LEASES_LOST.inc(count)


class QueueCollector(Collector):
    """Gauges read from the outbox table at scrape time: visible even when every worker is down."""

    def __init__(self, store: Store, *, worker_silence_seconds: float = 60.0) -> None:
        self.store = store
        self.worker_silence_seconds = worker_silence_seconds

    def collect(self) -> Iterable[Metric]:
        stats = self.store.stats()
        events = GaugeMetricFamily(
            f"{PREFIX}_queue_events", "Outbox rows by status.", labels=["status"]
        )
        for status, count in stats["by_status"].items():
            events.add_metric([status], count)
        yield events
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_due_events", "Pending rows due now.", value=stats["due_now"]
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_lag_seconds",
            "Age of the oldest due row (0 when nothing is due).",
            value=stats["lag_seconds"],
        )
        alive = self.store.workers_alive(within_seconds=self.worker_silence_seconds)
        yield GaugeMetricFamily(
            f"{PREFIX}_workers_alive", "Workers with a recent heartbeat.", value=len(alive)
        )


RELAY_METRICS = (
    PUBLISHED,
    FAILED,
    EXPIRED,
    RELEASED,
    LEASES_LOST,
    RESPONSES,
    PUBLISH_SECONDS,
    COMMIT_TO_PUBLISH_SECONDS,
    BATCH_SIZE,
    CLAIM_SIZE,
)


def registry(store: Store | None = None) -> CollectorRegistry:
    """A registry with the relay metrics (all processes in multiprocess mode) and the gauges."""
    reg = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    else:
        for collector in RELAY_METRICS:
            reg.register(collector)
    if store is not None:
        reg.register(QueueCollector(store))
    return reg
