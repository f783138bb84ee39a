"""Fault tests: real Celery workers and beat, real PostgreSQL/SQLite, Redis and soketi.

For every fault, each committed event must reach a real websocket subscriber, in per-channel
commit order (the subscriber's first occurrences of each channel are ``seq`` 1..n), and at most
once more inside the documented duplicate window (Pusher accepted the request, the database did
not record it). Duplicates are counted by event id, printed (``FAULT …`` lines, visible with
``-s``) and bounded by the events that were in that window when the fault hit.

The database is the source of truth: the expected events are the rows of the outbox table.

Each test has its own Redis server (a subprocess on a free port), so no other test or process
sharing the machine's Redis can consume its kicks or sweeps, and the Redis test can stop it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import ChannelAuthorizer, Outbox, new_opaque_id
from outbox.models import events
from outbox.publisher import PusherPublisher
from outbox.store import create_engine
from outbox.testing.soketi import Soketi, find_free_port
from outbox.testing.subscriber import ReceivedEvent, Subscriber
from tests.acceptance.fault_proxy import Fault, FaultProxy, RequestRecord
from tests.acceptance.workers import (
    CeleryProcess,
    RelayWorker,
    beat_process,
    producer_app,
    relay_env,
)
from tests.conftest import service_missing
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS
from workers import kick

pytestmark = [pytest.mark.timeout(120), pytest.mark.soketi, pytest.mark.redis]

logger = logging.getLogger(__name__)

FAST_RELAY = {
    "OUTBOX_SWEEP_INTERVAL_SECONDS": "0.5",
    "OUTBOX_DRAIN_SECONDS": "2",
    "OUTBOX_RETRY_BASE_DELAY_SECONDS": "0.1",
    "OUTBOX_RETRY_MAX_DELAY_SECONDS": "1",
    "OUTBOX_RETRY_MAX_ATTEMPTS": "100",
    "OUTBOX_PUBLISH_TIMEOUT_SECONDS": "1",
    "OUTBOX_HEARTBEAT_SECONDS": "1",
}
SETTLE_SECONDS = 1.5  # after the last event arrived: time for a late duplicate to show up


# -- a Redis server of our own --------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free port, no persistence, as a subprocess we own (stop/start)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = find_free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    service_missing(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- the deployment under test --------------------------------------------------------------------


class Deployment:
    """The application (this process), the relay processes, and what the subscriber saw.

    ``endpoint`` (``PUSHER_HOST``/``PORT``/``SCHEME``) is where the relay publishes: soketi itself
    or a fault proxy in front of it. Subscribers always talk to soketi.
    """

    def __init__(
        self,
        *,
        database_url: str,
        soketi: Soketi,
        broker_url: str,
        workdir: Path,
        endpoint: Mapping[str, str] | None = None,
        **overrides: str,
    ) -> None:
        self.soketi = soketi
        self.database_url = database_url
        master_key = os.urandom(32)
        pusher = {
            **soketi.env(),
            **(endpoint or {}),
            "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": base64.b64encode(master_key).decode(),
        }
        self.env = relay_env(
            database_url=database_url,
            broker_url=broker_url,
            pusher=pusher,
            **{**FAST_RELAY, **overrides},
        )
        self.broker_url = broker_url
        self.workdir = workdir
        self.engine = create_engine(database_url)
        self.kicks = 0
        self.kick_failures = 0
        self.outbox = Outbox(
            types=[ORDER_CREATED, ORDER_DETAILS], encryption_enabled=True, on_commit=self._kick
        )
        client = PusherPublisher(
            app_id=soketi.app_id,
            key=soketi.key,
            secret=soketi.secret,
            host=soketi.host,
            port=soketi.port,
            ssl=False,
            encryption_master_key=master_key,
        ).client
        self.authorizer = ChannelAuthorizer(
            outbox=self.outbox, pusher_client=client, may_subscribe=lambda *_: True
        )
        self.relay = RelayWorker(self.env, workdir / "relay")
        self.extra: list[CeleryProcess] = []
        self.subscribers: list[Subscriber] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Deployment:
        from workers.app import app as celery_app

        self._stack.enter_context(producer_app(self.broker_url))
        # producer_app leaves a ``broker_transport`` set by an earlier configuration in place
        # (the embedded broker's, when this process's environment has no OUTBOX_BROKER_URL):
        # kombu would then open the filesystem transport for our redis:// URL.
        previous = celery_app.conf.get("broker_transport")
        celery_app.conf.broker_transport = None
        self._stack.callback(setattr, celery_app.conf, "broker_transport", previous)
        return self

    def _kick(self, row_ids: Sequence[int]) -> None:
        self.kicks += 1
        try:
            kick(row_ids)
        except Exception:
            self.kick_failures += 1
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            for process in self.extra:
                process.stop()
            self.relay.stop()
            for subscriber in self.subscribers:
                subscriber.close()
        finally:
            self._stack.close()
            self.engine.dispose()

    # -- relay processes --------------------------------------------------------------------

    def extra_beat(self, name: str) -> CeleryProcess:
        """Another beat scheduler, with its own schedule file."""
        beat = beat_process(self.env, self.workdir / name)
        self.extra.append(beat)
        beat.start()
        beat.wait_for_log("beat: Starting", 30)
        return beat

    def logs(self) -> str:
        return self.relay.log_text() + "".join(
            f"\n===== {p.name}\n{p.log_text()}" for p in self.extra
        )

    # -- the application's side ---------------------------------------------------------------

    def subscriber(self, channels: Sequence[str]) -> Subscriber:
        sub = Subscriber(self.soketi.ws_url, self.soketi.key)
        self.subscribers.append(sub)
        sub.connect()
        for channel in channels:
            sub.subscribe(channel, self._authorize)
        return sub

    def _authorize(self, socket_id: str, channel: str) -> Mapping[str, Any]:
        return self.authorizer.authorize("tester", socket_id=socket_id, channel_name=channel)

    def commit(self, pharmacies: Sequence[str], *, encrypted: Sequence[str] = ()) -> list[str]:
        """One transaction: one event per pharmacy (encrypted details for those in ``encrypted``)."""
        with Session(self.engine) as session:
            ids = []
            for pharmacy in pharmacies:
                if pharmacy in encrypted:
                    data: dict[str, object] = {
                        "order_id": new_opaque_id("ord"),
                        "patient": "P",
                        "medication": "M",
                    }
                    row = self.outbox.enqueue(
                        session, ORDER_DETAILS, ids={"pharmacy_id": pharmacy}, data=data
                    )
                else:
                    data = {"order_id": new_opaque_id("ord"), "status": "new", "items": 1}
                    row = self.outbox.enqueue(
                        session, ORDER_CREATED, ids={"pharmacy_id": pharmacy}, data=data
                    )
                ids.append(row.event_id)
            session.commit()
        return ids

    def rows(self) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(
                        events.c.id,
                        events.c.event_id,
                        events.c.channel,
                        events.c.seq,
                        events.c.status,
                        events.c.attempts,
                        events.c.last_error,
                        events.c.attempt_log,
                    ).order_by(events.c.id)
                )
            )

    def wait_delivered(self, sub: Subscriber, timeout: float, *, settle: float = SETTLE_SECONDS):
        """Until every row is sent and the subscriber saw every event id; then settle."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            seen = {_event_id(e) for e in sub.events}
            if (
                rows
                and all(r.status == "sent" for r in rows)
                and {r.event_id for r in rows} <= seen
            ):
                break
            if time.monotonic() >= deadline:
                statuses = collections.Counter(r.status for r in rows)
                missing = len({r.event_id for r in rows} - seen)
                raise AssertionError(
                    f"not delivered within {timeout:g}s: rows {dict(statuses)}, {missing} event "
                    f"ids not seen by the subscriber\n{self.logs()[-6000:]}"
                )
            time.sleep(0.1)
        time.sleep(settle)


