"""A PHI canary goes through the whole pipeline and is searched for in every sink.

The pipeline is the deployed one: the application (this process) enqueues with
``on_commit=workers.kick``; a Celery worker and beat (DEBUG logs) relay through Redis to a soketi
of this test's own, which is stopped once to force a retry; one event is dead-lettered by a relay
with a wrong secret. Afterwards the canary must be nowhere in plaintext (nor base64): Redis (every
command it executed and every key left), worker and beat logs, this process's log records, every
column of every outbox row except the dead row's ``data``, the CLI's outputs, soketi's log and the
raw websocket frames. It must be in the authorized subscriber's decrypted events.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import ChannelAuthorizer, Outbox, PrivacyViolation, load_settings, new_opaque_id
from outbox.models import audit, events
from outbox.publisher import PusherPublisher
from outbox.relay import Relay
from outbox.store import Store, create_engine
from outbox.testing.subscriber import Subscriber
from tests.acceptance.workers import (
    RedisMonitor,
    child_env,
    find_canary,
    producer_app,
    redis_snapshot,
    relay_env,
    relay_worker,
)
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS
from workers import kick

pytestmark = [pytest.mark.timeout(60)]

OUTBOX_CLI = str(Path(sys.executable).with_name("outbox"))


def rows_of(engine: sa.Engine, table: sa.Table) -> list[sa.Row]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [OUTBOX_CLI, *args],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def details(patient: str) -> dict[str, str]:
    return {"order_id": new_opaque_id("ord"), "patient": patient, "medication": "Ibuprofène"}


def test_phi_canary_is_only_in_decrypted_events_and_the_dead_rows_payload(
    engine, database_url, redis_url, own_soketi, monkeypatch, caplog, tmp_path
):
    canary = f"CANARY-{uuid.uuid4().hex}"
    # Every logger at DEBUG (SQLAlchemy keeps its own WARNING level unless an app lowers it).
    caplog.set_level(logging.DEBUG)
    master_key = base64.b64encode(os.urandom(32)).decode()
    env = relay_env(
        database_url=database_url,
        broker_url=redis_url,
        pusher={**own_soketi.env(), "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": master_key},
        OUTBOX_LOG_LEVEL="DEBUG",
        OUTBOX_RETRY_BASE_DELAY_SECONDS="0.3",
        OUTBOX_RETRY_MAX_DELAY_SECONDS="0.6",
        OUTBOX_RETRY_MAX_ATTEMPTS="1000",
        OUTBOX_PUBLISH_TIMEOUT_SECONDS="2",
    )
    monkeypatch.delenv("PUSHER_CLUSTER", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    types = [ORDER_CREATED, ORDER_DETAILS]
    outbox = Outbox.from_settings(settings, types=types, on_commit=kick)
    quiet_outbox = Outbox.from_settings(settings, types=types)  # no kick: for the dead letter
    pharmacy = new_opaque_id("pha")
    channels = (f"private-pharmacy-{pharmacy}", f"private-encrypted-pharmacy-{pharmacy}")

    # 1. The canary in any non-PHI place is refused before a row exists; the refusal hides it.
    refusals = [
        (
            ORDER_CREATED,
            {"pharmacy_id": pharmacy},
            {"order_id": canary, "status": "new", "items": 1},
        ),
        (
            ORDER_CREATED,
            {"pharmacy_id": pharmacy},
            {"order_id": new_opaque_id("ord"), "status": canary, "items": 1},
        ),
        (
            ORDER_CREATED,
            {"pharmacy_id": pharmacy},
            {"order_id": new_opaque_id("ord"), "status": "new", "items": canary},
        ),
        (
            ORDER_CREATED,
            {"pharmacy_id": canary},
            {"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
        ),
        (ORDER_DETAILS, {"pharmacy_id": pharmacy}, {**details("x"), "order_id": canary}),
        (ORDER_DETAILS, {"pharmacy_id": canary}, details(canary)),
    ]
    with Session(engine) as session:
        for notification_type, ids, data in refusals:
            with pytest.raises(PrivacyViolation) as refused:
                outbox.enqueue(session, notification_type, ids=ids, data=data)
            error = refused.value
            for text in (str(error), repr(error), repr(error.args), repr(vars(error))):
                assert find_canary(canary, text) is None, text
        session.commit()
    assert rows_of(engine, events) == []

    # 2. A dead letter: a relay with a wrong secret gets soketi's 401 (before any worker runs).
    with Session(engine) as session:
        dead = quiet_outbox.enqueue(
            session, ORDER_DETAILS, ids={"pharmacy_id": pharmacy}, data=details(canary)
        )
        session.commit()
    wrong = PusherPublisher(
        app_id=own_soketi.app_id,
        key=own_soketi.key,
        secret="wrong-secret",
        host=own_soketi.host,
        port=own_soketi.port,
        ssl=False,
        encryption_master_key=settings.encryption_master_key,
    )
    relay_engine = create_engine(database_url)
    try:
        report = Relay(store=Store(relay_engine), publisher=wrong).drain(max_seconds=5)
    finally:
        relay_engine.dispose()
    assert report.dead == 1

    # 3. The authorized subscriber (the auth helper writes the audit trail).
    authorizer = ChannelAuthorizer(
        outbox=outbox,
        pusher_client=PusherPublisher.from_settings(settings).client,
        may_subscribe=lambda user, channel, nt, ids: ids.get("pharmacy_id") == user,
        engine=engine,
        user_ref=lambda user: "usr_" + user.removeprefix("pha_"),
    )

    def authorize(socket_id: str, channel: str) -> dict[str, object]:
        return authorizer.authorize(pharmacy, socket_id=socket_id, channel_name=channel)

    sent_ids: list[str] = []
    with (
        RedisMonitor(redis_url) as monitor,
        producer_app(redis_url),
        Subscriber(own_soketi.ws_url, own_soketi.key) as sub,
        relay_worker(env, tmp_path / "relay", beat=True, loglevel="DEBUG") as relay,
    ):
        for channel in channels:
            sub.subscribe(channel, authorize)
        # 4. Delivered at once by the kick.
        with Session(engine) as session:
            first = [
                outbox.enqueue(
                    session, ORDER_DETAILS, ids={"pharmacy_id": pharmacy}, data=details(canary)
                ),
                outbox.enqueue(
                    session, ORDER_DETAILS, ids={"pharmacy_id": pharmacy}, data=details(canary)
                ),
                outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "new", "items": 2},
                ),
            ]
            session.commit()
        sub.wait_for(3, timeout=10)
        sent_ids += [e.event_id for e in first]
        # Stopping soketi between its broadcast and its HTTP answer would make a (legitimate)
        # at-least-once duplicate: wait until the worker has recorded them.
        wait_until(
            lambda: all(
                r.status == "sent" for r in rows_of(engine, events) if r.event_id in sent_ids
            ),
            10,
            "the first rows to be recorded sent",
        )

        # 5. A retry: soketi is down, the worker's attempt fails transiently and is rescheduled.
        own_soketi.stop()
        with Session(engine) as session:
            retried = [
                outbox.enqueue(
                    session, ORDER_DETAILS, ids={"pharmacy_id": pharmacy}, data=details(canary)
                ),
                outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "filled", "items": 1},
                ),
            ]
            session.commit()
        retried_ids = [e.id for e in retried]

        def hold_retries() -> bool:
            # Keep the failed rows back until the subscriber is connected again (soketi drops
            # its websockets when it stops); rows leased right now are left to fail once more.
            with engine.begin() as conn:
                held = conn.execute(
                    sa.update(events)
                    .where(
                        events.c.id.in_(retried_ids),
                        events.c.status == "pending",
                        events.c.attempts >= 1,
                    )
                    .values(available_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
                ).rowcount
            return held == len(retried_ids)

        wait_until(hold_retries, 15, "both rows to fail once and be rescheduled")
        own_soketi.start()
        sub.reconnect()
        with engine.begin() as conn:
            conn.execute(
                sa.update(events)
                .where(events.c.id.in_(retried_ids))
                .values(available_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
        sub.wait_for(5, timeout=15)  # delivered by beat's sweep
        sent_ids += [e.event_id for e in retried]
        wait_until(
            lambda: all(
                r.status == "sent" for r in rows_of(engine, events) if r.event_id in sent_ids
            ),
            10,
            "every row but the dead one to be recorded sent",
        )
        time.sleep(1.0)  # two more sweeps (erase, purge) pass over the finished rows
    assert monitor.error is None

    # -- what the authorized subscriber saw ------------------------------------------------------
    received = sub.events
    assert sorted(e.data["id"] for e in received) == sorted(sent_ids)
    decrypted = [e for e in received if e.channel.startswith("private-encrypted-")]
    assert len(decrypted) == 3 and all(e.decrypted for e in decrypted)
    assert [e.data["data"]["patient"] for e in decrypted] == [canary] * 3
    assert all(find_canary(canary, frame) is None for frame in sub.frames)

    # -- the outbox table: the canary is only in the dead row's payload -----------------------
    stored = {row.event_id: row for row in rows_of(engine, events)}
    assert set(stored) == {*sent_ids, dead.event_id}
    retried_rows = [stored[e.event_id] for e in retried]
    assert all(r.status == "sent" and r.attempts >= 2 for r in retried_rows)
    assert all('"retry"' in (r.attempt_log or "") for r in retried_rows)
    dead_row = stored[dead.event_id]
    assert dead_row.status == "dead" and "401" in dead_row.last_error
    assert find_canary(canary, dead_row.data) == canary  # kept for redrive, by design
    for row in stored.values():
        for column, value in row._mapping.items():
            if row is dead_row and column == "data":
                continue
            assert find_canary(canary, str(value)) is None, (row.event_id, column)
    assert all(r.data is None for r in stored.values() if r.contains_phi and r.status == "sent")
    audit_rows = rows_of(engine, audit)
    assert {r.decision for r in audit_rows} == {"grant"} and len(audit_rows) == 4
    for row in audit_rows:
        assert find_canary(canary, str(tuple(row))) is None

    # -- Redis: every command it executed, every key it still holds --------------------------
    commands = monitor.lines
    assert any(b"LPUSH" in line.upper() and b"outbox" in line for line in commands)
    for line in commands:
        assert find_canary(canary, line) is None, line[:300]
    for key, values in redis_snapshot(redis_url).items():
        assert find_canary(canary, key) is None
        for value in values:
            assert find_canary(canary, value) is None, key

    # -- logs: worker and beat at DEBUG, this process at DEBUG, soketi ------------------------
    worker_logs = relay.log_text()
    assert "outbox.relay[" in worker_logs and "outbox.sweep[" in worker_logs
    assert "DEBUG" in worker_logs
    assert find_canary(canary, worker_logs) is None
    assert any(r.name == "outbox.relay" for r in caplog.records)  # the dead letter's warning
    for record in caplog.records:
        text = f"{record.getMessage()} {vars(record)!r}"
        assert find_canary(canary, text) is None, record.name
    assert find_canary(canary, own_soketi.log_path.read_text(errors="replace")) is None

    # -- the operator's CLI ------------------------------------------------------------------
    outputs = {
        "stats": cli(env, "stats", "--json"),
        "dead list": cli(env, "dead", "list", "--json"),
        "dead show": cli(env, "dead", "show", str(dead_row.id)),
    }
    assert dead.event_id in outputs["dead list"] and dead.event_id in outputs["dead show"]
    assert '"payload_held": true' in outputs["dead show"]
    for name, output in outputs.items():
        assert find_canary(canary, output) is None, name
