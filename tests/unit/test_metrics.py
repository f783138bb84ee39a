"""The relay's observer counts every event it is told about, by type, and times each one."""

from __future__ import annotations

import datetime as dt

from prometheus_client import REGISTRY

from outbox.metrics import PrometheusObserver
from outbox.store import ClaimedEvent, utcnow


def _event(number: int, type_name: str, age_seconds: float) -> ClaimedEvent:
    return ClaimedEvent(
        id=number,
        event_id=f"evt_{number:022d}",
        type_name=type_name,
        channel="private-encrypted-room_x",
        event_name="order.updated",
        ordering_key="private-encrypted-room_x",
        data="{}",
        encrypted=True,
        contains_phi=True,
        exclude_socket_id=None,
        attempts=1,
        created_at=utcnow() - dt.timedelta(seconds=age_seconds),
        expires_at=None,
        lease_token="token",
        attempt_log=None,
    )


def _sample(name: str, type_name: str) -> float:
    return REGISTRY.get_sample_value(name, {"type": type_name}) or 0.0


def test_sent_events_are_counted_and_timed_per_type():
    first, second = "metrics_test.first", "metrics_test.second"
    before = {
        (name, t): _sample(name, t)
        for t in (first, second)
        for name in (
            "outbox_events_published_total",
            "outbox_commit_to_publish_seconds_count",
            "outbox_commit_to_publish_seconds_sum",
        )
    }
    events = [_event(1, first, 2.0), _event(2, second, 0.0), _event(3, first, 4.0)]
    PrometheusObserver().sent(events)

    def delta(name: str, t: str) -> float:
        return _sample(name, t) - before[(name, t)]

    assert delta("outbox_events_published_total", first) == 2
    assert delta("outbox_events_published_total", second) == 1
    assert delta("outbox_commit_to_publish_seconds_count", first) == 2
    assert delta("outbox_commit_to_publish_seconds_count", second) == 1
    assert 6.0 <= delta("outbox_commit_to_publish_seconds_sum", first) < 7.0
    assert 0.0 <= delta("outbox_commit_to_publish_seconds_sum", second) < 1.0