def pharmacies(n: int) -> list[str]:
    return [new_opaque_id("pha") for _ in range(n)]


def channel_of(pharmacy: str, *, encrypted: bool = False) -> str:
    prefix = "private-encrypted-pharmacy-" if encrypted else "private-pharmacy-"
    return prefix + pharmacy


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _event_id(event: ReceivedEvent) -> str | None:
    data = event.data
    return data.get("id") if isinstance(data, dict) else None


# -- the delivery check ---------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    label: str
    events: int
    received: int
    duplicates: dict[str, int]
    allowed: int

    @property
    def duplicate_count(self) -> int:
        return sum(self.duplicates.values())

    def line(self) -> str:
        return (
            f"FAULT {self.label}: {self.events} events committed, {self.received} received, "
            f"{self.duplicate_count} duplicate(s) (bound: {self.allowed} in flight when the "
            f"fault hit); duplicated ids: {sorted(self.duplicates) or '-'}"
        )


def check_delivery(
    label: str,
    rows: Sequence[sa.Row[Any]],
    received: Sequence[ReceivedEvent],
    *,
    allowed: int,
    allowed_ids: set[str] | None = None,
) -> DeliveryReport:
    """Every row received, in per-channel seq order, duplicates within the window. Prints a line."""
    assert rows, "no events were committed"
    expected: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for row in rows:
        expected[row.channel].append((row.seq, row.event_id))
    for channel, items in expected.items():
        items.sort()
        # the product's promise: seq is gap-free per channel, in commit (= id) order
        assert [seq for seq, _ in items] == list(range(1, len(items) + 1)), channel
    channel_of_id = {row.event_id: row.channel for row in rows}

    broken = [e for e in received if e.decrypt_error is not None or _event_id(e) is None]
    assert not broken, f"[{label}] events that did not decrypt or parse: {broken[:3]}"
    counts = collections.Counter(_event_id(e) for e in received)
    duplicates = {event_id: n - 1 for event_id, n in counts.items() if n > 1}
    report = DeliveryReport(label, len(rows), len(received), duplicates, allowed)
    print(report.line())

    missing = set(channel_of_id) - set(counts)
    unknown = set(counts) - set(channel_of_id)
    assert not missing, f"[{label}] {len(missing)} committed event(s) never arrived: {missing}"
    assert not unknown, f"[{label}] events that were never committed arrived: {unknown}"
    first_seen: dict[str, list[int]] = collections.defaultdict(list)
    seen: set[str] = set()
    for event in received:
        event_id = _event_id(event)
        assert event.channel == channel_of_id[event_id], (label, event)
        if event_id not in seen:
            seen.add(event_id)
            first_seen[event.channel].append(event.data["seq"])
    for channel, items in expected.items():
        assert first_seen[channel] == list(range(1, len(items) + 1)), (
            f"[{label}] out of order on {channel}: {first_seen[channel]}"
        )
    assert report.duplicate_count <= allowed, report.line()
    if allowed_ids is not None:
        readable = {i for i in duplicates if not channel_of_id[i].startswith("private-encrypted-")}
        assert readable <= allowed_ids, (
            f"{report.line()}; duplicated outside the window: {readable - allowed_ids}"
        )
    return report


