"""Every SQL statement that inserts, claims, leases, marks, erases and purges outbox rows.

Written with SQLAlchemy Core. Dialect differences live here and nowhere else:

* PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` and takes every timestamp from the database
  clock (``now()``), so workers on hosts with skewed clocks agree.
* SQLite (the embedded default) has a single writer: the relay's engine runs every transaction
  as ``BEGIN IMMEDIATE`` in WAL mode with a busy timeout, so several relay processes serialize
  their short claim transactions instead of failing with "database is locked". Its clock is the
  host's clock, which is the database's clock for an embedded database.

Claims only set a lease (token and expiry); Pusher is called outside any transaction; every final
write checks the row id *and* the lease token, so a worker whose lease was taken over cannot
overwrite the new owner's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import re
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.selectable import Alias

from outbox.models import (
    IX_DUE,
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    Status,
    UTCDateTime,
    audit,
    channel_sequences,
    events,
    workers,
)

ATTEMPT_LOG_LIMIT = 20
# A claim looks at this many times ``limit`` of the oldest claimable rows to choose from, and
# takes rows in rounds of ``CLAIM_ROUND_ROWS`` per key (one full publish request of 10 events).
CLAIM_VIEW_FACTOR = 4
CLAIM_ROUND_ROWS = 10
# ... among at most this many times ``limit`` of the oldest due rows (the front of the queue).
# When every key there is held (one hot key's backlog leased by another relay, say), the claim
# skips from key to key on the key index to find the free keys behind, instead of reading the
# held keys' rows: its cost is bounded by the front and the number of keys with open rows, not
# by the backlog.
CLAIM_SCAN_FACTOR = 32
# A relay's id: the first hex digits of its lease tokens (claims count the relays at work).
CLAIMER_ID_LENGTH = 8
_HEX = re.compile(r"[0-9a-f]+")


def new_claimer_id() -> str:
    """A random claimer id for one relay (see :meth:`Store.claim`)."""
    return secrets.token_hex(CLAIMER_ID_LENGTH // 2)


LATENCY_SAMPLE_LIMIT = 20_000
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_engine(database_url: str, **kwargs: Any) -> Engine:
    """An engine configured for the relay: WAL, busy timeout and ``BEGIN IMMEDIATE`` on SQLite.

    Create one per process (after fork); never share an engine across a fork.
    """
    if database_url.startswith("sqlite"):
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_SECONDS)
        connect_args.setdefault("check_same_thread", False)
        engine = sa.create_engine(database_url, connect_args=connect_args, **kwargs)
        configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(database_url, **kwargs)


def configure_sqlite(engine: Engine) -> None:
    """WAL journal, busy timeout and immediate (write-locking) transactions for ``engine``."""

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front; readers (stats, dashboards) never block writers.
        if conn.get_execution_options().get(READ_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


READ_ONLY_OPTION = "outbox_read_only"


@contextlib.contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: a deferred transaction on SQLite (no write lock)."""
    with engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY_OPTION: True})


def _is(column: sa.ColumnElement[Any], status: Status) -> sa.ColumnElement[bool]:
    """``status = 'literal'``: a literal, not a bound parameter, so that the partial indexes
    (whose predicates name the statuses) can serve the query on PostgreSQL and SQLite."""
    return column == sa.literal_column(f"'{status.value}'")


def _in(column: sa.ColumnElement[Any], statuses: Iterable[str]) -> sa.ColumnElement[bool]:
    """``status IN ('a', 'b')`` with literals (see :func:`_is`)."""
    values = [Status(value) for value in statuses]
    return column.in_([sa.literal_column(f"'{value.value}'") for value in values])


def now_expr(dialect_name: str, offset_seconds: float = 0.0) -> sa.ColumnElement[Any]:
    """The database clock (PostgreSQL) or the host clock (SQLite), plus an offset, as SQL."""
    if dialect_name == "postgresql":
        expr: sa.ColumnElement[Any] = sa.func.clock_timestamp()
        if offset_seconds:
            expr = expr + sa.literal(dt.timedelta(seconds=offset_seconds), sa.Interval())
        return expr
    return sa.literal(utcnow() + dt.timedelta(seconds=offset_seconds), UTCDateTime())


def clock(dialect_name: str, offset: str | None = None) -> sa.ColumnElement[Any]:
    """A time in a statement built once and run many times.

    PostgreSQL reads its own clock when the statement starts (``statement_timestamp()``: stable,
    so a comparison with it can be an index range, which ``clock_timestamp()`` cannot), plus
    the ``offset`` parameter in seconds; SQLite takes the host time bound at execution as the
    ``now`` (or ``offset``) parameter. :func:`clock_params` gives the values.
    """
    if dialect_name != "postgresql":
        return sa.bindparam(offset or "now", type_=UTCDateTime())
    expr: sa.ColumnElement[Any] = sa.func.statement_timestamp()
    if offset:
        seconds = sa.bindparam(offset, type_=sa.Float())
        expr = expr + seconds * sa.literal_column("interval '1 second'")
    return expr


def clock_params(dialect_name: str, **offsets: float) -> dict[str, Any]:
    """The parameters of :func:`clock` expressions: offsets in seconds by name."""
    if dialect_name == "postgresql":
        return dict(offsets)
    now = utcnow()
    params: dict[str, Any] = {name: now + dt.timedelta(seconds=s) for name, s in offsets.items()}
    params["now"] = now
    return params


@dataclass(frozen=True)
class Inserted:
    """The row an enqueue wrote, or found by its deduplication key."""

    id: int
    event_id: str
    created: bool


def _dialect_insert(conn: Connection, table: sa.Table) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


# The hot statements (enqueue, claim, lease-guarded writes), built once per shape: building a
# statement and its cache key cost more Python time than the database took to run it. Keys name
# the statement and everything its shape depends on, the dialect always included.
_STATEMENTS: dict[tuple[Any, ...], Any] = {}


def _cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    statement = _STATEMENTS.get(key)
    if statement is None:
        statement = _STATEMENTS[key] = build()
    return statement


def _next_sequence(conn: Connection, channel: str) -> int:
    """Take the channel's next sequence number, locking its counter until commit.

    The lock serializes concurrent producers of one channel, so numbers follow commit order; a
    rolled-back transaction gives its number back, so there are no gaps.
    """
    s = channel_sequences
    statement = _cached(
        ("next_seq", conn.dialect.name),
        lambda: (
            _dialect_insert(conn, s)
            .values(channel=sa.bindparam("channel", type_=sa.String()), last_seq=1)
            .on_conflict_do_update(
                index_elements=[s.c.channel], set_={"last_seq": s.c.last_seq + 1}
            )
            .returning(s.c.last_seq)
        ),
    )
    return int(conn.execute(statement, {"channel": channel}).scalar_one())


