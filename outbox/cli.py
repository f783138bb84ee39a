"""The ``outbox`` command: migrations, queue statistics, health, dead letters, purge, keys.

Output never contains payload values: only ids, types, counts, times and sanitized reasons.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy.exc

from outbox import __version__
from outbox.dashboard import STATS_SCHEMA_VERSION
from outbox.dashboard import collect_stats as _collect
from outbox.errors import OutboxError
from outbox.migration import (
    current_revision,
    ensure_sqlite_directory,
    head_revision,
    sqlite_file,
    upgrade_to_head,
)
from outbox.models import TERMINAL_STATUSES
from outbox.settings import Settings, load_settings
from outbox.store import Store, create_engine, list_audit

F = TypeVar("F", bound=Callable[..., Any])


def _settings() -> Settings:
    try:
        return load_settings()
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None


def _store(settings: Settings) -> Store:
    return Store(create_engine(settings.database_url))


def _revision(settings: Settings) -> str | None:
    """The database's schema revision; a clear error when it cannot be opened."""
    try:
        return current_revision(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - report the database problem without a traceback
        raise click.ClickException(
            f"cannot open the database from OUTBOX_DATABASE_URL ({type(exc).__name__}); check "
            "that it is reachable"
        ) from None


def _require_schema(settings: Settings) -> None:
    current = _revision(settings)
    if current is None:
        raise click.ClickException("the database has no outbox tables yet: run `outbox migrate`")


def _json_default(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


@click.group()
@click.version_option(__version__, prog_name="outbox")
def main() -> None:
    """pusher-outbox: relay realtime notifications to Pusher without exposing PHI."""


# PostgreSQL's "lock_not_available": lock_timeout expired.
LOCK_NOT_AVAILABLE = "55P03"


@main.command()
def migrate() -> None:
    """Create or upgrade the outbox tables (Alembic, idempotent)."""
    settings = _settings()
    try:
        ensure_sqlite_directory(settings.database_url)  # a new SQLite file's folder
    except OSError as exc:
        raise click.ClickException(
            f"cannot create the folder of the SQLite file in OUTBOX_DATABASE_URL "
            f"({type(exc).__name__}): check the path and its permissions"
        ) from None
    before = _revision(settings)
    try:
        upgrade_to_head(
            settings.database_url, lock_timeout_seconds=settings.migration_lock_timeout_seconds
        )
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlalchemy.exc.DBAPIError as exc:
        # The database's own message may quote row values: only its class and code are shown.
        code = getattr(exc.orig, "sqlstate", None)
        postgres = settings.database_url.startswith("postgresql")
        if code == LOCK_NOT_AVAILABLE:
            raise click.ClickException(
                "the migration waited longer than OUTBOX_MIGRATION_LOCK_TIMEOUT_SECONDS="
                f"{settings.migration_lock_timeout_seconds:g} for a lock on the outbox tables "
                "(a long query or transaction held them) and changed nothing: run `outbox "
                "migrate` again when they are quieter, or give it more time"
            ) from None
        raise click.ClickException(
            f"the migration from revision {before or 'none'} failed "
            f"({type(exc.orig).__name__}{f', SQLSTATE {code}' if code else ''})"
            + ("; PostgreSQL rolled it back, nothing changed" if postgres else "")
            + ": fix the cause and run `outbox migrate` again"
        ) from None
    click.echo(f"outbox schema at revision {head_revision()}{_where(settings.database_url)}")


def _where(database_url: str) -> str:
    """Which SQLite file was migrated: ``sqlite:///x.db`` is relative to the current folder."""
    path = sqlite_file(database_url)
    return "" if path is None else f" (SQLite file {path.resolve()})"


@main.command()
def keygen() -> None:
    """Print a new random encryption master key (32 bytes, base64)."""
    click.echo(base64.b64encode(os.urandom(32)).decode("ascii"))


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _render_stats(data: dict[str, Any]) -> str:
    by_status = data["by_status"]
    lines = [
        "status     " + "  ".join(f"{name}={count}" for name, count in by_status.items()),
        f"due now    {data['due_now']}",
        f"retrying   {data['retrying']}",
        f"lag        {data['lag_seconds']:.1f}s (age of the oldest due event)",
        "throughput "
        + "  ".join(f"{k}={v:.1f}/s" for k, v in data["throughput_per_second"].items()),
    ]
    latency = data["latency_seconds"]
    lines.append(
        f"latency    p50={_fmt_seconds(latency['p50'])} p95={_fmt_seconds(latency['p95'])} "
        f"p99={_fmt_seconds(latency['p99'])} (enqueue to publish, last "
        f"{latency['window_seconds'] / 60:.0f} min, {latency['samples']} events)"
    )
    lines.append(f"workers    {len(data['workers'])} alive")
    for worker in data["workers"]:
        lines.append(
            f"           {worker['worker_id']} pid={worker['pid']} v{worker['version']} "
            f"last beat {worker['last_beat_at']:%H:%M:%S}"
        )
    if data["by_type"]:
        lines.append("")
        statuses = list(by_status)
        width = max(len(name) for name in data["by_type"]) + 2
        lines.append("type".ljust(width) + "".join(s.rjust(11) for s in statuses))
        for type_name, counts in sorted(data["by_type"].items()):
            lines.append(
                type_name.ljust(width) + "".join(str(counts.get(s, 0)).rjust(11) for s in statuses)
            )
    return "\n".join(lines)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable schema).")
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.2), default=2.0, show_default=True)
@click.option("--worker-silence-seconds", type=click.FloatRange(1), default=60.0, show_default=True)
def stats(as_json: bool, watch: bool, interval: float, worker_silence_seconds: float) -> None:
    """Counts by status and type, due now, retrying, lag, throughput, latency, workers."""
    settings = _settings()
    _require_schema(settings)
    store = _store(settings)
    while True:
        data = _collect(store, worker_silence_seconds)
        if as_json:
            text = json.dumps(
                {"schema": STATS_SCHEMA_VERSION, **data}, default=_json_default, indent=2
            )
        else:
            text = _render_stats(data)
        if not watch:
            click.echo(text)
            return
        click.clear()
        click.echo(f"outbox stats  {dt.datetime.now():%H:%M:%S}  (Ctrl-C to stop)\n")
        click.echo(text)
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return