# -- 1. a worker killed with SIGKILL in the middle of a batch ------------------------------------


def test_worker_killed_mid_batch_loses_its_lease_and_another_worker_delivers(
    database_url, soketi, redis_server, tmp_path
):
    pharmacy_ids = pharmacies(4)
    proxy = FaultProxy(soketi.host, soketi.port, latency=0.3)  # soketi answers 300 ms late
    with (
        proxy,
        Deployment(
            database_url=database_url,
            soketi=soketi,
            broker_url=redis_server.url,
            workdir=tmp_path,
            endpoint=proxy.pusher_env(),
            OUTBOX_LEASE_SECONDS="2",
            OUTBOX_CLAIM_BATCH_SIZE="10",
            OUTBOX_PUBLISH_TIMEOUT_SECONDS="1",
        ) as app,
    ):
        sub = app.subscriber([channel_of(p) for p in pharmacy_ids])
        app.relay.start_beat()
        first = app.relay.add_worker()
        for _ in range(40):
            app.commit(pharmacy_ids)
        # kill while soketi has accepted a request whose answer the worker has not read yet
        wait_until(
            lambda: (
                len(sub.events) >= 20
                and any(r.forwarded_at is not None for r in proxy.in_progress())
            ),
            30,
            "a publish request in flight after some deliveries",
        )
        first.kill(signal.SIGKILL)
        first.wait_exit(5)
        time.sleep(0.5)  # the proxy finishes the request it held; nothing consumes meanwhile
        in_flight = {r.event_id for r in app.rows() if r.status == "in_flight"}
        window = in_flight & set(proxy.forwarded_ids())
        assert in_flight, "the worker died between batches, not in the middle of one"
        app.relay.add_worker()
        app.wait_delivered(sub, timeout=45)
        rows = app.rows()
        report = check_delivery(
            f"SIGKILL mid-batch [{app.engine.dialect.name}] ({len(in_flight)} rows leased, "
            f"{len(window)} accepted by soketi unrecorded)",
            rows,
            sub.events,
            allowed=len(window),
            allowed_ids=window,
        )
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"
    taken_over = [r for r in rows if r.event_id in in_flight]
    assert all(r.attempts >= 2 for r in taken_over if r.event_id in window), report.line()
    assert "reclaimed rows whose lease expired" in app.logs()


