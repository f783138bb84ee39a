"""Claim → publish → record against real databases and a real soketi with real subscribers."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import ChannelAuthorizer, new_opaque_id
from outbox.errors import PermanentPublishError, TransientPublishError
from outbox.models import events
from outbox.publisher import PusherPublisher
from outbox.relay import Relay
from outbox.retry import RetryPolicy
from outbox.store import Store, create_engine
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS, FakePublisher, make_outbox

CANARY = "CANARY-7f3a-PATIENT-Jane-Roe"


def rows(engine):
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.select(events))}


def enqueue_created(outbox, engine, pharmacy, n=1, **kw):
    out = []
    with Session(engine) as session, session.begin():
        for _ in range(n):
            out.append(
                outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "new", "items": 2},
                    **kw,
                )
            )
    return out


@pytest.fixture
def master_key():
    import os

    return os.urandom(32)


@pytest.fixture
def publisher(soketi, master_key):
    return PusherPublisher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret=soketi.secret,
        host="127.0.0.1",
        port=soketi.port,
        ssl=False,
        encryption_master_key=master_key,
    )


def test_committed_events_reach_a_subscriber_once_in_commit_order_and_encrypted(
    engine, publisher, make_subscriber
):
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    authorizer = ChannelAuthorizer(
        outbox=outbox,
        pusher_client=publisher.client,
        may_subscribe=lambda user, channel, nt, ids: ids["pharmacy_id"] == user,
        engine=engine,
        user_ref=lambda user: "usr_" + user[4:],
    )
    sub = make_subscriber()
    for channel in (f"private-pharmacy-{pharmacy}", f"private-encrypted-pharmacy-{pharmacy}"):
        sub.subscribe(
            channel,
            lambda socket_id, name: authorizer.authorize(
                pharmacy, socket_id=socket_id, channel_name=name
            ),
        )
    expected_created, expected_details = [], []
    for i in range(12):
        with Session(engine) as session, session.begin():
            order_id = new_opaque_id("ord")
            expected_created.append(
                outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": order_id, "status": "new", "items": i},
                ).event_id
            )
            expected_details.append(
                outbox.enqueue(
                    session,
                    ORDER_DETAILS,
                    ids={"pharmacy_id": pharmacy},
                    data={
                        "order_id": order_id,
                        "patient": f"{CANARY}-{i}",
                        "medication": "Ibuprofène",
                    },
                ).event_id
            )
    # a rolled-back transaction sends nothing
    with Session(engine) as session:
        session.begin()
        outbox.enqueue(
            session,
            ORDER_CREATED,
            ids={"pharmacy_id": pharmacy},
            data={"order_id": new_opaque_id("ord"), "status": "new", "items": 99},
        )
        session.rollback()

    relay = Relay(store=Store(engine), publisher=publisher, claim_batch_size=7)
    report = relay.drain(max_seconds=10)
    assert report.sent == 24 and report.dead == 0
    received = sub.wait_for(24, timeout=10)
    time.sleep(0.3)
    assert len(sub.events) == 24  # nothing more (rolled back event never sent)
    created = [e for e in received if e.event == "order.created"]
    details = [e for e in received if e.event == "order.details"]
    assert [e.data["id"] for e in created] == expected_created  # commit order
    assert [e.data["id"] for e in details] == expected_details
    assert [e.data["data"]["items"] for e in created] == list(range(12))
    assert all(e.decrypted for e in details)
    assert [e.data["data"]["patient"] for e in details] == [f"{CANARY}-{i}" for i in range(12)]
    assert all(not e.decrypted for e in created)
    # what soketi relayed for encrypted events is ciphertext only
    assert not any(CANARY in frame for frame in sub.frames)
    assert not any("Ibuprof" in frame for frame in sub.frames)
    # PHI payloads are erased once sent; opaque-id payloads stay for the retention window
    table = rows(engine)
    assert all(r.status == "sent" and r.sent_at is not None for r in table.values())
    assert all(r.data is None for r in table.values() if r.contains_phi)
    assert all(r.data is not None for r in table.values() if not r.contains_phi)
    assert not any(CANARY in str(tuple(r)) for r in table.values())


def test_soketi_error_body_with_http_200_is_a_dead_letter_not_a_success(
    engine, soketi, make_subscriber
):
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    good = PusherPublisher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret=soketi.secret,
        host="127.0.0.1",
        port=soketi.port,
        ssl=False,
    )
    sub = make_subscriber()
    sub.subscribe(
        f"private-pharmacy-{pharmacy}",
        lambda socket_id, name: good.client.authenticate(channel=name, socket_id=socket_id),
    )
    wrong = PusherPublisher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret="wrong-secret",
        host="127.0.0.1",
        port=soketi.port,
        ssl=False,
    )
    [event] = enqueue_created(outbox, engine, pharmacy)
    report = Relay(store=Store(engine), publisher=wrong).drain(max_seconds=5)
    assert report.sent == 0 and report.dead == 1
    row = rows(engine)[event.id]
    assert row.status == "dead" and "401" in row.last_error
    assert row.data is not None  # dead rows keep their payload for redrive
    time.sleep(0.3)
    assert sub.events == []
    # redrive with the right credentials delivers it
    assert Store(engine).redrive([event.id]) == 1
    Relay(store=Store(engine), publisher=good).drain(max_seconds=5)
    [got] = sub.wait_for(1, timeout=5)
    assert got.data["id"] == event.event_id


def test_oversize_event_that_slipped_past_enqueue_is_isolated_by_soketi_413(engine, soketi):
    outbox = make_outbox(max_payload_bytes=100_000)  # misconfigured: soketi allows 10 KB
    pharmacy = new_opaque_id("pha")
    publisher = PusherPublisher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret=soketi.secret,
        host="127.0.0.1",
        port=soketi.port,
        ssl=False,
        encryption_master_key=b"k" * 32,
    )
    small = enqueue_created(outbox, engine, pharmacy, n=3)
    with Session(engine) as session, session.begin():
        big = outbox.enqueue(
            session,
            ORDER_DETAILS,
            ids={"pharmacy_id": pharmacy},
            data={"order_id": new_opaque_id("ord"), "patient": "x" * 20_000, "medication": "m"},
        )
    more = enqueue_created(outbox, engine, new_opaque_id("pha"), n=2)
    report = Relay(store=Store(engine), publisher=publisher, publish_concurrency=1).drain(
        max_seconds=5
    )
    table = rows(engine)
    assert table[big.id].status == "dead" and "413" in table[big.id].last_error
    assert all(table[e.id].status == "sent" for e in small + more)
    assert report.dead == 1 and report.sent == 5


def test_transient_failure_retries_later_and_holds_back_only_its_key(engine):
    outbox = make_outbox()
    blocked_pharmacy, other_pharmacy = new_opaque_id("pha"), new_opaque_id("pha")
    first = enqueue_created(outbox, engine, blocked_pharmacy, n=3)

    def fail_blocked(event):
        if blocked_pharmacy in event.channel:
            return TransientPublishError(
                "HTTP 503 from Pusher: server error", status=503, retry_after_seconds=60
            )
        return None

    fake = FakePublisher(fail_for=fail_blocked)
    relay = Relay(store=Store(engine), publisher=fake, publish_concurrency=1)
    report = relay.drain(max_seconds=5)
    # one request carried all three: each is scheduled for a retry no earlier than Retry-After
    assert report.retried == 3 and report.requests == 1
    others = enqueue_created(outbox, engine, other_pharmacy, n=3)
    report = relay.drain(max_seconds=5)
    table = rows(engine)
    assert all(table[e.id].status == "sent" for e in others)
    head = table[first[0].id]
    assert head.status == "pending" and head.attempts == 1 and "503" in head.last_error
    assert head.available_at >= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=55)
    assert json.loads(head.attempt_log)[0]["outcome"] == "retry"
    # the later events of the failed key were never sent and are not claimable before the head
    assert {table[e.id].status for e in first[1:]} == {"pending"}
    assert {table[e.id].attempts for e in first[1:]} == {1}
    assert report.sent == 3 and report.claimed == 3
    again = relay.drain(max_seconds=2)
    assert again.claimed == 0


def test_permanent_failure_of_one_event_does_not_block_others(engine):
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    batch = enqueue_created(outbox, engine, pharmacy, n=5)
    poison = batch[2].event_id

    def fail_poison(event):
        if poison in event.data:
            return PermanentPublishError(
                "HTTP 400 from Pusher: request rejected as invalid", status=400
            )
        return None

    fake = FakePublisher(fail_for=fail_poison)
    report = Relay(store=Store(engine), publisher=fake).drain(max_seconds=5)
    table = rows(engine)
    assert [table[e.id].status for e in batch] == ["sent", "sent", "dead", "sent", "sent"]
    assert report.dead == 1 and report.sent == 4
    # order kept for the ones delivered
    ids = [json.loads(e.data)["id"] for e in fake.published]
    assert ids == [e.event_id for e in batch if e.event_id != poison]


def test_attempts_and_age_limits_dead_letter_with_history(engine):
    outbox = make_outbox()
    [event] = enqueue_created(outbox, engine, new_opaque_id("pha"))
    fake = FakePublisher(
        fail_for=lambda e: TransientPublishError("connection error: could not reach Pusher")
    )
    relay = Relay(
        store=Store(engine),
        publisher=fake,
        retry_policy=RetryPolicy(max_attempts=3, base_delay_seconds=0.01, max_delay_seconds=0.02),
    )
    deadline = time.monotonic() + 10
    while rows(engine)[event.id].status != "dead" and time.monotonic() < deadline:
        relay.drain(max_seconds=1)
        time.sleep(0.03)
    row = rows(engine)[event.id]
    assert row.status == "dead" and row.attempts == 3
    log = json.loads(row.attempt_log)
    assert [entry["outcome"] for entry in log] == ["retry", "retry", "dead"]
    assert "gave up after 3 attempts" in row.last_error


def test_expired_events_are_not_delivered_late(engine):
    outbox = make_outbox()
    [event] = enqueue_created(outbox, engine, new_opaque_id("pha"), ttl_seconds=0.05)
    time.sleep(0.2)
    fake = FakePublisher()
    report = Relay(store=Store(engine), publisher=fake).drain(max_seconds=2)
    assert fake.batches == []
    assert report.expired == 1
    assert rows(engine)[event.id].status == "expired"


def test_rows_claimed_past_their_ttl_are_expired_without_charging_an_attempt(engine):
    outbox = make_outbox()
    [late] = enqueue_created(outbox, engine, new_opaque_id("pha"), ttl_seconds=0.05)
    [fresh] = enqueue_created(outbox, engine, new_opaque_id("pha"))
    time.sleep(0.2)
    store = Store(engine)
    claimed = {ev.id: ev for ev in store.claim(limit=10, lease_seconds=30).events}
    assert claimed[late.id].overdue and not claimed[fresh.id].overdue
    assert store.expire([claimed[late.id]]) == 1
    table = rows(engine)
    assert (table[late.id].status, table[late.id].attempts) == ("expired", 0)
    assert table[fresh.id].status == "in_flight"


def test_a_claim_never_overtakes_an_earlier_row_locked_by_a_concurrent_claimer(
    engine, database_url
):
    """PostgreSQL's SKIP LOCKED passes over a row another claimer holds; the later rows of that
    key must wait, while other keys are claimed."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite claims one writer at a time")
    outbox = make_outbox()
    busy = enqueue_created(outbox, engine, new_opaque_id("pha"), n=3)
    idle = enqueue_created(outbox, engine, new_opaque_id("pha"), n=2)
    with engine.connect() as other:
        # Another claimer's transaction holds the first row of the busy key, not yet committed.
        other.execute(sa.select(events.c.id).where(events.c.id == busy[0].id).with_for_update())
        claim = Store(engine).claim(limit=10, lease_seconds=30)
        other.rollback()
    assert [ev.id for ev in claim.events] == [ev.id for ev in idle]
    assert claim.contended  # the busy key's later rows are due: claiming again may find them
    assert {r.status for i, r in rows(engine).items() if i in {ev.id for ev in busy}} == {"pending"}


