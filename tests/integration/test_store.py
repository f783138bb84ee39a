"""Which rows a claim takes, and how it finds them, on real SQLite and PostgreSQL."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from outbox import new_opaque_id
from outbox.models import IX_DUE, IX_KEY_OPEN, IX_LEASED, IX_WAITING, events
from outbox.store import (
    CLAIM_SCAN_FACTOR,
    CLAIM_VIEW_FACTOR,
    Store,
    _claim_lock,
    create_engine,
    new_claimer_id,
)
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


def keys_of(claim):
    return {ev.ordering_key for ev in claim.events}


def test_relays_at_work_share_the_keys_fairly(engine):
    """16 busy keys, two relays: the first takes 10 keys (rounds of 10 rows, limit 100), the
    second the 6 left; from then on each claims no more than half of the keys, and the keys the
    first lets go end up with the second: 8 and 8. A claim cut by the share says ``more``."""
    pharmacies = [new_opaque_id("pha") for _ in range(16)]
    enqueue_round_robin(engine, pharmacies, 40)
    store = Store(engine)
    a, b = new_claimer_id(), new_claimer_id()
    a1 = store.claim(limit=100, lease_seconds=30, claimer=a)
    b1 = store.claim(limit=100, lease_seconds=30, claimer=b)
    assert (len(keys_of(a1)), len(keys_of(b1))) == (10, 6)
    assert len(a1.events) == len(b1.events) == 100 and a1.more and b1.more
    a2 = store.claim(limit=100, lease_seconds=30, claimer=a, following=a1.token)
    assert len(keys_of(a2)) == 8 and keys_of(a2) < keys_of(a1)  # its share: 16 keys / 2
    assert len(a2.events) == 100 and a2.more
    store.mark_sent(a1.events, erase_phi_now=True)
    store.mark_sent(b1.events, erase_phi_now=True)
    b2 = store.claim(limit=100, lease_seconds=30, claimer=b)
    assert keys_of(b2) == keys_of(b1) | (keys_of(a1) - keys_of(a2))
    assert len(keys_of(b2)) == 8
    assert {ev.lease_token[:8] for ev in a2.events} == {a}
    assert {ev.lease_token[:8] for ev in b2.events} == {b}


def test_a_lone_relay_takes_every_key_it_can(engine):
    """No other relay holds a lease: the fair share is every key (rounds and the limit only)."""
    pharmacies = [new_opaque_id("pha") for _ in range(6)]
    enqueue_round_robin(engine, pharmacies, 40)
    store = Store(engine)
    claimer = new_claimer_id()
    first = store.claim(limit=100, lease_seconds=30, claimer=claimer)
    ahead = store.claim(limit=100, lease_seconds=30, claimer=claimer, following=first.token)
    assert len(keys_of(first)) == len(keys_of(ahead)) == 6
    assert len(first.events) == len(ahead.events) == 100


def test_a_claim_cut_by_its_share_alone_says_more_rows_are_left(engine):
    pharmacies = [new_opaque_id("pha") for _ in range(4)]
    enqueue_round_robin(engine, pharmacies, 2)
    store = Store(engine)
    other = store.claim(limit=2, lease_seconds=30)  # another relay holds one key
    assert len(keys_of(other)) == 1
    mine = store.claim(limit=100, lease_seconds=30)
    # 3 keys with work here + 1 busy elsewhere, 2 relays: a share of 2 keys, 4 rows
    assert len(keys_of(mine)) == 2 and len(mine.events) == 4
    assert mine.more  # fewer rows than the limit, yet not everything: not caught up


def test_a_claimer_id_must_be_what_new_claimer_id_makes(engine):
    with pytest.raises(ValueError, match="hex digits"):
        Store(engine).claim(limit=10, lease_seconds=30, claimer="relay-1")


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
    assert len(claim.events) == 120 and not claim.more
    assert store.claim(limit=500, lease_seconds=30).events == []
    with engine.connect() as conn:
        left = conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.status == "pending")
        ).scalar_one()
    assert left == 0


def _plan(engine, store, *, analyze=False, generic=False):
    """The claim's plan as the claim runs it (in its transaction, after its lock), with a
    relay's previous claim still leased (``following``). SQLite plans each statement once
    anyway: ``generic`` changes nothing there."""
    claimer = new_claimer_id()
    previous = store.claim(limit=100, lease_seconds=30, claimer=claimer)
    if not store.is_postgres:
        # The very statements and parameters a claim runs, captured, then explained.
        captured = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            if statement.lstrip().startswith(("WITH", "UPDATE")):
                captured.append((statement, parameters))

        sa.event.listen(engine, "before_cursor_execute", capture)
        try:
            store.claim(limit=100, lease_seconds=30, claimer=claimer, following=previous.token)
        finally:
            sa.event.remove(engine, "before_cursor_execute", capture)
        assert len(captured) == 2  # choose, then lease
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            return "\n".join(
                str(row[3])
                for statement, parameters in captured
                for row in raw.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            )
    return _explain_claim(
        engine,
        store,
        limit=100,
        claimer=claimer,
        following=previous.token,
        analyze=analyze,
        generic=generic,
    )


@pytest.mark.parametrize("statistics", ["of a near-empty table", "of the backlog"])
def test_the_claim_walks_its_indexes_whatever_the_statistics_say(engine, statistics):
    """An outbox table's statistics are wrong most of the time. Whatever they say, every part
    of the claim walks its own index and stops early: the due index for the oldest rows, the
    lease index for leased rows, the due-time index for rows waiting for a retry, the primary
    key for the update. None of them may read the backlog (here 1,600 rows). On PostgreSQL the
    plan explained is the generic one every claim runs (see _claim_lock)."""
    store = Store(engine)
    pharmacies = [new_opaque_id("pha") for _ in range(8)]
    enqueue_round_robin(engine, pharmacies[:1], 2)
    store.mark_sent(store.claim(limit=10, lease_seconds=30).events, erase_phi_now=True)
    if statistics == "of a near-empty table":
        _analyze(engine)
    enqueue_round_robin(engine, pharmacies, 200)
    if statistics == "of the backlog":
        _analyze(engine)
    plan = _plan(engine, store, analyze=True, generic=True)
    if store.is_postgres:
        for index, alias in [
            (IX_DUE, "due"),  # the oldest claimable rows
            (IX_LEASED, "holding"),
            (IX_LEASED, "leased"),
            (IX_WAITING, "waiting"),
        ]:
            assert f"Index Scan using {index} on outbox_events {alias} " in plan, plan
        # the chosen rows are locked, then leased, by primary key
        assert len(re.findall(r"Index Scan using pk_outbox_events on outbox_events", plan)) == 2
        # the skip from key to key (when every key in front is held) walks the key index
        assert re.search(
            rf"Index (Only )?Scan using {IX_KEY_OPEN} on outbox_events key_walk ", plan
        )
        assert f"Index Scan using {IX_KEY_OPEN} on outbox_events key_rows " in plan, plan
        assert "Seq Scan" not in plan and "Bitmap" not in plan and "JIT" not in plan, plan
        removed = [int(n) for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", plan)]
        assert max(removed, default=0) <= 200, plan  # a relay's own leased rows at most
    else:
        for expected in [
            f"SCAN due USING INDEX {IX_DUE}",
            f"SCAN holding USING INDEX {IX_LEASED}",
            f"SCAN leased USING INDEX {IX_LEASED}",
            f"SEARCH waiting USING INDEX {IX_WAITING} (available_at>?)",
            "SEARCH outbox_events USING INTEGER PRIMARY KEY (rowid=?)",
            "CO-ROUTINE front",  # read as consumed, not materialized whole
            f"SEARCH key_walk USING INDEX {IX_KEY_OPEN} (ordering_key>?)",
            f"SEARCH key_rows USING INDEX {IX_KEY_OPEN} (ordering_key>? AND ordering_key<?)",
        ]:
            assert expected in plan, plan


@pytest.mark.postgres
def test_a_relays_claims_are_planned_once_per_connection(postgres_database_url):
    """Planning the claim cost PostgreSQL about a millisecond per claim (10 us per row of a
    claim of 100), every claim: once psycopg has prepared the statement (its fifth run on a
    connection), the claim runs one generic plan (the claim lock forces it; the planner
    settings pin its shape whatever the parameters). SQLite plans a statement once anyway."""
    engine = create_engine(postgres_database_url, pool_size=1, max_overflow=0)
    try:
        store = Store(engine)
        enqueue_round_robin(engine, [new_opaque_id("pha") for _ in range(4)], 20)
        claimer = new_claimer_id()
        for _ in range(8):
            claim = store.claim(limit=5, lease_seconds=30, claimer=claimer)
            assert len(claim.events) == 5
            store.mark_sent(claim.events, erase_phi_now=True)
        with engine.connect() as conn:  # the one connection every claim ran on
            rows = conn.execute(
                sa.text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE :claim"
                ),
                {"claim": "%pg_advisory%"},
            ).all()
            claims = conn.execute(
                sa.text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE :with AND statement LIKE :update"
                ),
                {"with": "WITH%", "update": "%UPDATE outbox_events%"},
            ).all()
    finally:
        engine.dispose()
    assert rows, "the claim lock statement was prepared"
    assert len(claims) == 1, claims
    generic_plans, custom_plans = claims[0]
    assert generic_plans >= 3 and custom_plans == 0, claims


def _analyze(engine):
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(
            "VACUUM ANALYZE outbox_events" if conn.dialect.name == "postgresql" else "ANALYZE"
        )


def test_a_busy_key_held_by_one_relay_never_holds_another_keys_rows_up(engine):
    """A hot key's backlog in front of the queue, leased by one relay: another relay's claim
    passes over it and takes the rows of the other key behind it, at once."""
    store = Store(engine)
    hot, quiet = new_opaque_id("pha"), new_opaque_id("pha")
    front = enqueue_round_robin(engine, [hot], 300)[hot]
    behind = enqueue_round_robin(engine, [quiet], 3)[quiet]
    holder = store.claim(limit=5, lease_seconds=30, claimer=new_claimer_id())
    assert [ev.id for ev in holder.events] == front[:5]
    other = store.claim(limit=5, lease_seconds=30, claimer=new_claimer_id())
    assert [ev.id for ev in other.events] == behind
    again = store.claim(limit=5, lease_seconds=30, claimer=new_claimer_id())
    assert (again.events, again.more, again.contended) == ([], False, False)
    if store.is_postgres:
        # and it found them without reading the hot key's rows: the walk stopped at the front
        # (CLAIM_SCAN_FACTOR x limit rows), then skipped from key to key
        plan = _explain_claim(engine, store, limit=5)
        due = re.search(rf"Index Scan using {IX_DUE} on outbox_events due .*rows=(\d+) ", plan)
        assert due is not None and int(due.group(1)) <= 5 * CLAIM_SCAN_FACTOR, plan
        assert re.search(r"Scan using \S+ on outbox_events key_walk \(actual [^)]*\)", plan), plan


def _explain_claim(
    engine, store, *, limit, claimer=None, following="", analyze=True, generic=False
):
    """EXPLAIN of the claim statement as a claim runs it: in its transaction, after its lock.

    ``generic``: the plan a relay runs from its second claim on: the statement prepared once
    per connection and planned once for any parameters (the claim lock forces generic plans),
    explained with ``PREPARE`` and ``EXPLAIN EXECUTE``."""
    claimer = claimer or new_claimer_id()
    params = {
        "limit": limit,
        "view": limit * CLAIM_VIEW_FACTOR,
        "scan": limit * CLAIM_SCAN_FACTOR,
        "per_key": 10,
        "token": claimer + "-0000-4000-8000-000000000000",
        "following": following,
        "claimer": claimer,
        **store._clock_params(30),
    }
    compiled = store._build_claim().compile(dialect=engine.dialect)
    values = {k: params.get(k, v) for k, v in compiled.params.items()}
    how = "(ANALYZE, COSTS OFF)" if analyze else "(COSTS OFF)"
    with engine.begin() as conn:
        conn.execute(_claim_lock())
        cursor = conn.connection.driver_connection.cursor()
        if generic:
            names: list[str] = []

            def placeholder(match):
                names.append(match.group(1))
                return f"${len(names)}"

            text = re.sub(r"%\((\w+)\)s", placeholder, compiled.string)
            cursor.execute("PREPARE explained_claim AS " + text)
            arguments = sql.SQL(", ").join(sql.Literal(values[name]) for name in names)
            cursor.execute(
                sql.SQL("EXPLAIN {} EXECUTE explained_claim({})").format(sql.SQL(how), arguments)
            )
        else:
            cursor.execute(f"EXPLAIN {how} " + compiled.string, values)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        if generic:
            cursor.execute("DEALLOCATE explained_claim")
        conn.rollback()
    return plan


def test_rows_behind_a_retry_never_hold_other_keys_up(engine):
    """A key waiting minutes for a retry, with a long backlog behind its failed row: the walk
    passes over that backlog, so the other keys' rows are claimed now, not after the retry."""
    from outbox.store import Failure

    store = Store(engine)
    failing, healthy = new_opaque_id("pha"), new_opaque_id("pha")
    limit = 5
    [head] = enqueue_round_robin(engine, [failing], 1)[failing]
    failed = store.claim(limit=limit, lease_seconds=30).events
    assert [ev.id for ev in failed] == [head]
    store.record_failures([Failure(failed[0], "HTTP 503 from Pusher: server error", 300.0, 503)])
    stuck = enqueue_round_robin(engine, [failing], 300)[failing]
    behind = enqueue_round_robin(engine, [healthy], 3)[healthy]
    claim = store.claim(limit=limit, lease_seconds=30)
    assert [ev.id for ev in claim.events] == behind
    assert not claim.contended
    # the failing key's rows stay where they are, behind their waiting head
    with engine.connect() as conn:
        statuses = dict(
            conn.execute(
                sa.select(events.c.id, events.c.status).where(events.c.id.in_([head, *stuck]))
            ).all()
        )
    assert set(statuses[i] for i in stuck) == {"pending"} and statuses[head] == "pending"