# -- 2. soketi stopped for a while, then started again -------------------------------------------


@pytest.mark.postgres
def test_soketi_down_then_up_every_event_delivered_once_in_order(
    postgres_database_url, own_soketi, redis_server, tmp_path
):
    pharmacy_ids = pharmacies(3)
    with Deployment(
        database_url=postgres_database_url,
        soketi=own_soketi,
        broker_url=redis_server.url,
        workdir=tmp_path,
        OUTBOX_LEASE_SECONDS="10",
    ) as app:
        sub = app.subscriber([channel_of(p) for p in pharmacy_ids])
        app.relay.start_beat()
        app.relay.add_worker()
        for _ in range(3):
            app.commit(pharmacy_ids)
        app.wait_delivered(sub, timeout=20, settle=0)

        own_soketi.stop()
        down_at = time.monotonic()
        during = [app.commit(pharmacy_ids) for _ in range(5)]
        wait_until(
            lambda: any(r.attempts >= 2 and r.status == "pending" for r in app.rows()),
            15,
            "the relay to retry against the stopped soketi",
        )
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # down for 3 s at least
        during_ids = {i for batch in during for i in batch}
        assert not any(r.status == "sent" for r in app.rows() if r.event_id in during_ids)
        retrying = [r for r in app.rows() if r.event_id in during_ids and r.attempts >= 2]
        assert all("connection error" in (r.last_error or "") for r in retrying), retrying[:3]
        # Pusher does not keep events for absent subscribers: hold the relay (SIGSTOP) until the
        # subscriber is back, so it cannot publish before it can receive.
        for process in app.relay.workers:
            process.kill(signal.SIGSTOP)
        try:
            own_soketi.start()
            sub.reconnect()
        finally:
            for process in app.relay.workers:
                process.kill(signal.SIGCONT)
        up_at = time.monotonic()
        for _ in range(3):
            app.commit(pharmacy_ids)
        app.wait_delivered(sub, timeout=30)
        check_delivery(
            f"soketi stopped for {up_at - down_at:.1f}s", app.rows(), sub.events, allowed=0
        )
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"


# -- 3. soketi answering with errors (fault proxy) -----------------------------------------------


class ScriptedFaults:
    """Gives each publish request the next fault of ``script``; a fault that needs readable event
    ids (to follow its events afterwards) waits for a request that has some."""

    def __init__(self, script: Sequence[tuple[Fault | None, bool]]) -> None:
        self.pending = list(script)
        self.lock = threading.Lock()

    def __call__(self, record: RequestRecord) -> Fault | None:
        with self.lock:
            if not self.pending:
                return None
            fault, needs_ids = self.pending[0]
            if needs_ids and not record.event_ids:
                return None
            self.pending.pop(0)
            return fault


