"""Catch-up returns what a client missed, as the privacy rules allow, to allowed users only."""

from __future__ import annotations

import pusher
import pytest
from sqlalchemy.orm import Session

from outbox import AuthorizationError, CatchUp, ChannelAuthorizer, new_opaque_id
from outbox.errors import PermanentPublishError
from outbox.relay import Relay
from outbox.store import Store
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS, FakePublisher, make_outbox

PHARMACY = new_opaque_id("pha")
CREATED = f"private-pharmacy-{PHARMACY}"
DETAILS = f"private-encrypted-pharmacy-{PHARMACY}"


@pytest.fixture
def catchup(engine):
    outbox = make_outbox()
    authorizer = ChannelAuthorizer(
        outbox=outbox,
        pusher_client=pusher.Pusher(app_id="1", key="k", secret="s", host="127.0.0.1"),
        may_subscribe=lambda user, channel, nt, ids: ids["pharmacy_id"] == user,
        engine=engine,
    )
    return outbox, CatchUp(store=Store(engine), authorizer=authorizer, max_events=50)


def enqueue(outbox, engine, n, *, details=False):
    with Session(engine) as session, session.begin():
        for i in range(n):
            order_id = new_opaque_id("ord")
            if details:
                outbox.enqueue(
                    session,
                    ORDER_DETAILS,
                    ids={"pharmacy_id": PHARMACY},
                    data={"order_id": order_id, "patient": f"P{i}", "medication": "m"},
                )
            else:
                outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": PHARMACY},
                    data={"order_id": order_id, "status": "new", "items": i},
                )


def test_catch_up_returns_sent_events_in_order_and_stops_at_unpublished_ones(engine, catchup):
    outbox, cu = catchup
    enqueue(outbox, engine, 5)
    Relay(store=Store(engine), publisher=FakePublisher()).drain(max_seconds=5)
    enqueue(outbox, engine, 2)  # not yet published
    body = cu.fetch(PHARMACY, channel=CREATED, after_seq=2)
    assert [e["seq"] for e in body["events"]] == [3, 4, 5]
    assert [e["data"]["items"] for e in body["events"]] == [2, 3, 4]
    assert body["complete"] is False
    assert body["last_seq"] == 7
    assert body["reset"] is False
    assert cu.fetch(PHARMACY, channel=CREATED, after_seq=0)["events"][0]["seq"] == 1


def test_phi_erased_by_retention_is_never_returned_and_dead_events_are_skipped(engine, catchup):
    outbox, cu = catchup
    enqueue(outbox, engine, 3, details=True)
    calls = {"n": 0}

    def fail_second(event):
        calls["n"] += 1
        return (
            PermanentPublishError("HTTP 400 from Pusher: request rejected as invalid", status=400)
            if '"seq":2' in event.data
            else None
        )

    Relay(
        store=Store(engine), publisher=FakePublisher(fail_for=fail_second), publish_concurrency=1
    ).drain(max_seconds=5)
    body = cu.fetch(PHARMACY, channel=DETAILS, after_seq="0")
    assert [(e["seq"], e.get("erased"), e.get("skipped")) for e in body["events"]] == [
        (1, True, None),
        (2, None, "dead"),
        (3, True, None),
    ]
    assert all("data" not in e for e in body["events"])
    assert body["complete"] is True


def test_positions_older_than_the_retained_rows_ask_for_a_reset(engine, catchup):
    outbox, cu = catchup
    enqueue(outbox, engine, 4)
    store = Store(engine)
    Relay(store=store, publisher=FakePublisher()).drain(max_seconds=5)
    store.purge(older_than_seconds=0)
    body = cu.fetch(PHARMACY, channel=CREATED, after_seq=1)
    assert body["reset"] is True
    assert body["events"] == []
    assert cu.fetch(PHARMACY, channel=CREATED, after_seq=4)["reset"] is False


@pytest.mark.parametrize(
    ("user", "channel", "after_seq", "status"),
    [
        (new_opaque_id("pha"), CREATED, 0, 403),  # may not subscribe: may not catch up
        (PHARMACY, "private-other-x", 0, 403),
        (PHARMACY, "private-jane@example.com", 0, 400),
        (PHARMACY, CREATED, -1, 400),
        (PHARMACY, CREATED, "abc", 400),
        (PHARMACY, CREATED, None, 400),
    ],
)
def test_catch_up_is_authorized_like_subscriptions(catchup, user, channel, after_seq, status):
    _, cu = catchup
    response = cu.handle(user, {"channel": channel, "after_seq": after_seq})
    assert response.status == status
    assert "events" not in response.body
    with pytest.raises(AuthorizationError):
        cu.fetch(user, channel=channel, after_seq=after_seq)