def test_a_claimed_row_maps_every_column_to_its_own_field(engine):
    """Every column distinct, so no two fields could be swapped unnoticed (the claim builds its
    events by position)."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    values = {
        "event_id": "evt_mapping",
        "type_name": "type.mapping",
        "channel": "private-mapping-channel",
        "event_name": "mapping-event",
        "ordering_key": "mapping-key",
        "seq": 1,
        "data": '{"id": "evt_mapping"}',
        "data_bytes": 21,
        "encrypted": False,
        "contains_phi": True,
        "exclude_socket_id": "123.456",
        "status": "pending",
        "attempts": 3,
        "created_at": now - dt.timedelta(minutes=5),
        "available_at": now - dt.timedelta(minutes=1),
        "expires_at": now + dt.timedelta(hours=2),
        "attempt_log": '[{"error": "earlier"}]',
    }
    with engine.begin() as conn:
        row_id = conn.execute(sa.insert(events).values(**values).returning(events.c.id)).scalar()
    claim = Store(engine).claim(limit=10, lease_seconds=30)
    [ev] = claim.events
    assert (ev.id, ev.lease_token, ev.overdue) == (row_id, claim.token, False)
    expected = {**values, "attempts": values["attempts"] + 1}  # a claim counts an attempt
    for name, value in expected.items():
        if hasattr(ev, name):
            assert getattr(ev, name) == value, name
