"""The `outbox` command as a user runs it: a subprocess with environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from outbox import new_opaque_id
from outbox.errors import PermanentPublishError
from outbox.relay import Relay
from outbox.store import Store
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS, FakePublisher, make_outbox

OUTBOX = str(Path(sys.executable).with_name("outbox"))
CANARY = "CANARY-cli-Patient-Roe"


def run(database_url, *args, env=None, timeout=60, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PUSHER_"))}
    full_env["OUTBOX_DATABASE_URL"] = database_url
    full_env.update(env or {})
    return subprocess.run(
        [OUTBOX, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
        check=False,
    )


def seed(engine, *, dead=1, pending=2):
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    with Session(engine) as session, session.begin():
        for _ in range(dead):
            outbox.enqueue(
                session,
                ORDER_DETAILS,
                ids={"pharmacy_id": pharmacy},
                data={"order_id": new_opaque_id("ord"), "patient": CANARY, "medication": CANARY},
            )
    Relay(
        store=Store(engine),
        publisher=FakePublisher(
            fail_for=lambda e: PermanentPublishError(
                "HTTP 400 from Pusher: request rejected as invalid", status=400
            )
        ),
    ).drain(max_seconds=5)
    with Session(engine) as session, session.begin():
        for _ in range(pending):
            outbox.enqueue(
                session,
                ORDER_CREATED,
                ids={"pharmacy_id": pharmacy},
                data={"order_id": new_opaque_id("ord"), "status": "new", "items": 1},
            )


def test_migrate_creates_a_fresh_database_and_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path}/new/outbox.db"
    for _ in range(2):
        result = run(url, "migrate")
        assert result.returncode == 0, result.stderr
        assert "revision" in result.stdout
        assert f"(SQLite file {tmp_path.resolve()}/new/outbox.db)" in result.stdout


def test_migrate_names_the_file_a_relative_sqlite_url_resolves_to(tmp_path):
    """``sqlite:///tmp/x.db`` (three slashes) is ./tmp/x.db, not /tmp/x.db: say which."""
    result = run("sqlite:///tmp/x.db", "migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"(SQLite file {tmp_path.resolve()}/tmp/x.db)" in result.stdout
    assert (tmp_path / "tmp" / "x.db").is_file()


def test_commands_on_an_unmigrated_database_say_to_migrate(tmp_path):
    result = run(f"sqlite:///{tmp_path}/empty.db", "stats")
    assert result.returncode != 0
    assert "outbox migrate" in result.stderr


def test_bad_configuration_names_the_variable_without_its_value(tmp_path):
    result = run(
        f"sqlite:///{tmp_path}/x.db",
        "stats",
        env={"PUSHER_ENCRYPTION_MASTER_KEY_BASE64": "c2hvcnQta2V5LXZhbHVl"},
    )
    assert result.returncode != 0
    assert "PUSHER_ENCRYPTION_MASTER_KEY_BASE64" in result.stderr
    assert "c2hvcnQta2V5LXZhbHVl" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_stats_json_health_and_dead_letters_never_print_payloads(engine, database_url):
    seed(engine)
    stats = run(database_url, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["schema"] == 1
    assert data["by_status"]["dead"] == 1
    assert data["by_status"]["pending"] == 2
    assert data["due_now"] == 2
    assert data["by_type"]["order.details"] == {"dead": 1}
    assert data["latency_seconds"]["samples"] == 0
    assert set(data["throughput_per_second"]) == {"1m", "5m", "15m"}
    table = run(database_url, "stats")
    assert "order.created" in table.stdout
    assert "throughput" in table.stdout

    health = run(database_url, "health", "--max-dead", "0")
    assert health.returncode == 2
    assert health.stdout.startswith("CRITICAL")
    assert len(health.stdout.strip().splitlines()) == 1
    no_worker = run(database_url, "health", "--max-dead", "5")
    assert no_worker.returncode == 2
    assert "no live worker" in no_worker.stdout
    assert run(database_url, "health", "--max-dead", "5", "--no-worker-check").returncode == 0
    import datetime as dt

    Store(engine).heartbeat(
        worker_id="w1@host", host="host", pid=1, version="0.1.0", started_at=dt.datetime.now(dt.UTC)
    )
    healthy = run(database_url, "health", "--max-dead", "5")
    assert healthy.returncode == 0, healthy.stdout
    assert "workers=1" in healthy.stdout
    gauges = run(database_url, "metrics")
    assert 'outbox_queue_events{status="dead"} 1.0' in gauges.stdout
    assert "outbox_workers_alive 1.0" in gauges.stdout
    assert CANARY not in gauges.stdout

    listing = run(database_url, "dead", "list", "--json")
    [dead] = json.loads(listing.stdout)
    assert dead["type_name"] == "order.details"
    assert "400" in dead["last_error"]
    shown = run(database_url, "dead", "show", str(dead["id"]))
    assert shown.returncode == 0
    detail = json.loads(shown.stdout)
    assert detail["payload_held"] is True
    assert detail["attempt_log"][0]["outcome"] == "dead"
    for output in (stats.stdout, table.stdout, health.stdout, listing.stdout, shown.stdout):
        assert CANARY not in output

    assert run(database_url, "dead", "show", "999999").returncode != 0
    assert run(database_url, "dead", "redrive").returncode != 0  # needs ids, --type or --all
    redrive = run(database_url, "dead", "redrive", "--type", "order.details")
    assert "redriven 1" in redrive.stdout
    assert json.loads(run(database_url, "stats", "--json").stdout)["by_status"]["dead"] == 0


def test_purge_deletes_finished_rows_only(engine, database_url):
    seed(engine, dead=2, pending=1)
    result = run(database_url, "purge", "--older-than-seconds", "0", "--status", "dead")
    assert result.returncode == 0
    assert "purged 2" in result.stdout
    counts = json.loads(run(database_url, "stats", "--json").stdout)["by_status"]
    assert counts["dead"] == 0
    assert counts["pending"] == 1


def test_keygen_prints_a_valid_master_key(tmp_path):
    import base64

    result = run(f"sqlite:///{tmp_path}/x.db", "keygen")
    assert len(base64.b64decode(result.stdout.strip())) == 32


@pytest.mark.parametrize("decision", ["grant", "deny"])
def test_audit_lists_authorization_decisions(engine, database_url, decision):
    from outbox import ChannelAuthorizer
    from tests.integration.test_auth import client

    pharmacy = new_opaque_id("pha")
    authorizer = ChannelAuthorizer(
        outbox=make_outbox(),
        pusher_client=client(),
        engine=engine,
        may_subscribe=lambda *a: decision == "grant",
        user_ref=lambda u: "usr_auditUser01234567ab",
    )
    authorizer.handle(None, {"socket_id": "1.2", "channel_name": f"private-pharmacy-{pharmacy}"})
    result = run(database_url, "audit", "--json", "--decision", decision)
    [row] = json.loads(result.stdout)
    assert row["channel"] == f"private-pharmacy-{pharmacy}"
    assert row["user_ref"] == "usr_auditUser01234567ab"
    assert (
        json.loads(run(database_url, "audit", "--json", "--channel-prefix", "presence-").stdout)
        == []
    )


def test_migrate_on_an_unreachable_database_says_so_without_a_traceback():
    result = run("postgresql+psycopg://someone:pw-CANARY@127.0.0.1:1/outbox", "migrate")
    assert result.returncode == 1
    assert "cannot open the database from OUTBOX_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "pw-CANARY" not in result.stderr + result.stdout


def test_migrate_gives_up_on_a_held_lock_and_changes_nothing(postgres_database_url):
    """A long transaction reading the outbox: the migration's exclusive lock is not granted in
    time, so it fails cleanly, rolled back, instead of queueing every query behind it."""
    import sqlalchemy as sa

    from alembic import command
    from outbox.migration import alembic_config, current_revision, head_revision

    command.downgrade(alembic_config(postgres_database_url), "0003")
    engine = sa.create_engine(postgres_database_url)
    try:
        with engine.connect() as reader:
            reader.execute(sa.text("SELECT count(*) FROM outbox_events")).scalar()  # holds it
            started = time.monotonic()
            blocked = run(
                postgres_database_url,
                "migrate",
                env={"OUTBOX_MIGRATION_LOCK_TIMEOUT_SECONDS": "0.5"},
            )
            assert time.monotonic() - started < 30
            reader.rollback()
        assert blocked.returncode == 1, blocked.stdout
        assert "OUTBOX_MIGRATION_LOCK_TIMEOUT_SECONDS=0.5" in blocked.stderr
        assert "changed nothing" in blocked.stderr
        assert "Traceback" not in blocked.stderr
        assert current_revision(postgres_database_url) == "0003"
        with engine.connect() as conn:
            kinds = conn.execute(
                sa.text("SELECT contype FROM pg_constraint WHERE conname = :name"),
                {"name": "uq_outbox_events_dedup_key"},
            ).scalars()
            assert list(kinds) == ["u"]  # still the constraint of 0003
        done = run(postgres_database_url, "migrate")
        assert done.returncode == 0, done.stderr
        assert current_revision(postgres_database_url) == head_revision()
    finally:
        engine.dispose()
