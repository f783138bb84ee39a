"""Stats and metrics read from the table and from what the relay did."""

from __future__ import annotations

import datetime as dt
import logging

from prometheus_client import generate_latest
from sqlalchemy.orm import Session

from outbox import metrics, new_opaque_id
from outbox.errors import PermanentPublishError
from outbox.relay import Relay
from outbox.store import Store
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS, FakePublisher, make_outbox

CANARY = "CANARY-metrics-Patient"


def enqueue(engine, n, *, phi=False):
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    with Session(engine) as session, session.begin():
        for _ in range(n):
            if phi:
                outbox.enqueue(
                    session,
                    ORDER_DETAILS,
                    ids={"pharmacy_id": pharmacy},
                    data={
                        "order_id": new_opaque_id("ord"),
                        "patient": CANARY,
                        "medication": CANARY,
                    },
                )
            else:
                outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
                )


def sample(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_stats_report_throughput_latency_and_workers(engine):
    enqueue(engine, 12)
    store = Store(engine)
    Relay(store=store, publisher=FakePublisher()).drain(max_seconds=5)
    stats = store.stats()
    assert stats["by_status"]["sent"] == 12
    assert stats["throughput_per_second"]["1m"] == 12 / 60
    latency = stats["latency_seconds"]
    assert latency["samples"] == 12
    assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] < 5
    assert store.workers_alive(within_seconds=60) == []
    store.heartbeat(
        worker_id="w@h", host="h", pid=7, version="0.1.0", started_at=dt.datetime.now(dt.UTC)
    )
    store.heartbeat(
        worker_id="w@h", host="h", pid=8, version="0.1.0", started_at=dt.datetime.now(dt.UTC)
    )
    [alive] = store.workers_alive(within_seconds=60)
    assert alive["pid"] == 8
    store.forget_worker("w@h")
    assert store.workers_alive(within_seconds=60) == []


def test_relay_metrics_count_outcomes_with_bounded_labels(engine, caplog):
    caplog.set_level(logging.DEBUG)
    before_sent = sample("outbox_events_published_total", type="order.created")
    before_dead = sample(
        "outbox_events_failed_total", type="order.details", outcome="dead", reason_class="http_4xx"
    )
    enqueue(engine, 5)
    enqueue(engine, 2, phi=True)
    fake = FakePublisher(
        fail_for=lambda e: (
            PermanentPublishError("HTTP 400 from Pusher: request rejected as invalid", status=400)
            if e.channel.startswith("private-encrypted-")
            else None
        )
    )
    store = Store(engine)
    Relay(store=store, publisher=fake, observer=metrics.PrometheusObserver()).drain(max_seconds=5)
    assert sample("outbox_events_published_total", type="order.created") - before_sent == 5
    assert (
        sample(
            "outbox_events_failed_total",
            type="order.details",
            outcome="dead",
            reason_class="http_4xx",
        )
        - before_dead
        == 2
    )
    text = generate_latest(metrics.registry(store)).decode()
    assert 'outbox_queue_events{status="dead"} 2.0' in text
    assert "outbox_queue_lag_seconds 0.0" in text
    assert "outbox_commit_to_publish_seconds_bucket" in text
    assert "pha_" not in text  # no channel names or ids in labels
    assert CANARY not in text
    assert CANARY not in caplog.text


def test_log_formatters_render_extras_and_withhold_exception_messages():
    from outbox import log

    record = logging.LogRecord(
        "outbox.relay", logging.WARNING, __file__, 1, "publish failed", None, None
    )
    record.event_id = "evt_x"
    try:
        raise ValueError(f"Failing row contains ({CANARY})")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    for formatter in log.FORMATTERS.values():
        text = formatter().format(record)
        assert "evt_x" in text
        assert "ValueError" in text
        assert CANARY not in text


def test_reads_do_not_wait_for_a_sqlite_writer(database_url):
    """Stats and dashboards must not take SQLite's write lock (BEGIN IMMEDIATE)."""
    import time

    import sqlalchemy as sa

    from outbox.store import create_engine

    engine = create_engine(database_url)
    other = create_engine(database_url)
    try:
        with engine.begin() as writer:  # holds the write lock on SQLite
            writer.execute(sa.text("UPDATE outbox_channel_sequences SET last_seq = last_seq"))
            started = time.monotonic()
            Store(other).stats()
            assert time.monotonic() - started < 2
    finally:
        engine.dispose()
        other.dispose()
