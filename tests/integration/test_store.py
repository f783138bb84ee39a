"""Which rows a claim takes, and how it finds them, on real SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import new_opaque_id
from outbox.models import IX_DUE, events
from outbox.store import CLAIM_PLANNER_OFF, Store, _claim_lock
from tests.integration.helpers import ORDER_CREATED, make_outbox


def enqueue_round_robin(engine, pharmacies, per_pharmacy):
    """``per_pharmacy`` events on each pharmacy's channel, interleaved as traffic arrives."""
    outbox = make_outbox()
    ids: dict[str, list[int]] = {p: [] for p in pharmacies}
    with Session(engine) as session, session.begin():
        for _ in range(per_pharmacy):
            for pharmacy in pharmacies:
                row = outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids={"pharmacy_id": pharmacy},
                    data={"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
                )
                ids[pharmacy].append(row.id)
    return ids


def by_pharmacy(claim, pharmacies):
    return {p: [ev.id for ev in claim.events if p in ev.channel] for p in pharmacies}


def test_a_claim_takes_each_keys_oldest_batch_before_any_keys_second(engine):
    """Many rows on few keys: whole batches of the oldest keys, the other keys left over."""
    pharmacies = [new_opaque_id("pha") for _ in range(3)]
    ids = enqueue_round_robin(engine, pharmacies, 25)
    claim = Store(engine).claim(limit=20, lease_seconds=30)
    got = by_pharmacy(claim, pharmacies)
    assert got == {pharmacies[0]: ids[pharmacies[0]][:10], pharmacies[1]: ids[pharmacies[1]][:10],
                   pharmacies[2]: []}  # fmt: skip
    assert not claim.contended


def test_a_second_relay_gets_the_keys_the_first_one_left(engine):
    pharmacies = [new_opaque_id("pha") for _ in range(3)]
    ids = enqueue_round_robin(engine, pharmacies, 25)
    store = Store(engine)
    first = store.claim(limit=20, lease_seconds=30)
    second = store.claim(limit=20, lease_seconds=30)
    # the first relay's keys are held back by its leased rows; the third key is all there is
    assert by_pharmacy(second, pharmacies) == {
        pharmacies[0]: [],
        pharmacies[1]: [],
        pharmacies[2]: ids[pharmacies[2]][:20],
    }
    assert {ev.id for ev in first.events}.isdisjoint(ev.id for ev in second.events)


def test_a_relay_claims_the_next_rows_of_its_own_keys_while_it_publishes(engine):
    """``following``: the caller's own leased rows do not hold their keys back."""
    pharmacies = [new_opaque_id("pha") for _ in range(2)]
    ids = enqueue_round_robin(engine, pharmacies, 30)
    store = Store(engine)
    first = store.claim(limit=10, lease_seconds=30)
    assert by_pharmacy(first, pharmacies)[pharmacies[0]] == ids[pharmacies[0]][:10]
    ahead = store.claim(limit=20, lease_seconds=30, following=first.token)
    # keys by the age of their oldest claimable row: the untouched key first, then ours
    assert by_pharmacy(ahead, pharmacies) == {
        pharmacies[0]: ids[pharmacies[0]][10:20],
        pharmacies[1]: ids[pharmacies[1]][:10],
    }
    assert ahead.token != first.token
    assert {ev.lease_token for ev in ahead.events} == {ahead.token}


def test_a_single_busy_key_fills_the_whole_claim(engine):
    pharmacy = new_opaque_id("pha")
    ids = enqueue_round_robin(engine, [pharmacy], 50)
    claim = Store(engine).claim(limit=30, lease_seconds=30)
    assert [ev.id for ev in claim.events] == ids[pharmacy][:30]


def test_with_many_keys_a_claim_takes_the_oldest_rows(engine):
    pharmacies = [new_opaque_id("pha") for _ in range(40)]
    ids = enqueue_round_robin(engine, pharmacies, 1)
    claim = Store(engine).claim(limit=25, lease_seconds=30)
    oldest = sorted(i for p in pharmacies for i in ids[p])[:25]
    assert [ev.id for ev in claim.events] == oldest


def test_a_claim_shorter_than_its_limit_took_every_claimable_row(engine):
    pharmacies = [new_opaque_id("pha") for _ in range(4)]
    enqueue_round_robin(engine, pharmacies, 30)
    store = Store(engine)
    claim = store.claim(limit=500, lease_seconds=30)
    assert len(claim.events) == 120
    assert store.claim(limit=500, lease_seconds=30).events == []
    with engine.connect() as conn:
        left = conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.status == "pending")
        ).scalar_one()
    assert left == 0


def _plan(engine, store):
    """The claim's plan as the claim runs it (in its transaction, after its lock)."""
    statement = store._statement("claim", store._build_claim)
    compiled = statement.compile(dialect=engine.dialect)
    params = {
        "limit": 100,
        "view": 400,
        "per_key": 10,
        "token": "t",
        "following": "",
        **store._clock_params(30),
    }
    values = {k: params.get(k, v) for k, v in compiled.params.items()}
    with engine.begin() as conn:
        if store.is_postgres:
            conn.execute(_claim_lock())
            cursor = conn.connection.driver_connection.cursor()
            cursor.execute("EXPLAIN (COSTS OFF) " + compiled.string, values)
            return "\n".join(row[0] for row in cursor.fetchall())
        args = [values[name] for name in compiled.positiontup]
        args = [a.strftime("%Y-%m-%d %H:%M:%S.%f") if hasattr(a, "strftime") else a for a in args]
        cursor = conn.connection.driver_connection.execute(
            "EXPLAIN QUERY PLAN " + compiled.string, args
        )
        return "\n".join(str(row[3]) for row in cursor.fetchall())


def test_the_claim_walks_the_due_index_whatever_the_statistics_say(engine):
    """Statistics gathered on a near-empty table, then a burst: the claim must still walk the
    due index in id order and stop early, not fetch and sort every pending row."""
    store = Store(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    enqueue_round_robin(engine, [new_opaque_id("pha") for _ in range(8)], 100)
    plan = _plan(engine, store)
    if store.is_postgres:
        assert f"Index Scan using {IX_DUE} on outbox_events" in plan, plan
        assert "Bitmap Heap Scan on outbox_events\n" not in plan + "\n", plan
        assert "JIT" not in plan
        assert CLAIM_PLANNER_OFF == ("enable_seqscan", "enable_bitmapscan", "enable_sort", "jit")
    else:
        assert f"SCAN outbox_events USING INDEX {IX_DUE}" in plan, plan
