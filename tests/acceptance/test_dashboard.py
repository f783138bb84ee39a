"""`outbox dashboard` as a user runs it: a subprocess, curl-like requests and a real browser.

The browser is Debian's chromium (``/usr/bin/chromium``) driven by Playwright; nothing is
downloaded. Without it the browser test skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import new_opaque_id
from outbox.errors import PermanentPublishError
from outbox.models import events
from outbox.relay import Relay
from outbox.store import Store
from tests.conftest import REPO_ROOT
from tests.integration.helpers import ORDER_CREATED, ORDER_DETAILS, FakePublisher, make_outbox

OUTBOX = str(Path(sys.executable).with_name("outbox"))
CANARY = "CANARY-dashboard-Patient-Doe"
TOKEN = "dashboard-test-token-" + "x7Kq2mZp9"
ARTIFACTS = REPO_ROOT / "artifacts"
START_SECONDS = 20
UPDATE_MS = 8_000


def _env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PUSHER_"))}
    env["OUTBOX_DATABASE_URL"] = database_url
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT (Ctrl-C), then SIGKILL if it does not stop in time; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)


@dataclass
class Dashboard:
    url: str
    proc: subprocess.Popen[bytes]
    output: Path

    def get(self, path: str, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.get(self.url + path, headers=headers, timeout=10, **kwargs)


@pytest.fixture
def dashboard(database_url: str, tmp_path: Path) -> Iterator[Dashboard]:
    """`outbox dashboard` on a free port with a token (from the environment), stopped after."""
    port = _free_port()
    output = tmp_path / "dashboard.log"
    with output.open("wb") as log:
        proc = subprocess.Popen(
            [OUTBOX, "dashboard", "--port", str(port)],
            env=_env(database_url, OUTBOX_DASHBOARD_TOKEN=TOKEN),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Dashboard(url=f"http://127.0.0.1:{port}", proc=proc, output=output)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited with {proc.returncode}: {output.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if server.get("/api/stats").status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not ready after {START_SECONDS}s: {output.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        returncode = _stop(proc)
    text = output.read_text()
    assert returncode == 0, text
    assert "stopped" in text
    assert TOKEN not in text


# -- data ----------------------------------------------------------------------------------


def enqueue(engine: sa.Engine, type_: Any, n: int) -> None:
    outbox = make_outbox()
    pharmacy = new_opaque_id("pha")
    with Session(engine) as session, session.begin():
        for _ in range(n):
            if type_ is ORDER_DETAILS:
                data = {"order_id": new_opaque_id("ord"), "patient": CANARY, "medication": CANARY}
            else:
                data = {"order_id": new_opaque_id("ord"), "status": "new", "items": 1}
            outbox.enqueue(session, type_, ids={"pharmacy_id": pharmacy}, data=data)


def deliver(engine: sa.Engine) -> None:
    Relay(store=Store(engine), publisher=FakePublisher()).drain(max_seconds=5)


def seed(engine: sa.Engine) -> None:
    """2 dead (PHI payloads kept for redrive), 3 sent, 4 pending, one live worker."""
    enqueue(engine, ORDER_DETAILS, 2)
    Relay(
        store=Store(engine),
        publisher=FakePublisher(
            fail_for=lambda e: PermanentPublishError(
                "HTTP 400 from Pusher: request rejected as invalid", status=400
            )
        ),
    ).drain(max_seconds=5)
    enqueue(engine, ORDER_CREATED, 3)
    deliver(engine)
    enqueue(engine, ORDER_CREATED, 4)
    Store(engine).heartbeat(
        worker_id="celery@relay-1",
        host="relay-1",
        pid=4242,
        version="0.1.0",
        started_at=dt.datetime.now(dt.UTC),
    )


def table_counts(engine: sa.Engine) -> dict[str, int]:
    """Counts by status straight from the table (not through the code under test)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(events.c.status, sa.func.count()).group_by(events.c.status))
        return {status: int(count) for status, count in rows}


def dead_event_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(events.c.event_id).where(events.c.status == "dead")))


# -- HTTP ----------------------------------------------------------------------------------


def test_every_route_needs_the_token(dashboard):
    for path in ("/", "/api/stats", "/api/dead", "/api/info", "/metrics", "/nowhere"):
        missing = dashboard.get(path, token=None)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert dashboard.get(path, token="wrong-" + TOKEN).status_code == 401, path
        assert TOKEN not in missing.text
    assert httpx.get(f"{dashboard.url}/?token=wrong", timeout=10).status_code == 401
    # ?token= opens the page only; API URLs never carry the token.
    assert httpx.get(f"{dashboard.url}/?token={TOKEN}", timeout=10).status_code == 200
    assert httpx.get(f"{dashboard.url}/api/stats?token={TOKEN}", timeout=10).status_code == 401


