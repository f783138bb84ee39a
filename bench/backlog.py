"""Big tables, fast: fill the outbox with sent rows and pending rows without the producer path.

PostgreSQL uses ``INSERT … SELECT generate_series``; SQLite a recursive CTE. The rows look like
the benchmark's public events (same channels, so the same ordering keys have a long history).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import sqlalchemy as sa

from bench import workload
from outbox.producer import encode_envelope

_COLUMNS = (
    "event_id, type_name, channel, event_name, ordering_key, seq, data, data_bytes, encrypted, "
    "contains_phi, status, attempts, created_at, available_at, expires_at, sent_at, finished_at"
)

_POSTGRES_FILL = f"""
INSERT INTO outbox_events ({_COLUMNS})
SELECT :prefix || md5(g::text), :type_name, ch, :event_name, ch,
       CASE WHEN :numbered THEN g / :channel_count + 1 END, :data, :data_bytes, false,
       false, :status, :attempts, :created_at, :available_at, :expires_at, :sent_at, :sent_at
FROM generate_series(1, :count) AS g,
     LATERAL (SELECT (CAST(:channels AS text[]))[1 + (g % :channel_count)] AS ch) AS c
"""  # noqa: S608 - no user input: a fixed column list

_SQLITE_FILL = f"""
WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :count)
INSERT INTO outbox_events ({_COLUMNS})
SELECT :prefix || printf('%032d', x), :type_name,
       json_extract(:channels, '$[' || (x % :channel_count) || ']'), :event_name,
       json_extract(:channels, '$[' || (x % :channel_count) || ']'),
       CASE WHEN :numbered THEN x / :channel_count + 1 END, :data, :data_bytes, 0, 0,
       :status, :attempts, :created_at, :available_at, :expires_at, :sent_at, :sent_at
FROM g
"""  # noqa: S608 - no user input: a fixed column list

# The live producer must go on numbering each channel after the filled rows.
_SEQUENCES = """
INSERT INTO outbox_channel_sequences (channel, last_seq)
SELECT channel, max(seq) FROM outbox_events WHERE seq IS NOT NULL GROUP BY channel
ON CONFLICT (channel) DO UPDATE SET last_seq = excluded.last_seq
"""


def _timestamp(engine: sa.Engine, value: dt.datetime | None) -> Any:
    if value is None or engine.dialect.name == "postgresql":
        return value
    # SQLAlchemy's SQLite DateTime text format (what UTCDateTime stores: naive UTC).
    return value.astimezone(dt.UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def fill(engine: sa.Engine, *, rooms: list[str], count: int, status: str) -> float:
    """Insert ``count`` rows of ``status`` ('sent' or 'pending'); returns the seconds it took."""
    now = dt.datetime.now(dt.UTC)
    created = now - dt.timedelta(hours=1) if status == "sent" else now - dt.timedelta(seconds=1)
    channels = [workload.channel(workload.PUBLIC, room) for room in rooms]
    data = encode_envelope("evt_" + "x" * 22, 1, workload.fields(workload.PUBLIC, 1))
    params = {
        "prefix": f"evt_{status[:1]}{int(time.time() * 1000) % 1000:03d}",
        "type_name": workload.PUBLIC_TYPE.name,
        "event_name": workload.EVENT_NAME,
        "data": data,
        "data_bytes": len(data),
        "status": status,
        "attempts": 1 if status == "sent" else 0,
        "created_at": _timestamp(engine, created),
        "available_at": _timestamp(engine, created),
        "expires_at": _timestamp(engine, now + dt.timedelta(hours=1)),
        "sent_at": _timestamp(engine, created if status == "sent" else None),
        "count": count,
        "channel_count": len(channels),
        "numbered": status == "sent",
    }
    started = time.perf_counter()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(_POSTGRES_FILL), {**params, "channels": channels})
        else:
            conn.execute(sa.text(_SQLITE_FILL), {**params, "channels": json.dumps(channels)})
        if status == "sent":
            conn.execute(sa.text(_SEQUENCES))
    return time.perf_counter() - started


def analyze(engine: sa.Engine) -> None:
    """Refresh the planner's statistics (what autovacuum does on PostgreSQL, now)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE outbox_events")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def finish_open_rows(engine: sa.Engine) -> None:
    """Mark every pending or leased row sent (so a later run starts with no backlog)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox_events SET status = 'sent', lease_token = NULL, "
                "lease_expires_at = NULL, sent_at = created_at, finished_at = created_at "
                "WHERE status IN ('pending', 'in_flight')"
            )
        )


def count_rows(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT status, count(*) FROM outbox_events GROUP BY status")
        ).all()
    return {str(status): int(n) for status, n in rows}
