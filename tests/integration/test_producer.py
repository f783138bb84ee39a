"""Enqueue in the caller's transaction, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import (
    ConfigurationError,
    PayloadTooLarge,
    PrivacyViolation,
    SessionError,
    new_opaque_id,
)
from outbox.models import events
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS, make_outbox


def rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(events).order_by(events.c.id)).all()


def created(pharmacy=None, **data):
    payload = {"order_id": new_opaque_id("ord"), "status": "new", "items": 1}
    payload.update(data)
    return {"ids": {"pharmacy_id": pharmacy or new_opaque_id("pha")}, "data": payload}


def test_rolled_back_transaction_writes_nothing(engine):
    outbox = make_outbox()
    with Session(engine) as session:
        session.begin()
        outbox.enqueue(session, ORDER_CREATED, **created())
        session.rollback()
    assert rows(engine) == []


def test_committed_transaction_writes_one_pending_row(engine):
    outbox = make_outbox()
    with Session(engine) as session, session.begin():
        result = outbox.enqueue(session, ORDER_CREATED, **created())
    [row] = rows(engine)
    assert row.id == result.id and row.event_id == result.event_id
    assert row.status == "pending" and row.attempts == 0
    assert row.channel == result.channel and row.expires_at > row.created_at
    assert '"id":"' + result.event_id in row.data


def test_enqueue_never_commits(engine):
    outbox = make_outbox()
    session = Session(engine)
    outbox.enqueue(session, ORDER_CREATED, **created())
    session.close()  # never committed
    assert rows(engine) == []


def test_dedup_key_returns_the_first_row(engine):
    outbox = make_outbox()
    with Session(engine) as session, session.begin():
        first = outbox.enqueue(session, ORDER_CREATED, dedup_key="k1", **created())
        second = outbox.enqueue(session, ORDER_CREATED, dedup_key="k1", **created())
    assert first.created and not second.created
    assert (second.id, second.event_id) == (first.id, first.event_id)
    assert len(rows(engine)) == 1


def test_concurrent_enqueues_of_one_dedup_key_end_with_one_row(engine):
    outbox = make_outbox()
    barrier = threading.Barrier(4)
    results, errors = [], []

    def worker():
        try:
            with Session(engine) as session, session.begin():
                barrier.wait(timeout=10)
                results.append(
                    outbox.enqueue(session, ORDER_CREATED, dedup_key="race", **created())
                )
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(rows(engine)) == 1
    assert sum(r.created for r in results) == 1
    assert len({r.event_id for r in results}) == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"data": {"order_id": "12345", "status": "new", "items": 1}}, PrivacyViolation),
        (
            {"data": {"order_id": "x", "status": "new", "items": 1, "name": "CANARY"}},
            PrivacyViolation,
        ),
        ({"ids": {"pharmacy_id": "jane@example.com"}}, PrivacyViolation),
        ({"dedup_key": "patient-123-45-6789"}, PrivacyViolation),
        ({"exclude_socket_id": "not-a-socket"}, PrivacyViolation),
        ({"ttl_seconds": -5}, ConfigurationError),
    ],
)
def test_bad_inputs_are_refused_and_write_nothing(engine, kwargs, error):
    outbox = make_outbox()
    args = created()
    args.update(kwargs)
    with Session(engine) as session, session.begin(), pytest.raises(error) as info:
        outbox.enqueue(session, ORDER_CREATED, **args)
    assert "CANARY" not in str(info.value)
    assert rows(engine) == []


def test_oversize_encrypted_payload_is_refused_at_enqueue(engine):
    outbox = make_outbox(max_payload_bytes=10_240)
    with Session(engine) as session, session.begin(), pytest.raises(PayloadTooLarge) as info:
        outbox.enqueue(
            session,
            ORDER_DETAILS,
            ids={"pharmacy_id": new_opaque_id("pha")},
            data={"order_id": new_opaque_id("ord"), "patient": "é" * 3800, "medication": "x"},
        )
    assert info.value.size_bytes > 10_240 and "é" not in str(info.value)
    assert rows(engine) == []


def test_encrypted_types_need_the_master_key(engine):
    outbox = make_outbox(encryption_enabled=False)
    with Session(engine) as session, session.begin(), pytest.raises(ConfigurationError) as info:
        outbox.enqueue(
            session,
            ORDER_DETAILS,
            ids={"pharmacy_id": new_opaque_id("pha")},
            data={"order_id": new_opaque_id("ord"), "patient": "p", "medication": "m"},
        )
    assert "PUSHER_ENCRYPTION_MASTER_KEY_BASE64" in str(info.value)


def test_a_session_is_required(engine):
    outbox = make_outbox()
    with pytest.raises(SessionError):
        outbox.enqueue(None, ORDER_CREATED, **created())  # type: ignore[arg-type]
    with engine.connect() as conn, pytest.raises(SessionError):
        outbox.enqueue(conn, ORDER_CREATED, **created())  # type: ignore[arg-type]


def test_an_autocommit_session_is_refused(engine):
    outbox = make_outbox()
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    with Session(auto) as session, pytest.raises(SessionError, match="AUTOCOMMIT"):
        outbox.enqueue(session, ORDER_CREATED, **created())
    assert rows(engine) == []


def test_on_commit_receives_row_ids_only_after_commit(engine):
    kicked = []
    outbox = make_outbox(on_commit=kicked.append)
    with Session(engine) as session:
        with session.begin():
            a = outbox.enqueue(session, ORDER_CREATED, **created())
            b = outbox.enqueue(session, ORDER_CREATED, **created())
            assert kicked == []
        assert kicked == [[a.id, b.id]]
        session.begin()
        outbox.enqueue(session, ORDER_CREATED, **created())
        session.rollback()
    assert kicked == [[a.id, b.id]]


def test_a_failing_kick_never_fails_the_commit(engine, caplog):
    def broken(ids):
        raise ConnectionError("broker down CANARY")

    outbox = make_outbox(on_commit=broken)
    with Session(engine) as session, session.begin():
        outbox.enqueue(session, ORDER_CREATED, **created())
    assert len(rows(engine)) == 1
    assert "sweep will deliver" in caplog.text
    assert "CANARY" not in caplog.text


def test_async_session_enqueue(database_url):
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async_url = database_url.replace("sqlite://", "sqlite+aiosqlite://")
    outbox = make_outbox()

    async def main():
        engine = create_async_engine(async_url)
        try:
            async with AsyncSession(engine) as session, session.begin():
                result = await outbox.enqueue_async(session, ORDER_CREATED, **created())
            async with AsyncSession(engine) as session:
                session.begin()
                await outbox.enqueue_async(session, ORDER_CREATED, **created())
                await session.rollback()
            return result
        finally:
            await engine.dispose()

    # A fresh thread has no event loop, whatever earlier tests (browsers) left in this one.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(asyncio.run, main()).result(timeout=60)
    sync_engine = sa.create_engine(database_url)
    try:
        [row] = rows(sync_engine)
    finally:
        sync_engine.dispose()
    assert row.id == result.id


def seqs(engine, channel):
    with engine.connect() as conn:
        return (
            conn.execute(
                sa.select(events.c.seq).where(events.c.channel == channel).order_by(events.c.id)
            )
            .scalars()
            .all()
        )


def test_sequence_numbers_are_per_channel_gap_free_and_survive_rollbacks_and_dedup(engine):
    outbox = make_outbox()
    a, b = new_opaque_id("pha"), new_opaque_id("pha")
    with Session(engine) as session, session.begin():
        first = outbox.enqueue(session, ORDER_CREATED, dedup_key="d1", **created(a))
        outbox.enqueue(session, ORDER_CREATED, **created(b))
    with Session(engine) as session:
        session.begin()
        outbox.enqueue(session, ORDER_CREATED, **created(a))
        session.rollback()
    with Session(engine) as session, session.begin():
        again = outbox.enqueue(session, ORDER_CREATED, dedup_key="d1", **created(a))
        outbox.enqueue(session, ORDER_CREATED, **created(a))
        outbox.enqueue(session, ORDER_CREATED, **created(b))
    assert not again.created
    assert again.id == first.id
    assert seqs(engine, f"private-pharmacy-{a}") == [1, 2]
    assert seqs(engine, f"private-pharmacy-{b}") == [1, 2]
    [row] = [r for r in rows(engine) if r.id == first.id]
    assert '"seq":1' in row.data


def test_concurrent_producers_of_one_channel_get_sequence_numbers_in_commit_order(engine):
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    errors = []

    def worker():
        try:
            for _ in range(10):
                with Session(engine) as session, session.begin():
                    outbox.enqueue(session, ORDER_CREATED, **created(pharmacy))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert seqs(engine, f"private-pharmacy-{pharmacy}") == list(range(1, 41))