def test_api_stats_is_the_stats_json_document_and_metrics_are_prometheus(
    dashboard, engine, database_url
):
    seed(engine)
    api = dashboard.get("/api/stats")
    assert api.status_code == 200
    assert api.headers["content-type"] == "application/json"
    assert api.headers["cache-control"] == "no-store"
    cli = subprocess.run(
        [OUTBOX, "stats", "--json"],
        env=_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    from_api, from_cli = api.json(), json.loads(cli.stdout)
    assert set(from_api) == set(from_cli)
    for key in ("schema", "by_status", "by_type", "due_now", "retrying"):
        assert from_api[key] == from_cli[key], key
    assert from_api["by_status"] == {
        **dict.fromkeys(from_api["by_status"], 0),
        **table_counts(engine),
    }
    assert [w["worker_id"] for w in from_api["workers"]] == ["celery@relay-1"]

    dead = dashboard.get("/api/dead").json()["rows"]
    assert sorted(r["event_id"] for r in dead) == sorted(dead_event_ids(engine))
    assert set(dead[0]) == {"id", "event_id", "type_name", "attempts", "last_error", "finished_at"}

    metrics = dashboard.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'outbox_queue_events{status="dead"} 2.0' in metrics.text
    assert "outbox_workers_alive 1.0" in metrics.text
    for response in (api, metrics, dashboard.get("/api/dead"), dashboard.get("/")):
        assert CANARY not in response.text


def _run_dashboard(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OUTBOX, "dashboard", "--port", str(_free_port()), *args],
        env=_env(database_url, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_refuses_to_start_without_a_token_unless_loopback_and_no_auth(sqlite_database_url):
    no_token = _run_dashboard(sqlite_database_url)
    assert no_token.returncode != 0
    assert "OUTBOX_DASHBOARD_TOKEN" in no_token.stderr
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.com"):
        public = _run_dashboard(sqlite_database_url, "--no-auth", "--host", host)
        assert public.returncode != 0, host
        assert "not a loopback address" in public.stderr
    weak = _run_dashboard(sqlite_database_url, "--token", "weak-1234")
    assert weak.returncode != 0
    assert "16 characters" in weak.stderr
    assert "weak-1234" not in weak.stdout + weak.stderr
    assert "Traceback" not in no_token.stderr + public.stderr + weak.stderr


def test_no_auth_on_loopback_serves_loopback_host_names_only(sqlite_database_url, tmp_path):
    port = _free_port()
    with (tmp_path / "noauth.log").open("wb") as log:
        proc = subprocess.Popen(
            [OUTBOX, "dashboard", "--no-auth", "--port", str(port)],
            env=_env(sqlite_database_url),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/api/stats"
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert proc.poll() is None, (tmp_path / "noauth.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                response = httpx.get(url, timeout=5)
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert response.status_code == 200
        # A web page reaching 127.0.0.1 through DNS rebinding sends its own host name.
        rebound = httpx.get(url, headers={"Host": f"attacker.example:{port}"}, timeout=5)
        assert rebound.status_code == 401
    finally:
        assert _stop(proc) == 0


# -- browser (fixture `browser` in tests/acceptance/conftest.py) ---------------------------


def test_page_shows_the_table_and_updates_live_without_payloads(dashboard, engine, browser):
    from playwright.sync_api import expect

    seed(engine)
    counts = table_counts(engine)
    assert counts == {"dead": 2, "sent": 3, "pending": 4}
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    try:
        page.goto(f"{dashboard.url}/?token={TOKEN}", timeout=15_000)
        for status in ("pending", "in_flight", "sent", "dead", "expired"):
            expect(page.locator(f"#count-{status}")).to_have_text(
                str(counts.get(status, 0)), timeout=UPDATE_MS
            )
        expect(page.locator("#status")).to_have_attribute("data-state", "live")
        created = page.locator('#by-type tr[data-type="order.created"] td')
        expect(created).to_have_text(["order.created", "4", "0", "3", "0", "0"])
        details = page.locator('#by-type tr[data-type="order.details"] td')
        expect(details).to_have_text(["order.details", "0", "0", "0", "2", "0"])
        dead_table = page.locator("#dead tbody")
        for event_id in dead_event_ids(engine):
            expect(dead_table).to_contain_text(event_id)
        expect(dead_table).to_contain_text("HTTP 400")
        expect(page.locator("#workers tbody")).to_contain_text("celery@relay-1")

        page.evaluate("window.__notReloaded = true")
        enqueue(engine, ORDER_CREATED, 5)
        deliver(engine)
        assert table_counts(engine) == {"dead": 2, "sent": 12}
        expect(page.locator("#count-sent")).to_have_text("12", timeout=UPDATE_MS)
        expect(page.locator("#count-pending")).to_have_text("0", timeout=UPDATE_MS)
        expect(created).to_have_text(["order.created", "0", "0", "12", "0", "0"])
        assert page.evaluate("window.__notReloaded") is True
        expect(page.locator("#chart-throughput polyline")).to_have_count(1, timeout=UPDATE_MS)
        expect(page.locator("#chart-lag polyline")).to_have_count(1)

        assert CANARY not in page.content()
        assert CANARY not in page.locator("body").inner_text()
        assert problems == []

        ARTIFACTS.mkdir(exist_ok=True)
        page.wait_for_timeout(2_500)  # one more poll: a chart with a few points
        kind = engine.dialect.name
        page.screenshot(path=str(ARTIFACTS / f"dashboard-{kind}.png"), full_page=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    finally:
        context.close()