@pytest.mark.postgres
def test_soketi_errors_timeouts_and_resets_are_retried_without_loss(
    postgres_database_url, soketi, redis_server, tmp_path
):
    plain = pharmacies(3)
    secret = pharmacies(1)
    script: list[tuple[Fault | None, bool]] = [
        (None, False),
        (Fault.status_code(500), False),
        (None, False),
        (Fault.status_code(503), False),
        (Fault.rate_limited(retry_after=1), True),
        (Fault.timeout(1.5), False),
        (Fault.timeout(1.5, after_forward=True), False),
        (None, False),
        (Fault.reset(), False),
        (Fault.reset(after_forward=True), False),
        (Fault.error_body(500), False),
        (Fault.error_body(429), False),
        (None, False),
        (Fault.status_code(503), False),
        (Fault.timeout(1.5, after_forward=True), False),
    ]
    plan = ScriptedFaults(script)
    proxy = FaultProxy(soketi.host, soketi.port, plan=plan)
    with (
        proxy,
        Deployment(
            database_url=postgres_database_url,
            soketi=soketi,
            broker_url=redis_server.url,
            workdir=tmp_path,
            endpoint=proxy.pusher_env(),
            OUTBOX_LEASE_SECONDS="15",
            OUTBOX_CLAIM_BATCH_SIZE="4",
        ) as app,
    ):
        channels = [channel_of(p) for p in plain] + [channel_of(p, encrypted=True) for p in secret]
        sub = app.subscriber(channels)
        app.relay.start_beat()
        app.relay.add_worker()
        for _ in range(15):
            app.commit([*plain, *secret], encrypted=secret)
            time.sleep(0.05)
        wait_until(lambda: not plan.pending, 40, "every scripted fault to be applied")
        app.wait_delivered(sub, timeout=45)
        rows = app.rows()
        faulted = proxy.faulted()
        window = [r for r in faulted if r.fault is not None and r.fault.after_forward]
        assert all(r.upstream_status == 200 for r in window), proxy.summary()
        check_delivery(
            "soketi errors via proxy: " + ", ".join(str(r.fault) for r in faulted),
            rows,
            sub.events,
            allowed=sum(r.events for r in window),
            allowed_ids={i for r in window for i in r.event_ids},
        )
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"
    applied = {str(r.fault) for r in faulted}
    assert applied == {str(f) for f, _ in script if f is not None}, proxy.summary()
    assert all(r.status == "sent" for r in rows)
    assert max(r.attempts for r in rows) >= 2
    # Retry-After: 1 was honoured: the next request carrying those events came >= 1 s later
    [limited] = [
        r
        for r in faulted
        if r.fault is not None and r.fault.status == 429 and r.fault.kind == "status"
    ]
    later = [
        r
        for r in proxy.publishes()
        if r.started > limited.started and set(r.event_ids) & set(limited.event_ids)
    ]
    assert later, "the rate-limited events were never sent again"
    assert later[0].started - limited.finished_at >= 0.9, proxy.summary()
    logs = app.logs()
    for reason in ("HTTP 500", "HTTP 503", "HTTP 429", "timeout", "connection error"):
        assert reason in logs, reason


@pytest.mark.postgres
def test_retry_after_is_counted_from_the_answer_not_from_the_start_of_the_pass(
    postgres_database_url, soketi, redis_server, tmp_path
):
    """One channel, one pass of two requests: the first succeeds slowly (1.5 s), the second gets
    429 with ``Retry-After: 1``. Its events must not be sent again within 1 s of that answer."""
    [pharmacy] = pharmacies(1)
    plan: list[Fault | None] = [Fault.delay(1.5), Fault.rate_limited(retry_after=1)]
    proxy = FaultProxy(soketi.host, soketi.port, plan=plan)
    with (
        proxy,
        Deployment(
            database_url=postgres_database_url,
            soketi=soketi,
            broker_url=redis_server.url,
            workdir=tmp_path,
            endpoint=proxy.pusher_env(),
            OUTBOX_LEASE_SECONDS="15",
            OUTBOX_CLAIM_BATCH_SIZE="20",
            OUTBOX_PUBLISH_TIMEOUT_SECONDS="3",
        ) as app,
    ):
        sub = app.subscriber([channel_of(pharmacy)])
        with Session(app.engine) as session:  # 20 events, one transaction: one claim
            for _ in range(20):
                app.outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
                )
            session.commit()
        app.relay.start_beat()
        app.relay.add_worker()
        app.wait_delivered(sub, timeout=30)
        check_delivery("Retry-After after a slow request", app.rows(), sub.events, allowed=0)
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"
    [limited] = [r for r in proxy.publishes() if r.fault is not None and r.fault.status == 429]
    assert limited.answered_at is not None and limited.events == 10
    [again, *_] = [
        r
        for r in proxy.publishes()
        if r.index is not None
        and r.index > (limited.index or 0)
        and set(r.event_ids) & set(limited.event_ids)
    ]
    waited = again.started - limited.answered_at
    assert waited >= 0.9, (
        f"resent {waited:.2f}s after a 429 with Retry-After: 1 (the retry time was counted from "
        "the start of the relay pass, before the slow first request)"
    )