@main.command()
@click.option("--max-lag-seconds", type=float, default=60.0, show_default=True)
@click.option("--warn-lag-seconds", type=float, default=15.0, show_default=True)
@click.option("--max-dead", type=int, default=0, show_default=True, help="Critical above this.")
@click.option(
    "--max-worker-silence-seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Critical when no worker sent a heartbeat for this long.",
)
@click.option("--no-worker-check", is_flag=True, help="Do not require a live worker.")
def health(
    max_lag_seconds: float,
    warn_lag_seconds: float,
    max_dead: int,
    max_worker_silence_seconds: float,
    no_worker_check: bool,
) -> None:
    """One line; exit 0 ok, 1 warn, 2 critical (lag, dead letters, no live worker)."""
    try:
        settings = load_settings()
        data = _collect(Store(create_engine(settings.database_url)), max_worker_silence_seconds)
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not crash
        click.echo(f"CRITICAL cannot read the outbox ({type(exc).__name__})")
        sys.exit(2)
    lag = data["lag_seconds"]
    dead = data["by_status"]["dead"]
    alive = len(data["workers"])
    line = (
        f"lag={lag:.1f}s due={data['due_now']} retrying={data['retrying']} dead={dead} "
        f"workers={alive}"
    )
    problems = []
    if lag > max_lag_seconds:
        problems.append("lag")
    if dead > max_dead:
        problems.append("dead letters")
    if not no_worker_check and alive == 0:
        problems.append("no live worker")
    if problems:
        click.echo(f"CRITICAL {line} ({', '.join(problems)})")
        sys.exit(2)
    if lag > warn_lag_seconds:
        click.echo(f"WARN {line} (lag)")
        sys.exit(1)
    click.echo(f"OK {line}")


@main.command()
def metrics() -> None:
    """Print the queue gauges (Prometheus text format), e.g. for a textfile collector."""
    from prometheus_client import generate_latest

    from outbox.metrics import registry

    settings = _settings()
    _require_schema(settings)
    click.echo(generate_latest(registry(_store(settings))).decode(), nl=False)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option(
    "--token",
    help="Bearer token (default: OUTBOX_DASHBOARD_TOKEN, preferred: command lines are visible "
    "to other local users).",
)
@click.option("--no-auth", is_flag=True, help="Serve without a token (loopback addresses only).")
@click.option("--worker-silence-seconds", type=click.FloatRange(1), default=60.0, show_default=True)
def dashboard(
    host: str, port: int, token: str | None, no_auth: bool, worker_silence_seconds: float
) -> None:
    """Serve a read-only web page of the queue (stats, types, dead letters, live charts).

    Also serves /api/stats (the `stats --json` document) and /metrics (Prometheus). Every request
    needs `Authorization: Bearer <token>`, or `?token=` on the page URL. Ctrl-C stops.
    """
    from outbox.dashboard import check_access, serve

    settings = _settings()
    if token is None and settings.dashboard_token is not None:
        token = settings.dashboard_token.get_secret_value()
    try:
        check_access(host=host, token=token or None, no_auth=no_auth)
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None
    if not all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn")):
        raise click.ClickException(
            "the dashboard needs Starlette and uvicorn: pip install 'pusher-outbox[dashboard]'"
        )
    _require_schema(settings)
    shown_host = f"[{host}]" if ":" in host else host
    auth = "token required" if token else "no auth, loopback only"
    click.echo(f"outbox dashboard on http://{shown_host}:{port}/ ({auth}; Ctrl-C to stop)")
    store = _store(settings)
    try:
        serve(
            store,
            token=token or None,
            host=host,
            port=port,
            worker_silence_seconds=worker_silence_seconds,
        )
    except KeyboardInterrupt:
        pass
    finally:
        store.engine.dispose()
    click.echo("outbox dashboard stopped")