def _give_back_sequence(conn: Connection, channel: str) -> None:
    s = channel_sequences
    conn.execute(sa.update(s).where(s.c.channel == channel).values(last_seq=s.c.last_seq - 1))


def insert_event(
    conn: Connection,
    values: Mapping[str, Any],
    *,
    ttl_seconds: float | None,
    render: Callable[[int], str],
) -> Inserted:
    """Insert one outbox row in the caller's transaction; never commits.

    ``render(seq)`` returns the data text for the channel sequence number taken here. With a
    ``dedup_key``, an earlier or concurrent row with the same key wins and is returned
    (``created=False``): ``INSERT … ON CONFLICT DO NOTHING`` waits for a concurrent transaction
    holding the key, so two transactions racing on one key end with one row (and the loser gives
    its sequence number back).
    """
    e = events
    dialect = conn.dialect.name
    row = dict(values)
    dedup_key = row.get("dedup_key")
    if dedup_key is not None:
        existing = conn.execute(
            sa.select(e.c.id, e.c.event_id).where(e.c.dedup_key == dedup_key)
        ).first()
        if existing is not None:
            return Inserted(int(existing.id), str(existing.event_id), False)
    channel = str(row["channel"])
    seq = _next_sequence(conn, channel)
    row["seq"] = seq
    row["data"] = render(seq)
    row["status"] = Status.PENDING.value
    row["attempts"] = 0
    columns = tuple(sorted(row))
    with_ttl = ttl_seconds is not None
    deduplicated = dedup_key is not None

    def build() -> Any:
        now = clock(dialect)
        insert = _dialect_insert(conn, e).values(
            **{name: sa.bindparam(name, type_=e.c[name].type) for name in columns},
            created_at=now,
            available_at=now,
            expires_at=clock(dialect, "ttl_seconds") if with_ttl else None,
        )
        if deduplicated:
            return insert.on_conflict_do_nothing(
                index_elements=[e.c.dedup_key], index_where=e.c.dedup_key.is_not(None)
            ).returning(e.c.id, e.c.event_id)
        return insert.returning(e.c.id, e.c.event_id)

    statement = _cached(("insert", dialect, columns, with_ttl, deduplicated), build)
    offsets: dict[str, float] = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
    params = {**row, **clock_params(dialect, **offsets)}
    created = conn.execute(statement, params).first()
    if created is not None:
        return Inserted(int(created.id), str(created.event_id), True)
    _give_back_sequence(conn, channel)
    existing = conn.execute(sa.select(e.c.id, e.c.event_id).where(e.c.dedup_key == dedup_key)).one()
    return Inserted(int(existing.id), str(existing.event_id), False)


def insert_audit(conn: Connection, **values: Any) -> None:
    """Record one authorization decision (no PHI: opaque references and channel names only)."""
    conn.execute(sa.insert(audit).values(at=now_expr(conn.dialect.name), **values))