@pytest.mark.postgres
def test_a_pass_slower_than_the_lease_sends_nothing_twice(
    postgres_database_url, soketi, redis_server, tmp_path
):
    """soketi answers each request 0.8 s late; one claim of 40 rows of one channel is 4
    requests, longer than the 2 s lease. The relay extends its lease before a request that could
    outlive it, so no other worker takes the rows over: nothing may be sent twice."""
    [pharmacy] = pharmacies(1)
    proxy = FaultProxy(soketi.host, soketi.port, latency=0.8)
    with (
        proxy,
        Deployment(
            database_url=postgres_database_url,
            soketi=soketi,
            broker_url=redis_server.url,
            workdir=tmp_path,
            endpoint=proxy.pusher_env(),
            OUTBOX_LEASE_SECONDS="2",
            OUTBOX_CLAIM_BATCH_SIZE="40",
            OUTBOX_PUBLISH_TIMEOUT_SECONDS="1",
        ) as app,
    ):
        sub = app.subscriber([channel_of(pharmacy)])
        with Session(app.engine) as session:
            for _ in range(40):
                app.outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
                )
            session.commit()
        app.relay.start_beat()
        app.relay.add_worker()
        stuck = None
        try:
            app.wait_delivered(sub, timeout=20)
        except AssertionError as exc:
            stuck = str(exc).splitlines()[0]
        published = collections.Counter(proxy.forwarded_ids())
        received = collections.Counter(_event_id(e) for e in sub.events)
        statuses = collections.Counter(r.status for r in app.rows())
        summary = (
            f"{stuck or 'delivered'}; rows {dict(statuses)}; {len(published)} events published "
            f"{sum(published.values())} times (max {max(published.values(), default=0)} each), "
            f"received {sum(received.values())} times; lease losses logged: "
            f"{app.logs().count('lease lost before recording')}"
        )
        print(f"FAULT pass slower than the lease: {summary}")
    assert stuck is None and max(published.values()) == 1, summary


# -- 4. Redis stopped and started -----------------------------------------------------------------


@pytest.mark.postgres
def test_redis_down_commits_stay_fast_and_the_sweep_delivers_after_it_returns(
    postgres_database_url, soketi, redis_server, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="outbox")
    pharmacy_ids = pharmacies(3)
    with Deployment(
        database_url=postgres_database_url,
        soketi=soketi,
        broker_url=redis_server.url,
        workdir=tmp_path,
        OUTBOX_LEASE_SECONDS="10",
    ) as app:
        sub = app.subscriber([channel_of(p) for p in pharmacy_ids])
        app.relay.start_beat()
        app.relay.add_worker()
        for _ in range(2):
            app.commit(pharmacy_ids)
        app.wait_delivered(sub, timeout=20, settle=0)
        warnings_before = len(_kick_failures(caplog))
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"

        redis_server.stop()
        durations = []
        for _ in range(6):
            started = time.monotonic()
            app.commit(pharmacy_ids)
            durations.append(time.monotonic() - started)
            time.sleep(0.2)
        failed_kicks = len(_kick_failures(caplog)) - warnings_before
        assert app.kick_failures == failed_kicks
        time.sleep(1.0)
        redis_server.start()
        restarted_at = time.monotonic()
        for _ in range(2):
            app.commit(pharmacy_ids)
        app.wait_delivered(sub, timeout=60)
        recovered = time.monotonic() - restarted_at
        check_delivery(
            f"Redis stopped (commits max {max(durations):.2f}s, {failed_kicks} kicks failed, "
            f"{app.kick_failures - failed_kicks} failed after restart, all delivered "
            f"{recovered:.1f}s after restart)",
            app.rows(),
            sub.events,
            allowed=0,
        )
        assert all(w.is_running for w in app.relay.workers)
        assert app.relay.beat is not None and app.relay.beat.is_running
        worker_log = app.relay.worker.log_text()
        beat_log = app.relay.beat.log_text()
    # the same worker and beat lost Redis and reconnected by themselves
    assert "Connection to broker lost" in worker_log
    assert worker_log.count("Connected to redis://") >= 2
    assert "Couldn't apply scheduled task outbox-sweep" in beat_log
    assert max(durations) < 3.0, durations
    assert failed_kicks == 6, [r.getMessage() for r in _kick_failures(caplog)]


def _kick_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "outbox.producer" and "sweep will deliver" in r.getMessage()
    ]


# -- 5. PostgreSQL restarted while workers run -----------------------------------------------------


def _postgres_cluster() -> tuple[str, str]:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        pytest.skip("no local PostgreSQL cluster managed by pg_ctlcluster")
    return versions[-1], "main"