@main.group()
def dead() -> None:
    """Dead letters: list, show, redrive."""


@dead.command("list")
@click.option("--type", "type_name", help="Only this notification type.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--json", "as_json", is_flag=True)
def dead_list(type_name: str | None, limit: int, offset: int, as_json: bool) -> None:
    """Dead rows, newest first (metadata and sanitized reasons only)."""
    settings = _settings()
    _require_schema(settings)
    rows = _store(settings).list_dead(type_name=type_name, limit=limit, offset=offset)
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=2))
        return
    if not rows:
        click.echo("no dead letters")
        return
    for row in rows:
        click.echo(
            f"{row['id']:>8}  {row['event_id']}  {row['type_name']}  attempts={row['attempts']}  "
            f"{row['last_error'] or ''}"
        )


@dead.command("show")
@click.argument("row_id", type=int)
def dead_show(row_id: int) -> None:
    """One row's metadata and attempt history (never the payload)."""
    settings = _settings()
    _require_schema(settings)
    row = _store(settings).show(row_id)
    if row is None:
        raise click.ClickException(f"no outbox row with id {row_id}")
    click.echo(json.dumps(row, default=_json_default, indent=2))


@dead.command("redrive")
@click.argument("row_ids", type=int, nargs=-1)
@click.option("--type", "type_name", help="Redrive dead rows of this type.")
@click.option("--all", "redrive_all", is_flag=True, help="Redrive every dead row.")
def dead_redrive(row_ids: tuple[int, ...], type_name: str | None, redrive_all: bool) -> None:
    """Put dead rows back in the queue (by id, by --type, or --all)."""
    if not row_ids and type_name is None and not redrive_all:
        raise click.UsageError("name row ids, --type TYPE or --all")
    settings = _settings()
    _require_schema(settings)
    count = _store(settings).redrive(list(row_ids) if row_ids else None, type_name=type_name)
    click.echo(f"redriven {count} row(s)")


@main.command()
@click.option(
    "--older-than-seconds", type=click.FloatRange(0), default=None, help="Default: retention."
)
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice(TERMINAL_STATUSES), help="Repeatable."
)
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True)
def purge(older_than_seconds: float | None, statuses: tuple[str, ...], batch: int) -> None:
    """Delete finished rows (sent, dead, expired) in bounded batches. Ctrl-C stops safely."""
    settings = _settings()
    _require_schema(settings)
    store = _store(settings)
    age = settings.row_retention_seconds if older_than_seconds is None else older_than_seconds
    total = 0
    try:
        while True:
            deleted = store.purge(
                older_than_seconds=age, statuses=statuses or TERMINAL_STATUSES, limit=batch
            )
            total += deleted
            if deleted < batch:
                break
    except KeyboardInterrupt:
        click.echo(f"interrupted; purged {total} row(s) so far (each batch is its own transaction)")
        sys.exit(130)
    click.echo(f"purged {total} row(s)")


@main.command()
@click.option("--decision", type=click.Choice(["grant", "deny"]))
@click.option("--channel-prefix", help="Only channels starting with this.")
@click.option("--since-minutes", type=click.FloatRange(0), help="Only the last N minutes.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--json", "as_json", is_flag=True)
def audit(
    decision: str | None,
    channel_prefix: str | None,
    since_minutes: float | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """Channel authorization decisions (grants and denials), newest first."""
    settings = _settings()
    _require_schema(settings)
    since = (
        dt.datetime.now(dt.UTC) - dt.timedelta(minutes=since_minutes)
        if since_minutes is not None
        else None
    )
    rows = list_audit(
        create_engine(settings.database_url),
        decision=decision,
        channel_prefix=channel_prefix,
        since=since,
        limit=limit,
        offset=offset,
    )
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=2))
        return
    for row in rows:
        click.echo(
            f"{row['at']:%Y-%m-%d %H:%M:%S}  {row['decision']:<5}  {row['user_ref'] or '-'}  "
            f"{row['channel']}  {row['reason']}"
        )


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def demo(args: tuple[str, ...]) -> None:
    """Run the pharmacy example end to end (needs the source tree and Node.js)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "examples" / "pharmacy" / "demo.py").is_file():
        raise click.ClickException("the demo needs the pusher-outbox source tree (examples/)")
    # Replace this process so Ctrl-C reaches the demo alone and its cleanup runs.
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "examples.pharmacy.demo", *args])  # noqa: S606


if __name__ == "__main__":
    main()
