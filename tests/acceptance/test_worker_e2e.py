"""The relay as deployed: a real Celery worker (and beat) on Redis, soketi, a websocket subscriber.

The test process is the application: it enqueues in its own transactions with
``on_commit=workers.kick``, so kicks travel through the same Redis as the worker's queue.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import ChannelAuthorizer, Enqueued, Outbox, load_settings, new_opaque_id
from outbox.models import events
from outbox.publisher import PusherPublisher
from outbox.testing.subscriber import Subscriber
from tests.acceptance.workers import (
    ProcessFailed,
    decode_kombu_message,
    find_canary,
    producer_app,
    redis_snapshot,
    relay_env,
    relay_worker,
    worker_process,
)
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS
from workers import kick
from workers.app import QUEUE, RELAY_TASK

pytestmark = [pytest.mark.timeout(60)]

KICK_LATENCY_SECONDS = 2.0


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def deployment(
    database_url: str, redis_url: str, pusher_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The relay's environment, also set in this process (the application's side)."""
    env = relay_env(database_url=database_url, broker_url=redis_url, pusher=pusher_env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def app_side(deployment: dict[str, str], redis_url: str) -> Iterator[None]:
    """``workers.kick`` in this process publishes to ``redis_url``."""
    with producer_app(redis_url):
        yield


def outbox_for_app(*, kick_on_commit: bool = True) -> Outbox:
    return Outbox.from_settings(
        load_settings(),
        types=[ORDER_CREATED, ORDER_DETAILS],
        on_commit=kick if kick_on_commit else None,
    )


def authorizer_for(outbox: Outbox, engine: sa.Engine) -> ChannelAuthorizer:
    """The application's auth endpoint: a pharmacy's staff may see its own channels."""
    return ChannelAuthorizer(
        outbox=outbox,
        pusher_client=PusherPublisher.from_settings(load_settings()).client,
        may_subscribe=lambda user, channel, nt, ids: ids.get("pharmacy_id") == user,
        engine=engine,
    )


def subscribe(
    make_subscriber: Callable[..., Subscriber], authorizer: ChannelAuthorizer, pharmacy: str
) -> Subscriber:
    sub = make_subscriber()
    for channel in (f"private-pharmacy-{pharmacy}", f"private-encrypted-pharmacy-{pharmacy}"):
        sub.subscribe(
            channel,
            lambda socket_id, name: authorizer.authorize(
                pharmacy, socket_id=socket_id, channel_name=name
            ),
        )
    return sub


def enqueue_created(outbox: Outbox, session: Session, pharmacy: str, items: int = 1) -> Enqueued:
    return outbox.enqueue(
        session,
        ORDER_CREATED,
        ids={"pharmacy_id": pharmacy},
        data={"order_id": new_opaque_id("ord"), "status": "new", "items": items},
    )


def enqueue_details(outbox: Outbox, session: Session, pharmacy: str, patient: str) -> Enqueued:
    return outbox.enqueue(
        session,
        ORDER_DETAILS,
        ids={"pharmacy_id": pharmacy},
        data={"order_id": new_opaque_id("ord"), "patient": patient, "medication": "Ibuprofène"},
    )


def table(engine: sa.Engine) -> dict[int, sa.Row]:
    with engine.connect() as conn:
        return {row.id: row for row in conn.execute(sa.select(events))}


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


# -- delivery ------------------------------------------------------------------------------------


def test_committed_transaction_is_delivered_exactly_once_and_rolled_back_one_sends_nothing(
    engine, deployment, app_side, make_subscriber, tmp_path
):
    outbox = outbox_for_app()
    pharmacy = new_opaque_id("pha")
    sub = subscribe(make_subscriber, authorizer_for(outbox, engine), pharmacy)
    with relay_worker(deployment, tmp_path / "relay", beat=True):
        with Session(engine) as session:
            committed = [enqueue_created(outbox, session, pharmacy, items=i) for i in range(3)]
            session.commit()
        with Session(engine) as session:
            enqueue_created(outbox, session, pharmacy, items=99)
            session.rollback()
        sub.wait_for(3, timeout=10)
        time.sleep(1.5)  # three sweeps run meanwhile: nothing is sent twice, nothing more
    received = sub.events
    assert [e.data["id"] for e in received] == [e.event_id for e in committed]
    assert [e.data["data"]["items"] for e in received] == [0, 1, 2]
    rows = table(engine)
    assert set(rows) == {e.id for e in committed}  # the rolled-back row never existed
    assert all(r.status == "sent" and r.attempts == 1 for r in rows.values())


def test_the_after_commit_kick_delivers_within_two_seconds_without_beat(
    engine, deployment, app_side, make_subscriber, tmp_path
):
    outbox = outbox_for_app()
    pharmacy = new_opaque_id("pha")
    sub = subscribe(make_subscriber, authorizer_for(outbox, engine), pharmacy)
    latencies = []
    with relay_worker(deployment, tmp_path / "relay", beat=False) as relay:
        for round_ in range(3):
            with Session(engine) as session:
                enqueue_created(outbox, session, pharmacy, items=round_)
                started = time.monotonic()
                session.commit()
            [*_, got] = sub.wait_for(round_ + 1, timeout=10)
            latencies.append(got.received_monotonic - started)
        assert relay.beat is None
        assert "outbox.sweep[" not in relay.log_text()  # delivered by kicks alone
    assert max(latencies) < KICK_LATENCY_SECONDS, latencies


def test_without_a_kick_nothing_is_sent_until_beat_sweeps(
    engine, deployment, app_side, make_subscriber, tmp_path
):
    outbox = outbox_for_app(kick_on_commit=False)
    pharmacy = new_opaque_id("pha")
    sub = subscribe(make_subscriber, authorizer_for(outbox, engine), pharmacy)
    with relay_worker(deployment, tmp_path / "relay", beat=False) as relay:
        with Session(engine) as session:
            enqueued = [enqueue_created(outbox, session, pharmacy, items=i) for i in range(2)]
            session.commit()
        time.sleep(1.5)
        assert sub.events == []
        assert {r.status for r in table(engine).values()} == {"pending"}
        relay.start_beat()
        received = sub.wait_for(2, timeout=10)
    assert [e.data["id"] for e in received] == [e.event_id for e in enqueued]
    assert "outbox.sweep[" in relay.log_text()


def test_celery_messages_carry_only_row_ids(engine, deployment, app_side, redis_url, tmp_path):
    canary = f"CANARY-{os.urandom(16).hex()}"
    outbox = outbox_for_app()
    pharmacy = new_opaque_id("pha")
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        transactions = []
        for _ in range(2):
            with Session(engine) as session:
                rows = [
                    enqueue_details(outbox, session, pharmacy, patient=canary),
                    enqueue_created(outbox, session, pharmacy),
                ]
                session.commit()
            transactions.append([row.id for row in rows])
        # no worker runs yet: the kicks wait in the queue's Redis list. The second commit
        # followed the first within OUTBOX_KICK_COALESCE_SECONDS, so its kick leaves when that
        # window closes (milliseconds later), still carrying only its own row ids.
        deadline = time.monotonic() + 5
        while client.llen(QUEUE) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        raw_messages = client.lrange(QUEUE, 0, -1)
    finally:
        client.close()
    # 0 here usually means another test session's worker consumed redis db 13 meanwhile
    assert len(raw_messages) == 2, "kicks missing from the queue: is another session on db 13?"
    decoded = [decode_kombu_message(raw) for raw in reversed(raw_messages)]  # LPUSH: newest first
    for (envelope, body), row_ids in zip(decoded, transactions, strict=True):
        assert envelope["headers"]["task"] == RELAY_TASK
        args, kwargs, _embed = body
        assert args == [row_ids]
        assert set(kwargs) == {"sent_at"}  # a timestamp to coalesce kicks; nothing else
        assert isinstance(kwargs["sent_at"], float)
        assert envelope["headers"]["argsrepr"] == repr((row_ids,))
    for raw in raw_messages:
        assert find_canary(canary, raw) is None
        assert find_canary(canary, base64.b64decode(decode_kombu_message(raw)[0]["body"])) is None
    for key, values in redis_snapshot(redis_url).items():
        assert find_canary(canary, key) is None
        assert all(find_canary(canary, value) is None for value in values), key
    # a worker started now consumes both messages and delivers all four rows
    with relay_worker(deployment, tmp_path / "relay"):
        wait_until(
            lambda: {r.status for r in table(engine).values()} == {"sent"}, 15, "rows to be sent"
        )


def test_events_of_one_channel_arrive_in_commit_order_with_two_workers(
    engine, deployment, app_side, make_subscriber, tmp_path
):
    outbox = outbox_for_app()
    pharmacy = new_opaque_id("pha")
    sub = subscribe(make_subscriber, authorizer_for(outbox, engine), pharmacy)
    expected = []
    with relay_worker(deployment, tmp_path / "relay", workers=2, beat=True) as relay:
        for txn in range(10):
            with Session(engine) as session:
                expected += [
                    enqueue_created(outbox, session, pharmacy, items=txn * 5 + i).event_id
                    for i in range(5)
                ]
                session.commit()
        received = sub.wait_for(50, timeout=30)
        time.sleep(1.0)
        assert all(w.is_running for w in relay.workers)
    assert [e.data["id"] for e in sub.events] == expected
    assert [e.data["data"]["items"] for e in received] == list(range(50))


def test_encrypted_events_decrypt_with_the_authorizers_shared_secret_and_frames_hold_no_plaintext(
    engine, deployment, app_side, make_subscriber, tmp_path
):
    canary = f"CANARY-{os.urandom(16).hex()}"
    outbox = outbox_for_app()
    pharmacy = new_opaque_id("pha")
    sub = subscribe(make_subscriber, authorizer_for(outbox, engine), pharmacy)
    with relay_worker(deployment, tmp_path / "relay"):
        with Session(engine) as session:
            details = [
                enqueue_details(outbox, session, pharmacy, f"{canary}-{i}") for i in range(3)
            ]
            session.commit()
        received = sub.wait_for(3, timeout=10)
        # PHI rows are erased once recorded sent (just after soketi relayed them)
        wait_until(
            lambda: all(r.status == "sent" and r.data is None for r in table(engine).values()),
            5,
            "the rows to be recorded sent and erased",
        )
    assert all(e.decrypted and e.decrypt_error is None for e in received)
    assert [e.data["id"] for e in received] == [d.event_id for d in details]
    assert [e.data["data"]["patient"] for e in received] == [f"{canary}-{i}" for i in range(3)]
    assert [e.data["data"]["medication"] for e in received] == ["Ibuprofène"] * 3
    frames = sub.frames
    assert any('"order.details"' in frame for frame in frames)
    for frame in frames:
        assert find_canary(canary, frame) is None
        assert "Ibuprof" not in frame


# -- misconfiguration ----------------------------------------------------------------------------


def _wait_exit_or_ready(process, timeout: float) -> int:
    """The exit code; fail at once if the worker reports ready instead."""
    deadline = time.monotonic() + timeout
    while (code := process.returncode) is None:
        if " ready." in process.log_text():
            pytest.fail(f"the worker started despite the bad configuration:\n{process.log_tail()}")
        if time.monotonic() >= deadline:
            raise ProcessFailed(f"worker still running after {timeout:g}s:\n{process.log_tail()}")
        time.sleep(0.05)
    return code


@pytest.mark.parametrize(
    ("variable", "bad_value"),
    [
        pytest.param("PUSHER_SECRET", None, id="secret-missing"),
        pytest.param(
            "PUSHER_ENCRYPTION_MASTER_KEY_BASE64",
            base64.b64encode(os.urandom(16)).decode(),
            id="master-key-16-bytes",
        ),
    ],
)
def test_misconfigured_worker_exits_at_start_naming_the_variable_without_secrets(
    variable, bad_value, redis_url, soketi, tmp_path
):
    secret = f"secret-{os.urandom(12).hex()}"
    master_key = base64.b64encode(os.urandom(32)).decode()
    pusher = {**soketi.env(), "PUSHER_SECRET": secret}
    pusher["PUSHER_ENCRYPTION_MASTER_KEY_BASE64"] = master_key
    if bad_value is None:
        del pusher[variable]
    else:
        pusher[variable] = bad_value
    env = relay_env(
        database_url=f"sqlite:///{tmp_path}/outbox.db", broker_url=redis_url, pusher=pusher
    )
    worker = worker_process(env, tmp_path / "relay")
    with worker:
        started = time.monotonic()
        code = _wait_exit_or_ready(worker, timeout=20)
        elapsed = time.monotonic() - started
    output = worker.log_text()
    assert code != 0, output
    assert elapsed < 20
    assert variable in output
    assert "Traceback" not in output
    for value in (secret, master_key, bad_value):
        if value is not None:
            assert value not in output


# -- broker down ---------------------------------------------------------------------------------


def test_commit_succeeds_quickly_when_the_broker_is_unreachable_and_rows_stay_pending(
    engine, deployment, monkeypatch, caplog
):
    down = "redis://127.0.0.1:1/0"
    monkeypatch.setenv("OUTBOX_BROKER_URL", down)
    canary = f"CANARY-{os.urandom(16).hex()}"
    outbox = outbox_for_app()
    pharmacy = new_opaque_id("pha")
    caplog.set_level(logging.WARNING, logger="outbox")
    with producer_app(down), Session(engine) as session:
        started = time.monotonic()
        rows = [
            enqueue_details(outbox, session, pharmacy, canary),
            enqueue_created(outbox, session, pharmacy),
        ]
        session.commit()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"commit took {elapsed:.2f}s with the broker down"
    warnings = [r for r in caplog.records if r.name == "outbox.producer"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "sweep will deliver" in warnings[0].getMessage()
    assert warnings[0].rows == 2
    assert all(find_canary(canary, str(vars(r))) is None for r in caplog.records)
    stored = table(engine)
    assert set(stored) == {r.id for r in rows}
    assert {r.status for r in stored.values()} == {"pending"}
    assert {r.attempts for r in stored.values()} == {0}