def list_audit(
    engine: Engine,
    *,
    decision: str | None = None,
    channel_prefix: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Authorization decisions, newest first."""
    query = sa.select(audit).order_by(audit.c.id.desc()).limit(limit).offset(offset)
    if decision is not None:
        query = query.where(audit.c.decision == decision)
    if channel_prefix is not None:
        query = query.where(audit.c.channel.startswith(channel_prefix, autoescape=True))
    if since is not None:
        query = query.where(audit.c.at >= since)
    with read_connection(engine) as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


@dataclass(frozen=True)
class ClaimedEvent:
    """A row leased by one relay. ``data`` is the exact JSON text to send (plaintext)."""

    id: int
    event_id: str
    type_name: str
    channel: str
    event_name: str
    ordering_key: str
    data: str | None
    encrypted: bool
    contains_phi: bool
    exclude_socket_id: str | None
    attempts: int
    created_at: dt.datetime
    expires_at: dt.datetime | None
    lease_token: str
    attempt_log: str | None
    overdue: bool = False  # past its time-to-live by the database clock when it was claimed


# The columns a claim returns, in the order of ClaimedEvent's fields (lease_token, the claim's
# own, is not a column read back; overdue is computed): see _claimed_event.
_CLAIMED_COLUMNS = (
    events.c.id,
    events.c.event_id,
    events.c.type_name,
    events.c.channel,
    events.c.event_name,
    events.c.ordering_key,
    events.c.data,
    events.c.encrypted,
    events.c.contains_phi,
    events.c.exclude_socket_id,
    events.c.attempts,
    events.c.created_at,
    events.c.expires_at,
    events.c.attempt_log,
)
# The layout _claimed_event unpacks: the columns, the claim's token before attempt_log, then
# overdue. Checked at import, so that a column or field added, moved or renamed cannot shift
# values into the wrong fields unnoticed.
_CLAIMED_LAYOUT = [c.name for c in _CLAIMED_COLUMNS]
_CLAIMED_LAYOUT.insert(13, "lease_token")
_CLAIMED_LAYOUT.append("overdue")
_CLAIMED_FIELDS = [f.name for f in dataclasses.fields(ClaimedEvent)]
if len(_CLAIMED_COLUMNS) != 14 or _CLAIMED_FIELDS != _CLAIMED_LAYOUT:
    raise RuntimeError("_CLAIMED_COLUMNS and _claimed_event must follow ClaimedEvent's fields")


def _claimed_event(row: Sequence[Any], token: str) -> ClaimedEvent:
    """A claimed row (``_CLAIMED_COLUMNS``, then ``overdue``) as an event, by position: a
    claim builds thousands of these a second, and reading a row's values by name cost a third
    of the claim's own CPU."""
    (
        id_,
        event_id,
        type_name,
        channel,
        event_name,
        ordering_key,
        data,
        encrypted,
        contains_phi,
        exclude_socket_id,
        attempts,
        created_at,
        expires_at,
        attempt_log,
        overdue,
    ) = row[:15]
    return ClaimedEvent(
        id_,
        event_id,
        type_name,
        channel,
        event_name,
        ordering_key,
        data,
        encrypted,
        contains_phi,
        exclude_socket_id,
        attempts,
        created_at,
        expires_at,
        token,
        attempt_log,
        bool(overdue),
    )


@dataclass(frozen=True)
class ClaimResult:
    """What one claim leased. ``contended``: due rows were passed over because a concurrent
    transaction held them (PostgreSQL); claiming again in a moment may find them. ``more``:
    claimable rows were left for the next claim."""

    events: list[ClaimedEvent]
    contended: bool = False
    token: str = ""  # the lease token of these rows
    more: bool = False  # claimable rows were left (the limit, or the claimer's fair share)


@dataclass(frozen=True)
class Failure:
    """The outcome of a failed publish for one claimed row."""

    event: ClaimedEvent
    reason: str
    retry_in_seconds: float | None  # None: dead letter; else due again after this delay
    status_code: int | None = None


def _append_log(log: str | None, entry: Mapping[str, Any]) -> str:
    entries: list[Any] = []
    if log:
        try:
            loaded = json.loads(log)
            if isinstance(loaded, list):
                entries = loaded
        except ValueError:
            entries = []
    entries.append(dict(entry))
    return json.dumps(entries[-ATTEMPT_LOG_LIMIT:], separators=(",", ":"))


class Store:
    """The outbox table, seen from the relay and the operator tools."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"

    # --- time ----------------------------------------------------------------------------

    def _now(self, offset_seconds: float = 0.0) -> sa.ColumnElement[Any]:
        return now_expr(self.engine.dialect.name, offset_seconds)

    def _clock(self, offset: str | None = None) -> sa.ColumnElement[Any]:
        return clock(self.engine.dialect.name, offset)

    def _clock_params(self, lease_seconds: float = 0.0) -> dict[str, Any]:
        return clock_params(self.engine.dialect.name, lease_seconds=lease_seconds)

    def _statement(self, key: str, build: Callable[[], Any]) -> Any:
        """The statement ``key`` for this store's dialect, built once (see :func:`_cached`)."""
        return _cached((key, self.engine.dialect.name), build)

    def _read(self) -> contextlib.AbstractContextManager[Connection]:
        return read_connection(self.engine)

    def db_now(self, conn: Connection) -> dt.datetime:
        if self.is_postgres:
            value = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
            assert isinstance(value, dt.datetime)
            return value.astimezone(dt.UTC)
        return utcnow()

    # --- claim ---------------------------------------------------------------------------

    def claim(
        self,
        *,
        limit: int,
        lease_seconds: float,
        following: str | None = None,
        claimer: str | None = None,
        per_key: int = CLAIM_ROUND_ROWS,
    ) -> ClaimResult:
        """Lease up to ``limit`` due rows, keeping per-key order, oldest keys first.

        A row is claimable when it is pending and due, and no earlier row of its ordering key is
        leased, waiting for a retry, or (PostgreSQL) locked by a concurrent claimer. Rows past
        their time-to-live are claimed too; the relay marks them expired under the lease
        instead of publishing them.

        Which rows: the claim looks at the oldest claimable rows (``CLAIM_VIEW_FACTOR`` times
        ``limit``, walking the due index in id order) and takes them in
        rounds: each key's oldest ``per_key`` rows (one full publish request), keys in the order
        of their oldest row; then each key's next ``per_key`` rows, and so on up to ``limit``.
        A claim takes no more than its fair share of the keys: the keys with work (those it
        sees and those other relays hold) divided by the relays holding leases, itself
        included. Keys are the unit of parallelism (a key's rows are published by one relay at a
        time), so with many rows on few keys every relay gets its share, and as relays come and
        go the shares follow; with many keys a claim takes the oldest rows; a single busy key
        fills the whole claim. Every key's rows are taken oldest first and without gaps, so
        per-key order holds whatever the rounds pick.

        The walk reads at most ``CLAIM_SCAN_FACTOR`` times ``limit`` due rows (the front of the
        queue). When every key there is held (a hot key's backlog leased by another relay, say),
        the free keys behind are found by skipping from key to key on the key index, and each
        gives its oldest ``per_key`` rows: one busy key never holds another key's rows up, and a
        claim never reads the backlog (every key held, 100,000 pending rows: 5.7 ms on
        PostgreSQL, 2.4 ms on SQLite; it read them all before, 59 / 47 ms).

        ``more`` says that claimable rows were left (by the limit or the fair share); a claim
        that is neither ``more`` nor ``contended`` took every row it could.

        On PostgreSQL the chosen rows are locked with ``SKIP LOCKED``; when a row was skipped
        (another transaction holds it: claims themselves are serialized, so an operator's
        update or the sweep's expiry), the later rows of its key are left too, and the claim is
        ``contended``. Two claimers can hold each other's earlier rows for a moment and both come
        back empty; neither may conclude that nothing is due.

        ``following`` is the lease token of the caller's own previous claim, still being
        published: its rows do not hold their keys back, so the caller can claim the next rows of
        those keys while it publishes (it publishes them only after the earlier ones were sent,
        and releases them if an earlier one failed). The new rows get a lease of their own.
        ``claimer`` identifies the caller (:func:`new_claimer_id`, one per relay) in its lease
        tokens, so that claims can count the relays at work; without it the claim counts as a
        relay of its own.
        """
        if limit < 1 or per_key < 1:
            raise ValueError("a claim takes at least one row, at least one per key and round")
        claimer = claimer or new_claimer_id()
        if len(claimer) != CLAIMER_ID_LENGTH or not _HEX.fullmatch(claimer):
            raise ValueError(f"claimer must be {CLAIMER_ID_LENGTH} hex digits (new_claimer_id())")
        token = str(uuid.UUID(claimer + uuid.uuid4().hex[CLAIMER_ID_LENGTH:]))
        params = {
            "limit": limit,
            "view": limit * CLAIM_VIEW_FACTOR,
            "scan": limit * CLAIM_SCAN_FACTOR,
            "per_key": per_key,
            "token": token,
            "following": following or "",
            "claimer": claimer,
            **self._clock_params(lease_seconds),
        }
        rows: Sequence[Any]
        with self.engine.begin() as conn:
            if self.is_postgres:
                # One claimer at a time (as SQLite's BEGIN IMMEDIATE does), held to commit: a
                # claim then sees every earlier claim committed. Concurrent claimers used to lock
                # rows for each other (SKIP LOCKED) and hold locks on rows another relay was
                # marking sent, stalling it for the length of their scan.
                conn.execute(self._statement("claim lock", _claim_lock))
                fetched = conn.execute(self._statement("claim", self._build_claim), params).all()
                rows = [r for r in fetched if r.id is not None]
                seen, chosen = int(fetched[0].seen), int(fetched[0].chosen)
            else:
                # BEGIN IMMEDIATE holds the write lock: choosing, then leasing, is atomic.
                picked = conn.execute(self._statement("claim", self._build_claim), params).all()
                seen = int(picked[0].seen) if picked else 0
                ids = [r.id for r in picked]
                chosen = len(ids)
                rows = (
                    conn.execute(
                        self._statement("lease", self._build_lease), {**params, "ids": ids}
                    ).all()
                    if ids
                    else []
                )
        # Positional: a claim builds thousands of these a second (see _CLAIMED_COLUMNS).
        result = [_claimed_event(r, token) for r in rows]
        result.sort(key=lambda ev: ev.id)
        return ClaimResult(result, contended=len(rows) < chosen, token=token, more=seen > chosen)

    def _lease(self, ids: Any) -> Any:
        """``UPDATE … RETURNING`` that leases the rows ``ids`` (an ``ANY`` array on PostgreSQL,
        a list parameter on SQLite) names. They are locked (PostgreSQL), or this transaction is
        the only writer (SQLite)."""
        e = events
        where = e.c.id == ids if self.is_postgres else e.c.id.in_(ids)
        return (
            sa.update(e)
            .where(where)
            .values(
                status=Status.IN_FLIGHT.value,
                lease_token=sa.bindparam("token", type_=sa.String()),
                lease_expires_at=self._clock("lease_seconds"),
                attempts=e.c.attempts + 1,
            )
            .returning(
                *_CLAIMED_COLUMNS,
                sa.and_(e.c.expires_at.is_not(None), e.c.expires_at <= self._clock()).label(
                    "overdue"
                ),
            )
        )

    def _build_lease(self) -> Any:
        return self._lease(sa.bindparam("ids", expanding=True))

    def _id_in(self, name: str) -> sa.ColumnElement[bool]:
        """``id`` is one of the list bound as ``name``.

        On PostgreSQL ``id = ANY(:name)`` with one array parameter: the statement's text is the
        same whatever the list's length, so it is prepared once and planned once, and SQLAlchemy
        does not render one placeholder per id (an expanding ``IN`` did both for every batch:
        about a tenth of the relay's own CPU per event). SQLite has no arrays: expanding ``IN``.
        """
        if self.is_postgres:
            array = sa.ARRAY(sa.BigInteger())
            return events.c.id == sa.any_(sa.bindparam(name, type_=array))
        return events.c.id.in_(sa.bindparam(name, expanding=True))

    def _build_claim(self) -> Any:
        e = events
        now = self._clock()
        following = sa.bindparam("following", type_=sa.String())
        claimer = sa.bindparam("claimer", type_=sa.String())
        # Rows other relays hold (by the claimer id in their lease tokens): how many relays are
        # at work, and on how many keys.
        f = events.alias("leased")
        relay = sa.func.substr(f.c.lease_token, 1, CLAIMER_ID_LENGTH)
        others = (
            sa.select(f.c.ordering_key, relay.label("relay"))
            .where(_is(f.c.status, Status.IN_FLIGHT), relay != claimer)
            .order_by(f.c.lease_expires_at)  # see held: the ordered index walk is the plan
            .cte("others")
        )
        crowd = sa.select(
            (sa.func.count(others.c.relay.distinct()) + 1).label("relays"),
            sa.func.count(others.c.ordering_key.distinct()).label("busy_keys"),
        ).cte("crowd")
        # The rows that hold their key back: leased ones (except the caller's own previous
        # claim, see ``following``) and pending ones waiting for a retry. Both sets are small
        # and each has its own partial index, so finding them never reads the backlog.
        # Each is read in the order of its own index: the claim's transaction makes sorts the
        # last resort (see _claim_lock), so that order can only come from walking that index,
        # whatever the statistics say. (With statistics of a near-empty table, the planner
        # otherwise found waiting rows by reading every pending row through the due index.)
        g, w = events.alias("holding"), events.alias("waiting")
        holders = sa.union_all(
            sa.select(g.c.ordering_key, g.c.id)
            .where(_is(g.c.status, Status.IN_FLIGHT), g.c.lease_token != following)
            .order_by(g.c.lease_expires_at)
            .subquery("holding_rows")
            .select(),
            sa.select(w.c.ordering_key, w.c.id)
            .where(_is(w.c.status, Status.PENDING), w.c.available_at > now)
            .order_by(w.c.available_at)
            .subquery("waiting_rows")
            .select(),
        ).subquery("holders")
        held = (
            sa.select(
                holders.c.ordering_key.label("ordering_key"),
                sa.func.min(holders.c.id).label("first_id"),
            )
            .group_by(holders.c.ordering_key)
            .cte("held")
        )
        h = held.alias("held_key")
        # A row of a held key is claimable only when it is older than the key's first holder
        # (rows committed out of id order): NOT IN over the held keys is one hash probe per row,
        # and the correlated comparison runs only for rows of held keys.
        # (SQLite must be told which index: with statistics gathered while most rows were
        # pending it scans the table in rowid order instead, from its oldest sent row.)
        d = _DueIndexed._construct(events, name="due")
        free = sa.or_(
            d.c.ordering_key.not_in(sa.select(held.c.ordering_key)),
            d.c.id
            < sa.select(h.c.first_id).where(h.c.ordering_key == d.c.ordering_key).scalar_subquery(),
        )
        scan = sa.bindparam("scan", type_=sa.Integer())
        view = sa.bindparam("view", type_=sa.Integer())
        per_key = sa.bindparam("per_key", type_=sa.Integer())
        # The front of the queue: the oldest due rows, at most ``scan`` of them (see
        # CLAIM_SCAN_FACTOR), each marked free or held. The walk stops there, whatever is held.
        front = (
            sa.select(d.c.id, d.c.ordering_key, sa.case((free, 1), else_=0).label("free"))
            .where(_is(d.c.status, Status.PENDING), d.c.available_at <= now)
            .order_by(d.c.id)
            .limit(scan)
            .cte("front")
        )
        # SQLite (3.35+) would otherwise materialize all of it (it is read twice) before the
        # first free row is taken; PostgreSQL reads a CTE as it is consumed anyway.
        if not self.is_postgres and sqlite3.sqlite_version_info >= (3, 35):
            front = front.prefix_with("NOT MATERIALIZED")
        # The first ``view`` free rows of the front. No ORDER BY: the front is produced in id
        # order and read as produced, so reading stops at the ``view``-th free row (a sort
        # would read the whole front first); the rows are ordered by id where it matters, below.
        nearby = (
            sa.select(front.c.id, front.c.ordering_key)
            .where(front.c.free == 1)
            .limit(view)
            .cte("nearby")
        )
        # When the front is full and holds fewer than ``view`` free rows, every key there is
        # held (one hot key's backlog, say): the free keys behind it are found by skipping from
        # key to key on the key index (one index probe per key with open rows), not by reading
        # the held keys' rows. Otherwise the skip never starts.
        # (A CASE, so that the front is counted to its end only when the free rows found there
        # fall short: both databases evaluate these subqueries when first needed.)
        crowded = sa.case(
            (sa.select(sa.func.count()).select_from(nearby).scalar_subquery() >= view, sa.false()),
            else_=sa.select(sa.func.count()).select_from(front).scalar_subquery() >= scan,
        )

        def next_key(after: Any | None) -> Any:
            k = events.alias("key_walk")
            query = sa.select(k.c.ordering_key).where(_in(k.c.status, OPEN_STATUSES))
            if after is not None:
                query = query.where(k.c.ordering_key > after)
            return query.order_by(k.c.ordering_key).limit(1).scalar_subquery()

        keys = sa.select(next_key(None).label("key")).where(crowded).cte("keys", recursive=True)
        keys = keys.union_all(sa.select(next_key(keys.c.key)).where(keys.c.key.is_not(None)))
        # Each free key's oldest open rows, one request's worth, from the key index (open, not
        # pending: only that index can serve it, where the due index would walk the rows in
        # front again), then its pending ones (a free key has no row waiting for a retry, so all
        # of them are due; its open rows that are not pending are the caller's own, see
        # ``following``). A LATERAL subquery per key on PostgreSQL; on SQLite a correlated IN
        # on the rowid, the keys driving.
        r = events.alias("key_rows")
        firsts_of_key = (
            sa.select(r.c.id, r.c.ordering_key, r.c.status)
            # "between the key and itself" rather than "=": an equality would let the planner
            # take the rows in id order from any id index, walking every key's rows.
            .where(
                r.c.ordering_key >= keys.c.key,
                r.c.ordering_key <= keys.c.key,
                _in(r.c.status, OPEN_STATUSES),
            )
            .order_by(r.c.ordering_key, r.c.id)  # the key index's own order
            .limit(per_key)
        )
        rows: Any
        if self.is_postgres:
            rows = firsts_of_key.lateral("key_first_rows")
            found = keys.join(rows, sa.true())
        else:
            rows = events.alias("key_first_rows")
            found = keys.join(rows, rows.c.id.in_(firsts_of_key.with_only_columns(r.c.id)))
        behind = (
            sa.select(rows.c.id, rows.c.ordering_key)
            .select_from(found)
            .where(
                keys.c.key.is_not(None),
                keys.c.key.not_in(sa.select(held.c.ordering_key)),
                _is(rows.c.status, Status.PENDING),
            )
            .order_by(rows.c.id)
            .limit(view)
            .subquery("behind")
        )
        seen = sa.union_all(
            sa.select(nearby.c.id, nearby.c.ordering_key).where(~crowded),
            sa.select(behind.c.id, behind.c.ordering_key),
        ).cte("oldest")
        place = sa.func.row_number().over(partition_by=seen.c.ordering_key, order_by=seen.c.id)
        # integer division on both databases (SQLAlchemy's ``//`` renders FLOOR())
        rounds = (place - 1).self_group().op("/")(per_key)
        firsts = sa.select(
            seen.c.id,
            seen.c.ordering_key,
            rounds.label("round"),
            sa.func.min(seen.c.id).over(partition_by=seen.c.ordering_key).label("key_first"),
        ).subquery("firsts")
        ranked = sa.select(
            firsts,
            sa.func.dense_rank().over(order_by=firsts.c.key_first).label("key_rank"),
        ).subquery("ranked")
        seen_keys = sa.select(sa.func.count(seen.c.ordering_key.distinct())).scalar_subquery()
        # ceil(keys with work / relays at work), at least 1
        share = (
            sa.select(
                (seen_keys + crowd.c.busy_keys + crowd.c.relays - 1)
                .self_group()
                .op("/")(crowd.c.relays)
            )
            .select_from(crowd)
            .scalar_subquery()
        )
        chosen = (
            sa.select(ranked.c.id, ranked.c.ordering_key)
            .where(ranked.c.key_rank <= share)
            .order_by(ranked.c.round, ranked.c.key_first, ranked.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer()))
            .cte("chosen")
        )
        seen_count = sa.select(sa.func.count()).select_from(seen).scalar_subquery()
        if not self.is_postgres:
            # BEGIN IMMEDIATE: one claimer at a time; the lease is a second statement.
            return sa.select(chosen.c.id, seen_count.label("seen"))
        chosen_count = sa.select(sa.func.count()).select_from(chosen).scalar_subquery()
        # SKIP LOCKED passes over rows another transaction holds (claims are serialized, but an
        # operator's update or the sweep's expiry is not). Rows are looked up by id as
        # ``id = ANY(ARRAY(…))``: an index condition on the primary key whatever the statistics
        # (with those of a small table, ``id IN (…)`` became a hash join over the whole key).
        locked = (
            sa.select(e.c.id, e.c.ordering_key)
            .where(
                e.c.id == sa.any_(sa.func.array(sa.select(chosen.c.id).scalar_subquery())),
                # Still pending, rechecked on the newest version of a row another transaction
                # changed meanwhile (READ COMMITTED rechecks this WHERE): a row the sweep just
                # expired stays expired. Said as "not leased, not finished" rather than
                # ``status = 'pending'``, which would let the planner trade the primary key for
                # a scan of a partial index on pending rows.
                e.c.lease_token.is_(None),
                e.c.finished_at.is_(None),
            )
            .with_for_update(skip_locked=True, of=e)
            .cte("locked")
        )
        # A key with a chosen row that could not be locked (SKIP LOCKED passed over it, or it
        # changed since the statement's snapshot) is left out whole: the rows chosen for a key
        # are its oldest claimable ones, so every earlier open row of a key is among them, and
        # a later row must not go out before a held one. Small hashed sets, no table access.
        skipped_keys = sa.select(chosen.c.ordering_key).where(
            chosen.c.id.not_in(sa.select(locked.c.id))
        )
        in_order = locked.c.ordering_key.not_in(skipped_keys)
        picked = sa.select(locked.c.id).where(in_order).scalar_subquery()
        claimed = self._lease(sa.any_(sa.func.array(picked))).cte("claimed")
        # One row at least, carrying how many rows were seen and chosen.
        one = sa.select(sa.literal(1).label("one")).subquery("one")
        return sa.select(
            *claimed.c, seen_count.label("seen"), chosen_count.label("chosen")
        ).select_from(one.outerjoin(claimed, sa.true()))

    def _mark_expired(self, conn: Connection, ids: Sequence[int]) -> int:
        e = events
        result = conn.execute(
            sa.update(e)
            .where(e.c.id.in_(ids), _in(e.c.status, OPEN_STATUSES))
            .values(
                status=Status.EXPIRED.value,
                finished_at=self._now(),
                lease_token=None,
                lease_expires_at=None,
                **self._erase_phi_values(),
            )
        )
        return int(result.rowcount or 0)

    def _erase_phi_values(self, now: sa.ColumnElement[Any] | None = None) -> dict[str, Any]:
        """Values that erase the payload of PHI rows at once (retention 0 for PHI)."""
        e = events
        now = self._now() if now is None else now
        return {
            "data": sa.case((e.c.contains_phi, sa.null()), else_=e.c.data),
            "payload_erased_at": sa.case((e.c.contains_phi, now), else_=sa.null()),
        }

    # --- final writes (row id + lease token) ----------------------------------------------

    def _update_leased(
        self,
        claimed: Sequence[ClaimedEvent],
        key: str,
        values: Callable[[sa.ColumnElement[Any]], Mapping[str, Any]],
    ) -> int:
        """Apply ``values(now)`` to the rows of ``claimed`` that their lease still owns.

        Every final write goes through here: it checks row id, lease token and ``in_flight``, so
        a worker whose lease was taken over changes nothing. The statement is built once per
        ``key``. Returns the rows changed.
        """
        if not claimed:
            return 0
        e = events

        def build() -> Any:
            return (
                sa.update(e)
                .where(
                    self._id_in("ids"),
                    e.c.lease_token == sa.bindparam("token", type_=sa.String()),
                    _is(e.c.status, Status.IN_FLIGHT),
                )
                .values(**values(self._clock()))
            )

        statement = self._statement(key, build)
        total = 0
        for token, ids in _group_by_token(claimed).items():
            with self.engine.begin() as conn:
                result = conn.execute(
                    statement, {"ids": ids, "token": token, **self._clock_params()}
                )
                total += int(result.rowcount or 0)
        return total

    def mark_sent(self, claimed: Sequence[ClaimedEvent], *, erase_phi_now: bool) -> int:
        """Mark rows sent; returns how many this lease still owned."""

        def values(now: sa.ColumnElement[Any]) -> dict[str, Any]:
            sent: dict[str, Any] = {
                "status": Status.SENT.value,
                "sent_at": now,
                "finished_at": now,
                "lease_token": None,
                "lease_expires_at": None,
                "last_error": None,
            }
            if erase_phi_now:
                sent.update(self._erase_phi_values(now))
            return sent

        return self._update_leased(
            claimed, "sent, erasing PHI" if erase_phi_now else "sent", values
        )

    def extend_lease(self, token: str, *, lease_seconds: float) -> int:
        """Push the expiry of every row still leased under ``token``; returns how many."""
        e = events
        statement = self._statement(
            "extend",
            lambda: (
                sa.update(e)
                .where(
                    e.c.lease_token == sa.bindparam("token", type_=sa.String()),
                    _is(e.c.status, Status.IN_FLIGHT),
                )
                .values(lease_expires_at=self._clock("lease_seconds"))
            ),
        )
        with self.engine.begin() as conn:
            result = conn.execute(statement, {"token": token, **self._clock_params(lease_seconds)})
            return int(result.rowcount or 0)

    def release(self, claimed: Sequence[ClaimedEvent]) -> int:
        """Give rows back without charging an attempt (they were never sent)."""
        e = events
        return self._update_leased(
            claimed,
            "released",
            lambda now: {
                "status": Status.PENDING.value,
                "attempts": e.c.attempts - 1,
                "lease_token": None,
                "lease_expires_at": None,
            },
        )

    def record_failures(self, failures: Sequence[Failure]) -> int:
        """Schedule a retry or dead-letter each failed row; reasons are already sanitized."""
        if not failures:
            return 0
        e = events
        total = 0
        with self.engine.begin() as conn:
            now = self.db_now(conn)
            for failure in failures:
                ev = failure.event
                dead = failure.retry_in_seconds is None
                log = _append_log(
                    ev.attempt_log,
                    {
                        "at": now.isoformat(timespec="milliseconds"),
                        "attempt": ev.attempts,
                        "outcome": "dead" if dead else "retry",
                        "status": failure.status_code,
                        "reason": failure.reason[:200],
                    },
                )
                values: dict[str, Any] = {
                    "status": Status.DEAD.value if dead else Status.PENDING.value,
                    "lease_token": None,
                    "lease_expires_at": None,
                    "last_error": failure.reason[:500],
                    "attempt_log": log,
                }
                if dead:
                    values["finished_at"] = now
                else:
                    # the database clock, like every other due-time comparison
                    values["available_at"] = self._now(failure.retry_in_seconds or 0.0)
                result = conn.execute(
                    sa.update(e)
                    .where(
                        e.c.id == ev.id,
                        e.c.lease_token == ev.lease_token,
                        _is(e.c.status, Status.IN_FLIGHT),
                    )
                    .values(**values)
                )
                total += int(result.rowcount or 0)
        return total

    def expire(self, claimed: Sequence[ClaimedEvent]) -> int:
        """Mark rows claimed past their time-to-live expired (the claim's attempt is undone)."""
        return self._update_leased(
            claimed,
            "expired",
            lambda now: {
                "status": Status.EXPIRED.value,
                "attempts": events.c.attempts - 1,
                "finished_at": now,
                "lease_token": None,
                "lease_expires_at": None,
                **self._erase_phi_values(now),
            },
        )

    # --- sweeping ------------------------------------------------------------------------

    def reclaim_expired_leases(self) -> int:
        """Return rows whose lease ran out (worker died) to ``pending``, due now."""
        e = events
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(e)
                .where(_is(e.c.status, Status.IN_FLIGHT), e.c.lease_expires_at < self._now())
                .values(
                    status=Status.PENDING.value,
                    lease_token=None,
                    lease_expires_at=None,
                    available_at=self._now(),
                    last_error="lease expired: the worker holding it stopped or timed out",
                )
            )
            return int(result.rowcount or 0)

    def expire_overdue(self, *, limit: int = 1000) -> int:
        """Mark pending rows past their time-to-live as expired (bounded batch)."""
        e = events
        with self.engine.begin() as conn:
            ids = (
                conn.execute(
                    sa.select(e.c.id)
                    .where(
                        _is(e.c.status, Status.PENDING),
                        e.c.expires_at.is_not(None),
                        e.c.expires_at <= self._now(),
                    )
                    .order_by(e.c.id)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            if not ids:
                return 0
            return self._mark_expired(conn, ids)

    def erase_payloads(
        self,
        *,
        phi_retention_seconds: float,
        payload_retention_seconds: float,
        dead_retention_seconds: float,
        limit: int = 1000,
    ) -> int:
        """Erase payloads of finished rows older than their retention (bounded batch).

        Sent and expired rows: PHI payloads after ``phi_retention_seconds``, others after
        ``payload_retention_seconds``. Dead rows keep their payload for redrive until
        ``dead_retention_seconds``. Metadata stays for monitoring.
        """
        e = events
        finished_sent = _in(e.c.status, (Status.SENT.value, Status.EXPIRED.value))
        condition = sa.or_(
            sa.and_(
                finished_sent,
                e.c.contains_phi,
                e.c.finished_at <= self._now(-phi_retention_seconds),
            ),
            sa.and_(
                finished_sent,
                ~e.c.contains_phi,
                e.c.finished_at <= self._now(-payload_retention_seconds),
            ),
            sa.and_(
                _is(e.c.status, Status.DEAD),
                e.c.finished_at <= self._now(-dead_retention_seconds),
            ),
        )
        with self.engine.begin() as conn:
            ids = (
                conn.execute(
                    sa.select(e.c.id)
                    .where(e.c.data.is_not(None), e.c.finished_at.is_not(None), condition)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            if not ids:
                return 0
            result = conn.execute(
                sa.update(e)
                .where(e.c.id.in_(ids), _in(e.c.status, TERMINAL_STATUSES))
                .values(data=None, payload_erased_at=self._now())
            )
            return int(result.rowcount or 0)

    def purge(
        self,
        *,
        older_than_seconds: float,
        statuses: Iterable[str] = TERMINAL_STATUSES,
        limit: int = 1000,
    ) -> int:
        """Delete terminal rows finished more than ``older_than_seconds`` ago (bounded batch)."""
        wanted = [s for s in statuses if s in TERMINAL_STATUSES]
        if not wanted:
            return 0
        e = events
        with self.engine.begin() as conn:
            ids = (
                conn.execute(
                    sa.select(e.c.id)
                    .where(
                        _in(e.c.status, wanted),
                        e.c.finished_at.is_not(None),
                        e.c.finished_at <= self._now(-older_than_seconds),
                    )
                    .order_by(e.c.id)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            if not ids:
                return 0
            result = conn.execute(
                sa.delete(e).where(e.c.id.in_(ids), _in(e.c.status, TERMINAL_STATUSES))
            )
            return int(result.rowcount or 0)

    # --- dead letters --------------------------------------------------------------------

    def redrive(self, ids: Sequence[int] | None = None, *, type_name: str | None = None) -> int:
        """Put dead rows back to pending, due now, with their attempt count reset.

        Rows whose payload was already erased cannot be redriven and are left dead.
        """
        e = events
        conditions = [_is(e.c.status, Status.DEAD), e.c.data.is_not(None)]
        if ids is not None:
            conditions.append(e.c.id.in_(list(ids)))
        if type_name is not None:
            conditions.append(e.c.type_name == type_name)
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(e)
                .where(*conditions)
                .values(
                    status=Status.PENDING.value,
                    attempts=0,
                    available_at=self._now(),
                    finished_at=None,
                    last_error=None,
                )
            )
            return int(result.rowcount or 0)

    def list_dead(
        self, *, type_name: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Metadata of dead rows, newest first. Never the payload."""
        e = events
        query = (
            sa.select(
                e.c.id,
                e.c.event_id,
                e.c.type_name,
                e.c.event_name,
                e.c.attempts,
                e.c.created_at,
                e.c.finished_at,
                e.c.last_error,
                (e.c.data.is_not(None)).label("payload_held"),
            )
            .where(_is(e.c.status, Status.DEAD))
            .order_by(e.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if type_name is not None:
            query = query.where(e.c.type_name == type_name)
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def show(self, row_id: int) -> dict[str, Any] | None:
        """Metadata and attempt history of one row. Never the payload."""
        e = events
        columns = [c for c in e.c if c.name not in ("data",)]
        with self._read() as conn:
            row = conn.execute(
                sa.select(*columns, (e.c.data.is_not(None)).label("payload_held")).where(
                    e.c.id == row_id
                )
            ).first()
        if row is None:
            return None
        result = dict(row._mapping)
        result["attempt_log"] = json.loads(result["attempt_log"]) if result["attempt_log"] else []
        return result

    # --- monitoring ----------------------------------------------------------------------

    def stats(self, *, latency_window_seconds: float = 900.0) -> dict[str, Any]:
        """Counts by status and type, due now, retrying, lag, throughput and latency.

        Throughput is sent events per second over the last 1, 5 and 15 minutes; latency is
        enqueue-to-publish (``sent_at - created_at``) percentiles over the newest sent rows of
        the window (at most ``LATENCY_SAMPLE_LIMIT``).
        """
        e = events
        with self._read() as conn:
            now = self.db_now(conn)
            by_status = {
                status: count
                for status, count in conn.execute(
                    sa.select(e.c.status, sa.func.count()).group_by(e.c.status)
                ).all()
            }
            by_type: dict[str, dict[str, int]] = {}
            for type_name, status, count in conn.execute(
                sa.select(e.c.type_name, e.c.status, sa.func.count()).group_by(
                    e.c.type_name, e.c.status
                )
            ).all():
                by_type.setdefault(type_name, {})[status] = count
            oldest_due = conn.execute(
                sa.select(sa.func.min(e.c.available_at)).where(
                    _is(e.c.status, Status.PENDING), e.c.available_at <= self._now()
                )
            ).scalar()
            due_now = conn.execute(
                sa.select(sa.func.count()).where(
                    _is(e.c.status, Status.PENDING), e.c.available_at <= self._now()
                )
            ).scalar_one()
            retrying = conn.execute(
                sa.select(sa.func.count()).where(_is(e.c.status, Status.PENDING), e.c.attempts > 0)
            ).scalar_one()
            windows = {"1m": 60, "5m": 300, "15m": 900}
            sent_since = {
                name: conn.execute(
                    sa.select(sa.func.count()).where(
                        e.c.finished_at.is_not(None),
                        e.c.finished_at >= self._now(-seconds),
                        _is(e.c.status, Status.SENT),
                    )
                ).scalar_one()
                for name, seconds in windows.items()
            }
            samples = conn.execute(
                sa.select(e.c.created_at, e.c.sent_at)
                .where(
                    e.c.finished_at.is_not(None),
                    e.c.finished_at >= self._now(-latency_window_seconds),
                    _is(e.c.status, Status.SENT),
                )
                .order_by(e.c.finished_at.desc())
                .limit(LATENCY_SAMPLE_LIMIT)
            ).all()
        oldest = _as_utc(oldest_due)
        lag = (now - oldest).total_seconds() if oldest is not None else 0.0
        latencies = sorted(
            (r.sent_at - r.created_at).total_seconds() for r in samples if r.sent_at is not None
        )
        return {
            "by_status": {s.value: int(by_status.get(s.value, 0)) for s in Status},
            "by_type": by_type,
            "due_now": int(due_now),
            "retrying": int(retrying),
            "lag_seconds": max(lag, 0.0),
            "throughput_per_second": {
                name: int(sent_since[name]) / seconds for name, seconds in windows.items()
            },
            "latency_seconds": {
                "window_seconds": latency_window_seconds,
                "samples": len(latencies),
                "p50": _percentile(latencies, 0.50),
                "p95": _percentile(latencies, 0.95),
                "p99": _percentile(latencies, 0.99),
            },
        }

    # --- catch-up -----------------------------------------------------------------------

    def channel_history(self, channel: str, *, after_seq: int, limit: int) -> dict[str, Any]:
        """Rows of ``channel`` with ``seq > after_seq`` in order, plus the retained range.

        Returns ``{"rows": [...], "first_seq": oldest retained seq or None, "last_seq": the
        channel's newest seq or 0}``. Rows carry metadata and the stored data text (which may be
        NULL once retention erased it).
        """
        e = events
        s = channel_sequences
        with self._read() as conn:
            rows = conn.execute(
                sa.select(
                    e.c.event_id,
                    e.c.seq,
                    e.c.event_name,
                    e.c.status,
                    e.c.data,
                    e.c.contains_phi,
                )
                .where(e.c.channel == channel, e.c.seq > after_seq)
                .order_by(e.c.seq)
                .limit(limit)
            ).all()
            first_seq = conn.execute(
                sa.select(sa.func.min(e.c.seq)).where(e.c.channel == channel)
            ).scalar()
            last_seq = conn.execute(sa.select(s.c.last_seq).where(s.c.channel == channel)).scalar()
        return {
            "rows": [dict(r._mapping) for r in rows],
            "first_seq": None if first_seq is None else int(first_seq),
            "last_seq": int(last_seq or 0),
        }

    # --- worker liveness -----------------------------------------------------------------

    def heartbeat(
        self, *, worker_id: str, host: str, pid: int, version: str, started_at: dt.datetime
    ) -> None:
        """Record that ``worker_id`` is alive now (upsert)."""
        w = workers
        with self.engine.begin() as conn:
            stmt = (
                _dialect_insert(conn, w)
                .values(
                    worker_id=worker_id,
                    host=host,
                    pid=pid,
                    version=version,
                    started_at=started_at,
                    last_beat_at=self._now(),
                )
                .on_conflict_do_update(
                    index_elements=[w.c.worker_id],
                    set_={"last_beat_at": self._now(), "pid": pid, "version": version},
                )
            )
            conn.execute(stmt)

    def forget_worker(self, worker_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(workers).where(workers.c.worker_id == worker_id))

    def workers_alive(self, *, within_seconds: float) -> list[dict[str, Any]]:
        """Workers whose last heartbeat is more recent than ``within_seconds``."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(workers)
                .where(workers.c.last_beat_at >= self._now(-within_seconds))
                .order_by(workers.c.worker_id)
            ).all()
        return [dict(r._mapping) for r in rows]


def _as_utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite aggregates lose the column type
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values; ``None`` when there are none."""
    if not sorted_values:
        return None
    rank = max(int(-(-fraction * len(sorted_values) // 1)) - 1, 0)
    return sorted_values[min(rank, len(sorted_values) - 1)]


# pg_advisory_xact_lock key serializing claims on one database ("outbox" in ASCII).
CLAIM_LOCK_KEY = 0x6F7574626F78


def _claim_lock() -> Any:
    """Take the claim lock and, for this transaction only, pin the claim's plan.

    An outbox table's statistics are wrong most of the time (a burst arrives after the last
    ANALYZE saw a nearly empty table, or the other way round). With statistics of a tiny table
    the planner read the whole table and sorted it on every claim (480 ms per claim of 100 in a
    benchmark run, auto_explain), or fetched every pending row with a bitmap scan and sorted
    them (11 ms per claim with 20,000 pending). The claim is only ever right when it walks the
    due index in id order and stops early, so it rules out sequential and bitmap scans and
    makes sorts (which only that walk avoids) the last resort. Those penalties make the plan
    look expensive enough for JIT compilation, which then cost 250 ms a claim: JIT is off too.
    With the plan pinned, planning it again for every claim's parameters is waste (about 1 ms
    of PostgreSQL's CPU per claim, 10 us per row of a claim of 100): the claim's plans are
    generic (planned for any parameters) from its first run, and once psycopg has prepared the
    statement (its fifth run on a connection) they are planned once per connection.
    ``set_config(..., true)`` is ``SET LOCAL``: it ends with the claim's transaction.
    """
    return sa.select(
        sa.func.pg_advisory_xact_lock(CLAIM_LOCK_KEY),
        *(sa.func.set_config(name, value, True) for name, value in CLAIM_PLANNER_SETTINGS),
    )


class _DueIndexed(Alias):
    """``outbox_events`` read through the due index: ``INDEXED BY`` on SQLite (a plain alias
    elsewhere; PostgreSQL's claim pins its plans with planner settings, see _claim_lock)."""

    inherit_cache = True


@compiles(_DueIndexed, "sqlite")
def _indexed_by(element: _DueIndexed, compiler: Any, **kw: Any) -> str:
    text: str = compiler.visit_alias(element, **kw)
    if kw.get("asfrom"):
        text += f" INDEXED BY {IX_DUE}"
    return text


# Planner settings of the claim's own transaction (see _claim_lock).
CLAIM_PLANNER_SETTINGS = (
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_sort", "off"),
    ("jit", "off"),
    ("plan_cache_mode", "force_generic_plan"),
)


def _group_by_token(claimed: Sequence[ClaimedEvent]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for ev in claimed:
        grouped.setdefault(ev.lease_token, []).append(ev.id)
    return grouped