def _wait_postgres(url: str, timeout: float) -> None:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.Error:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class Producer(threading.Thread):
    """The application committing continuously; failed transactions are counted, not retried."""

    def __init__(self, app: Deployment, pharmacy_ids: Sequence[str], period: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.app, self.pharmacy_ids, self.period = app, list(pharmacy_ids), period
        self.stop_event = threading.Event()
        self.committed = 0
        self.failed = 0

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            batch = [self.pharmacy_ids[(n + k) % len(self.pharmacy_ids)] for k in range(2)]
            n += 1
            try:
                self.app.commit(batch)
                self.committed += 1
            except sa.exc.SQLAlchemyError:
                self.failed += 1  # rolled back, or unknown: the table says what exists
            self.stop_event.wait(self.period)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restart_workers_recover_by_themselves(
    postgres_database_url, soketi, redis_server, tmp_path
):
    version, cluster = _postgres_cluster()
    pharmacy_ids = pharmacies(4)
    proxy = FaultProxy(soketi.host, soketi.port)  # pass-through: records what soketi accepted
    with (
        proxy,
        Deployment(
            database_url=postgres_database_url,
            soketi=soketi,
            broker_url=redis_server.url,
            workdir=tmp_path,
            endpoint=proxy.pusher_env(),
            OUTBOX_LEASE_SECONDS="2",
        ) as app,
    ):
        sub = app.subscriber([channel_of(p) for p in pharmacy_ids])
        app.relay.start_beat()
        worker = app.relay.add_worker()
        worker_pid = worker.pid
        producer = Producer(app, pharmacy_ids, period=0.1)
        producer.start()
        try:
            time.sleep(2.0)
            restart_at = time.monotonic()
            try:
                subprocess.run(
                    [
                        "pg_ctlcluster",
                        "--skip-systemctl-redirect",
                        version,
                        cluster,
                        "restart",
                        "-m",
                        "fast",
                    ],
                    check=True,
                    timeout=60,
                    capture_output=True,
                )
            finally:
                _wait_postgres(postgres_database_url, timeout=60)
            ready_at = time.monotonic()
            time.sleep(2.0)
        finally:
            producer.stop()
        app.engine.dispose()
        app.wait_delivered(sub, timeout=60)
        window = set(proxy.forwarded_ids(since=restart_at - 3.0, until=ready_at))
        check_delivery(
            f"PostgreSQL restarted ({ready_at - restart_at:.1f}s down, {producer.committed} "
            f"transactions committed, {producer.failed} failed)",
            app.rows(),
            sub.events,
            allowed=len(window),
            allowed_ids=window,
        )
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"
        assert worker.is_running and worker.pid == worker_pid, "the worker did not survive"
        assert app.relay.beat is not None and app.relay.beat.is_running
        assert producer.committed > 20


# -- 6. two workers and two beat schedulers -------------------------------------------------------


def test_two_workers_and_two_beats_send_nothing_twice_and_keep_order(
    database_url, soketi, redis_server, tmp_path
):
    pharmacy_ids = pharmacies(5)
    proxy = FaultProxy(soketi.host, soketi.port, latency=0.05)
    with (
        proxy,
        Deployment(
            database_url=database_url,
            soketi=soketi,
            broker_url=redis_server.url,
            workdir=tmp_path,
            endpoint=proxy.pusher_env(),
            OUTBOX_LEASE_SECONDS="15",
            OUTBOX_CLAIM_BATCH_SIZE="10",
        ) as app,
    ):
        sub = app.subscriber([channel_of(p) for p in pharmacy_ids])
        app.relay.add_worker()
        app.relay.add_worker()
        app.relay.start_beat()
        app.extra_beat("beat2")
        for n in range(30):
            app.commit(pharmacy_ids)
            if n % 5 == 0:
                time.sleep(0.1)
        app.wait_delivered(sub, timeout=45)
        rows = app.rows()
        check_delivery(
            f"two workers + two beats [{app.engine.dialect.name}]", rows, sub.events, allowed=0
        )
        assert app.kick_failures == 0, f"{app.kick_failures} of {app.kicks} kicks failed"
        logs = [p.log_text() for p in app.relay.workers]
        beats = [app.relay.beat.log_text(), app.extra[0].log_text()]  # type: ignore[union-attr]
    sent_twice = [i for i, n in collections.Counter(proxy.forwarded_ids()).items() if n > 1]
    assert sent_twice == [], "an event was published twice"
    assert all(r.status == "sent" and r.attempts == 1 for r in rows)
    assert all("outbox.sweep" in log for log in logs), "both workers should have worked"
    assert all("Sending due task outbox-sweep" in log for log in beats)