def test_a_drain_that_meets_a_concurrent_claimer_claims_again_instead_of_giving_up(
    engine, database_url
):
    """The lost-wakeup race: another claimer holds the oldest row for a moment, so a claim
    comes back empty; the drain must not end (and its relay must not count as caught up)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite claims one writer at a time")
    outbox = make_outbox()
    queued = enqueue_created(outbox, engine, new_opaque_id("pha"), n=4)
    fake = FakePublisher()
    relay = Relay(store=Store(engine), publisher=fake)
    with engine.connect() as other:
        other.execute(sa.select(events.c.id).where(events.c.id == queued[0].id).with_for_update())
        release = threading.Timer(0.3, other.rollback)
        release.start()
        report = relay.drain(max_seconds=5)
        release.join()
    assert report.sent == 4 and report.exhausted
    assert [json.loads(e.data)["id"] for e in fake.published] == [e.event_id for e in queued]


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_new_owner(engine):
    outbox = make_outbox()
    [event] = enqueue_created(outbox, engine, new_opaque_id("pha"))
    store = Store(engine)
    stale = store.claim(limit=10, lease_seconds=0.05).events
    time.sleep(0.2)
    assert store.reclaim_expired_leases() == 1
    fresh = store.claim(limit=10, lease_seconds=30).events
    assert [e.id for e in fresh] == [event.id] and fresh[0].lease_token != stale[0].lease_token
    assert store.mark_sent(stale, erase_phi_now=True) == 0  # the old worker's write is refused
    assert rows(engine)[event.id].status == "in_flight"
    assert store.mark_sent(fresh, erase_phi_now=True) == 1
    assert rows(engine)[event.id].status == "sent"


def test_retention_erases_payloads_and_purge_deletes_only_finished_rows(engine):
    outbox = make_outbox()
    sent = enqueue_created(outbox, engine, new_opaque_id("pha"), n=2)
    pending = enqueue_created(outbox, engine, new_opaque_id("pha"), n=1)
    store = Store(engine)
    claimed = store.claim(limit=2, lease_seconds=30).events
    store.mark_sent(claimed, erase_phi_now=True)
    assert (
        store.erase_payloads(
            phi_retention_seconds=0, payload_retention_seconds=0, dead_retention_seconds=0
        )
        == 2
    )
    table = rows(engine)
    assert all(table[e.id].data is None and table[e.id].payload_erased_at for e in sent)
    assert table[pending[0].id].data is not None
    assert store.purge(older_than_seconds=0) == 2
    assert set(rows(engine)) == {pending[0].id}


def test_concurrent_relays_never_double_claim_and_keep_per_key_order(engine, database_url):
    """Four relays, each with its own engine as in separate worker processes."""
    outbox = make_outbox()
    pharmacies = [new_opaque_id("pha") for _ in range(5)]
    for _ in range(8):
        for pharmacy in pharmacies:
            enqueue_created(outbox, engine, pharmacy, n=5)
    fakes = [FakePublisher() for _ in range(4)]
    lock = threading.Lock()
    sequence = []

    class Recording(FakePublisher):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def publish_batch(self, batch):
            time.sleep(0.002)
            with lock:
                sequence.extend(batch)

    engines = [create_engine(database_url) for _ in fakes]
    relays = [
        Relay(store=Store(e), publisher=Recording(f), claim_batch_size=13)
        for e, f in zip(engines, fakes, strict=True)
    ]
    threads = [threading.Thread(target=r.drain, kwargs={"max_seconds": 20}) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for e in engines:
        e.dispose()
    table = rows(engine)
    assert all(r.status == "sent" for r in table.values())
    published_ids = [json.loads(e.data)["id"] for e in sequence]
    assert len(published_ids) == len(set(published_ids)) == 200
    by_channel = {}
    for e in sequence:
        by_channel.setdefault(e.channel, []).append(json.loads(e.data)["id"])
    id_of = {r.event_id: r.id for r in table.values()}
    for ids in by_channel.values():
        assert [id_of[i] for i in ids] == sorted(id_of[i] for i in ids)


def test_the_sweep_delivers_rows_of_a_worker_that_died_mid_batch(engine):
    outbox = make_outbox()
    batch = enqueue_created(outbox, engine, new_opaque_id("pha"), n=4)
    store = Store(engine)
    died = store.claim(limit=10, lease_seconds=0.1).events  # the worker dies before publishing
    assert len(died) == 4
    fake = FakePublisher()
    relay = Relay(store=store, publisher=fake)
    assert relay.drain(max_seconds=1).claimed == 0  # leased rows are not touched by a drain
    time.sleep(0.3)
    report = relay.sweep(max_seconds=5)
    assert report.sent == 4
    assert [json.loads(e.data)["id"] for e in fake.published] == [e.event_id for e in batch]
    assert all(r.status == "sent" for r in rows(engine).values())


def test_a_lease_shorter_than_a_publish_request_is_refused(engine):
    from outbox import ConfigurationError

    with pytest.raises(ConfigurationError, match="OUTBOX_LEASE_SECONDS"):
        Relay(
            store=Store(engine),
            publisher=FakePublisher(),
            lease_seconds=3,
            publish_timeout_seconds=5,
        )


def test_a_slow_pass_extends_its_lease_instead_of_losing_it(engine):
    outbox = make_outbox()
    enqueue_created(outbox, engine, new_opaque_id("pha"), n=30)

    class Slow(FakePublisher):
        def publish_batch(self, events):
            time.sleep(0.6)
            super().publish_batch(events)

    store = Store(engine)
    fake = Slow()
    relay = Relay(
        store=store,
        publisher=fake,
        lease_seconds=1.5,
        publish_timeout_seconds=0.5,
        publish_concurrency=1,
    )
    stop = threading.Event()
    reclaimed = []

    def sweeper():  # another worker's sweep, reclaiming expired leases all the time
        while not stop.is_set():
            reclaimed.append(Store(engine).reclaim_expired_leases())
            time.sleep(0.05)

    thread = threading.Thread(target=sweeper)
    thread.start()
    try:
        report = relay.run_once()  # 3 requests of 0.6 s: longer than the 1.5 s lease
    finally:
        stop.set()
        thread.join(timeout=10)
    assert report.sent == 30
    assert report.lost_leases == 0
    assert sum(reclaimed) == 0
    assert all(r.status == "sent" for r in rows(engine).values())


def test_caught_up_marks_the_start_of_the_last_claim_that_took_every_due_row(engine):
    outbox = make_outbox()
    enqueue_created(outbox, engine, new_opaque_id("pha"), n=5)
    relay = Relay(store=Store(engine), publisher=FakePublisher(), claim_batch_size=2)
    before = time.time()
    first = relay.run_once()  # 2 of 5 due rows: more may be due, not caught up
    assert (first.claimed, first.exhausted, relay.caught_up_at) == (2, False, 0.0)
    report = relay.drain(max_seconds=5)
    assert report.exhausted and report.sent == 3
    assert before <= relay.caught_up_at <= time.time()


def test_a_drain_that_runs_out_of_time_says_rows_are_left(engine):
    outbox = make_outbox()
    enqueue_created(outbox, engine, new_opaque_id("pha"), n=6)
    relay = Relay(store=Store(engine), publisher=FakePublisher(), claim_batch_size=2)
    report = relay.drain(max_seconds=0)  # one pass, then the deadline
    assert (report.sent, report.exhausted) == (2, False)
    assert sum(r.status == "pending" for r in rows(engine).values()) == 4


def test_the_relay_task_skips_kicks_sent_before_it_caught_up_and_carries_on_when_cut_short(
    monkeypatch,
):
    from workers import tasks

    class FakeRelay:
        caught_up_at = 1000.0
        drains = 0

        def drain(self, *, max_seconds):
            self.drains += 1
            return type(
                "Report",
                (),
                {
                    "exhausted": self.drains > 1,
                    **dict.fromkeys(
                        ("claimed", "sent", "retried", "dead", "expired", "released"), 0
                    ),
                },
            )()

    fake = FakeRelay()
    runtime = type("Runtime", (), {"relay": fake, "settings": type("S", (), {"drain_seconds": 1})})
    kicks = []
    monkeypatch.setattr(tasks.runtime, "get", lambda: runtime)
    monkeypatch.setattr(tasks, "send_kick", lambda ids: kicks.append(list(ids)))
    assert tasks.relay.run([1], sent_at=999.0) == {"skipped": 1}  # before it caught up
    assert fake.drains == 0
    tasks.relay.run([2], sent_at=1000.5)  # after: drains; cut short, so it kicks itself again
    assert (fake.drains, kicks) == (1, [[]])
    tasks.relay.run([3], sent_at=1001.0)
    assert (fake.drains, kicks) == (2, [[]])


def test_a_drain_cut_short_after_publishing_owes_its_keys_another_claim(engine):
    """Rows of a key committed while its row was in flight are held back for this relay's next
    claim; a drain stopped by its deadline must say so (the task then kicks again)."""
    outbox = make_outbox()
    enqueue_created(outbox, engine, new_opaque_id("pha"), n=1)
    relay = Relay(store=Store(engine), publisher=FakePublisher(), claim_batch_size=100)
    report = relay.drain(max_seconds=0)
    assert report.sent == 1 and not report.exhausted


def test_a_drain_stops_retrying_a_claim_held_up_by_a_stuck_transaction(engine, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite claims one writer at a time")
    from outbox import relay as relay_module

    outbox = make_outbox()
    queued = enqueue_created(outbox, engine, new_opaque_id("pha"), n=2)
    store = Store(engine)
    claims = []
    real_claim = store.claim

    def counting_claim(**kw):
        claims.append(1)
        return real_claim(**kw)

    store.claim = counting_claim
    relay = Relay(store=store, publisher=FakePublisher())
    with engine.connect() as other:
        other.execute(sa.select(events.c.id).where(events.c.id == queued[0].id).with_for_update())
        started = time.monotonic()
        report = relay.drain(max_seconds=10)
        other.rollback()
    took = time.monotonic() - started
    assert (
        relay_module.CONTENTION_BUDGET_SECONDS <= took < relay_module.CONTENTION_BUDGET_SECONDS + 1
    )
    assert 5 < len(claims) < 1000
    assert report.exhausted and report.sent == 0  # left to the sweep: no self-kick loop
    assert relay.caught_up_at == 0.0  # and kicks are not skipped on its account


# --- the overlapping drain (claim ahead while publishing) ----------------------------------


def published_ids(fake):
    return [json.loads(e.data)["id"] for e in fake.published]


def test_rows_committed_while_a_drains_last_pass_publishes_are_delivered_by_that_drain(engine):
    """A kick's claim passes over rows of a key this relay holds; the relay must claim again
    after recording, or those rows wait for the sweep."""
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    [first] = enqueue_created(outbox, engine, pharmacy)
    later = []

    class CommitsWhilePublishing(FakePublisher):
        def publish_batch(self, events):
            super().publish_batch(events)
            if not later:
                later.extend(enqueue_created(outbox, engine, pharmacy))
                # another relay's kick claims now: the key is held by our lease, nothing for it
                assert Store(engine).claim(limit=10, lease_seconds=30).events == []

    fake = CommitsWhilePublishing()
    report = Relay(store=Store(engine), publisher=fake).drain(max_seconds=5)
    assert published_ids(fake) == [first.event_id, later[0].event_id]
    assert report.exhausted and report.sent == 2
    assert {r.status for r in rows(engine).values()} == {"sent"}


@pytest.mark.parametrize("attempts", [1, 3], ids=["dead-lettered", "retried"])
def test_a_key_failing_mid_drain_resumes_in_order_in_the_same_drain(engine, attempts):
    """Rows of a failing key claimed ahead are given back at once; once the failure is
    recorded (dead, or waiting for a retry), the key carries on in order, not at the drain's
    end."""
    outbox = make_outbox()
    batch = enqueue_created(outbox, engine, new_opaque_id("pha"), n=6)
    fake = FakePublisher(script=[TransientPublishError("HTTP 503 from Pusher: server error")])
    relay = Relay(
        store=Store(engine),
        publisher=fake,
        claim_batch_size=2,  # claims r1 r2, then r3 r4 ahead while r1 r2 fail
        retry_policy=RetryPolicy(
            max_attempts=attempts, base_delay_seconds=0.001, max_delay_seconds=0.002
        ),
    )
    started = time.monotonic()
    report = relay.drain(max_seconds=10)
    deadline = time.monotonic() + 5
    while attempts > 1 and not report.exhausted and time.monotonic() < deadline:
        report = relay.drain(max_seconds=10)  # a retry that fell due after the last claim
    took = time.monotonic() - started
    ids = [e.event_id for e in batch]
    table = rows(engine)
    if attempts == 1:
        assert published_ids(fake) == ids[2:]
        assert [table[e.id].status for e in batch] == ["dead"] * 2 + ["sent"] * 4
    else:
        assert published_ids(fake) == ids
        assert {table[e.id].status for e in batch} == {"sent"}
    # no row claimed ahead was charged an attempt for being given back
    assert [table[e.id].attempts for e in batch[2:]] == [1] * 4
    assert took < 5  # not stalled until the drain's deadline


def test_an_error_mid_drain_records_what_was_published_before_it_propagates(engine):
    outbox = make_outbox()
    batch = enqueue_created(outbox, engine, new_opaque_id("pha"), n=4)
    store = Store(engine)
    real_claim = store.claim

    def failing_ahead(**kw):
        if kw.get("following"):
            raise sa.exc.OperationalError("claim", {}, Exception("connection lost"))
        return real_claim(**kw)

    store.claim = failing_ahead
    fake = FakePublisher()
    relay = Relay(store=store, publisher=fake, claim_batch_size=2)
    with pytest.raises(sa.exc.OperationalError):
        relay.drain(max_seconds=5)
    table = rows(engine)
    assert published_ids(fake) == [e.event_id for e in batch[:2]]
    # published rows are recorded sent (not left leased to be published again)
    assert [table[e.id].status for e in batch] == ["sent", "sent", "pending", "pending"]


def test_an_unexpected_publisher_error_is_charged_as_unknown_and_other_keys_go_on(engine):
    outbox = make_outbox()
    broken_pharmacy = new_opaque_id("pha")
    broken = enqueue_created(outbox, engine, broken_pharmacy, n=2)
    others = enqueue_created(outbox, engine, new_opaque_id("pha"), n=2)

    def bug(event):
        if broken_pharmacy in event.channel:
            raise ValueError(f"bad value {CANARY}")  # a bug; its text may carry data
        return None

    fake = FakePublisher(fail_for=bug)
    report = Relay(store=Store(engine), publisher=fake).drain(max_seconds=5)
    table = rows(engine)
    assert [table[e.id].status for e in others] == ["sent", "sent"]
    head = table[broken[0].id]
    assert head.status == "pending" and head.attempts == 1
    assert head.last_error.startswith("unexpected ValueError while publishing; delivery unknown")
    assert CANARY not in head.last_error and CANARY not in (head.attempt_log or "")
    assert report.sent == 2 and report.retried == 2


def test_a_lease_that_lapsed_while_claiming_ahead_is_not_overtaken(engine):
    """The claim ahead sits between the last request and the record: when the lease lapsed
    meanwhile and the rows were taken back, the rows claimed ahead are given back unpublished
    instead of going out before the earlier rows are published again."""
    outbox = make_outbox()
    batch = enqueue_created(outbox, engine, new_opaque_id("pha"), n=4)
    store = Store(engine)
    real_claim = store.claim

    def slow_ahead(**kw):
        claimed = real_claim(**kw)
        if kw.get("following"):
            store.extend_lease(claimed.token, lease_seconds=30)  # only the earlier lease lapses
            time.sleep(1.8)  # longer than the 1.5 s lease of the rows being published
            assert Store(engine).reclaim_expired_leases() == 2  # another worker's sweep
        return claimed

    store.claim = slow_ahead
    fake = FakePublisher()
    relay = Relay(
        store=store,
        publisher=fake,
        claim_batch_size=2,
        lease_seconds=1.5,
        publish_timeout_seconds=0.5,
    )
    report = relay.drain(max_seconds=10)
    assert not report.exhausted  # the rows given back are owed to a new task
    store.claim = real_claim
    relay.drain(max_seconds=10)
    ids = published_ids(fake)
    first_two = [e.event_id for e in batch[:2]]
    # r1 r2 went out, were taken back and went out again; r3 only after their last time
    last_of_first = max(len(ids) - 1 - ids[::-1].index(i) for i in first_two)
    assert ids.index(batch[2].event_id) > last_of_first
    assert {r.status for r in rows(engine).values()} == {"sent"}


def test_an_error_right_after_a_claim_gives_its_rows_back(engine):
    outbox = make_outbox()
    late = enqueue_created(outbox, engine, new_opaque_id("pha"), n=2, ttl_seconds=0.05)
    time.sleep(0.2)  # overdue: the relay expires them right after its claim
    store = Store(engine)

    def broken_expire(claimed):
        raise sa.exc.OperationalError("expire", {}, Exception("connection lost"))

    store.expire = broken_expire
    with pytest.raises(sa.exc.OperationalError):
        Relay(store=store, publisher=FakePublisher()).drain(max_seconds=5)
    table = rows(engine)
    # not left leased to block their key until the lease runs out
    assert [table[e.id].status for e in late] == ["pending", "pending"]
    assert [table[e.id].attempts for e in late] == [0, 0]
