"""The pharmacy example: the end-to-end demo as users run it, and the app's privacy promises.

The demo runs as a subprocess exactly like ``make demo`` (soketi, a real Celery worker and beat,
uvicorn, websocket subscribers). The app tests serve the real FastAPI app with uvicorn on a
migrated SQLite database and talk HTTP to it; no Pusher server is needed for them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from examples.pharmacy import db
from examples.pharmacy.app import create_app
from examples.pharmacy.demo import FIRST_NAMES, LAST_NAMES, PRESCRIPTIONS
from outbox import load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^delivered (\d+)/(\d+) events \((\d+) decrypted, (\d+) fetched by id\)$")
DEMO_TIMEOUT_SECONDS = 150


def _require_soketi() -> None:
    missing = shutil.which("node") is None or not (REPO_ROOT / "node_modules/.bin/soketi").exists()
    if missing:
        message = "node or node_modules/.bin/soketi missing: run `make install`"
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
        pytest.skip(message)


# --- the demo, end to end ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.soketi
@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + 30)
def test_demo_delivers_every_event_intact_and_prints_the_summary_last() -> None:
    _require_soketi()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PUSHER_"))}

    result = subprocess.run(
        [sys.executable, "-m", "examples.pharmacy.demo", "--orders", "10", "--timeout", "90"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.strip().splitlines()
    match = SUMMARY.match(lines[-1])
    assert match is not None, output
    delivered, expected, decrypted, fetched = map(int, match.groups())
    assert (delivered, expected, decrypted, fetched) == (20, 20, 10, 10)
    # The demo's own output names orders by opaque id only.
    phi = [*LAST_NAMES, *(medication for medication, _, _ in PRESCRIPTIONS)]
    assert not [word for word in phi if word in output]
    assert not [name for name in FIRST_NAMES if f"{name} " in output]


@pytest.mark.slow
@pytest.mark.soketi
@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS)
def test_serve_mode_prints_the_page_with_tokens_and_stops_everything_on_ctrl_c() -> None:
    _require_soketi()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PUSHER_"))}
    demo = subprocess.Popen(
        [sys.executable, "-m", "examples.pharmacy.demo", "--serve", "--interval", "0.5"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while sum(" created for pha_" in line for line in lines) < 3:
            assert demo.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        output = "".join(lines)
        pages = re.findall(r"(http://127\.0\.0\.1:\d+)/#token=(tok_\S+)", output)
        assert len(pages) == 2, output
        assert re.search(r"/\?pharmacy=pha_\w+#token=tok_", output), output
        base_url, token = pages[0]
        with httpx.Client(timeout=10, trust_env=False) as client:
            assert "Pending orders" in client.get(f"{base_url}/").text
            listed = client.get(f"{base_url}/orders", headers={"Authorization": f"Bearer {token}"})
            assert listed.status_code == 200
            assert listed.json()["orders"], "orders are being created for both pharmacies"

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        code = demo.wait(timeout=60)
    finally:
        if demo.poll() is None:  # the test failed early: Ctrl-C, then SIGKILL (children die too)
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait(timeout=10)
        reader.join(10)
        if demo.stdout is not None:
            demo.stdout.close()

    output = "".join(lines)
    assert code == 0, output
    assert re.fullmatch(
        r"served \d+ orders on http://127\.0\.0\.1:\d+; stopped everything the demo started",
        lines[-1].strip(),
    ), output
    assert "stopped the worker, beat and app" in output
    with httpx.Client(timeout=2, trust_env=False) as client, pytest.raises(httpx.TransportError):
        client.get(f"{base_url}/healthz")
    phi = [*LAST_NAMES, *(medication for medication, _, _ in PRESCRIPTIONS)]
    assert not [word for word in phi if word in output]


# --- the app ---------------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    engine: sa.Engine
    seeded: db.Seeded
    kicks: list[list[int]]

    def as_user(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def pharmacy_ids(self) -> tuple[str, str]:
        first, second = self.seeded.pharmacies
        return first, second

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture
def served(sqlite_database_url: str) -> Iterator[Served]:
    """The app under uvicorn (in a thread) on a migrated SQLite database, with seeded users."""
    settings = load_settings(
        database_url=sqlite_database_url,
        pusher_app_id="12345",
        pusher_key="app-key",
        pusher_secret="app-secret-for-tests",
        pusher_host="127.0.0.1",
        pusher_port=9,
        pusher_scheme="http",
        pusher_encryption_master_key_base64=base64.b64encode(os.urandom(32)).decode(),
    )
    kicks: list[list[int]] = []
    app = create_app(settings, on_commit=lambda ids: kicks.append(list(ids)))
    seeded = db.seed(app.state.engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", ws="none", http="h11")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    engine = sa.create_engine(sqlite_database_url)
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start within 10s"
        yield Served(f"http://127.0.0.1:{port}", engine, seeded, kicks)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        engine.dispose()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, trust_env=False) as http:
        yield http


def order_body(pharmacy_id: str, quantity: int = 28) -> dict[str, Any]:
    return {
        "pharmacy_id": pharmacy_id,
        "patient_name": "Avery Quillfeather",
        "medication": "Lisinopril 10 mg tablets",
        "dosage": "1 tablet once a day",
        "quantity": quantity,
    }


def test_order_refused_by_the_database_after_enqueue_leaves_no_outbox_row(
    served: Served, client: httpx.Client
) -> None:
    pharmacy_id, _ = served.pharmacy_ids
    intake = served.as_user(served.seeded.intake.token)

    # quantity 0 passes the request model and the enqueue, then fails the table's CHECK.
    refused = client.post(f"{served.url}/orders", json=order_body(pharmacy_id, 0), headers=intake)

    assert refused.status_code == 422
    assert "nothing was saved or sent" in refused.text
    assert served.count("outbox_events") == 0
    assert served.count(db.Order.__tablename__) == 0
    assert served.kicks == []

    accepted = client.post(f"{served.url}/orders", json=order_body(pharmacy_id), headers=intake)

    assert accepted.status_code == 201
    assert served.count("outbox_events") == 2
    assert served.count(db.Order.__tablename__) == 1
    assert [len(ids) for ids in served.kicks] == [2]


def test_invalid_order_is_refused_without_echoing_its_values(
    served: Served, client: httpx.Client
) -> None:
    pharmacy_id, _ = served.pharmacy_ids
    body = {**order_body(pharmacy_id), "quantity": "Avery Quillfeather", "dosage": "x" * 101}

    response = client.post(
        f"{served.url}/orders", json=body, headers=served.as_user(served.seeded.intake.token)
    )

    assert response.status_code == 422
    assert {tuple(error["loc"]) for error in response.json()["detail"]} == {
        ("body", "quantity"),
        ("body", "dosage"),
    }
    assert "Quillfeather" not in response.text
    assert "xxxx" not in response.text
    assert served.count("outbox_events") == 0


def test_committed_order_enqueues_only_opaque_ids_outside_the_encrypted_channel(
    served: Served, client: httpx.Client
) -> None:
    pharmacy_id, _ = served.pharmacy_ids
    body = order_body(pharmacy_id)

    response = client.post(
        f"{served.url}/orders", json=body, headers=served.as_user(served.seeded.intake.token)
    )

    assert response.status_code == 201
    with served.engine.connect() as conn:
        rows = {
            row.type_name: row
            for row in conn.execute(
                sa.text("SELECT type_name, channel, event_name, data, encrypted FROM outbox_events")
            )
        }
    created, details = rows["order.created"], rows["order.details"]
    assert created.channel == f"private-pharmacy-{pharmacy_id}"
    assert not created.encrypted
    assert body["patient_name"] not in created.data
    assert body["medication"] not in created.data
    assert response.json()["order_id"] in created.data
    assert details.channel == f"private-encrypted-pharmacy-{pharmacy_id}"
    assert details.encrypted
    for row in (created, details):
        assert body["patient_name"] not in row.channel + row.event_name


def test_pharmacist_fetches_own_orders_and_never_another_pharmacys(
    served: Served, client: httpx.Client
) -> None:
    first, second = served.pharmacy_ids
    created = client.post(
        f"{served.url}/orders",
        json=order_body(first),
        headers=served.as_user(served.seeded.intake.token),
    ).json()
    url = f"{served.url}/orders/{created['order_id']}"

    own = client.get(url, headers=served.as_user(served.seeded.pharmacists[first].token))
    other = client.get(url, headers=served.as_user(served.seeded.pharmacists[second].token))
    anonymous = client.get(url)

    assert own.status_code == 200
    assert own.json()["patient_name"] == "Avery Quillfeather"
    assert other.status_code == 404
    assert anonymous.status_code == 401


def test_pharmacist_may_authorize_own_channels_only(served: Served, client: httpx.Client) -> None:
    first, second = served.pharmacy_ids
    own_token = served.seeded.pharmacists[first].token
    other_token = served.seeded.pharmacists[second].token
    private, encrypted = f"private-pharmacy-{first}", f"private-encrypted-pharmacy-{first}"

    def authorize(token: str, channel: str) -> httpx.Response:
        return client.post(
            f"{served.url}/pusher/auth",
            data={"socket_id": "1234.5678", "channel_name": channel},
            headers=served.as_user(token),
        )

    granted = authorize(own_token, private)
    granted_encrypted = authorize(own_token, encrypted)
    refused = [authorize(other_token, private), authorize(other_token, encrypted)]

    assert granted.status_code == 200
    assert granted.json()["auth"].startswith("app-key:")
    assert granted_encrypted.status_code == 200
    assert len(base64.b64decode(granted_encrypted.json()["shared_secret"])) == 32
    for response in refused:
        assert response.status_code == 403
        assert "auth" not in response.json()
        assert "shared_secret" not in response.text
    with served.engine.connect() as conn:
        decisions = conn.execute(
            sa.text("SELECT decision, count(*) FROM outbox_audit GROUP BY decision")
        ).all()
    assert dict(decisions) == {"grant": 2, "deny": 2}


@pytest.mark.parametrize(
    ("socket_id", "channel_name"),
    [
        pytest.param("1234.5678", "private-pharmacy-jane.doe@example.com", id="email"),
        pytest.param("1234.5678", "private-pharmacy-555-12-3456", id="ssn-like"),
        pytest.param("1234.5678", "private-pharmacy-pha_x\nfoo", id="newline"),
        pytest.param("1234.5678", "private-pharmacy-pha_AAAA/../x", id="path"),
        pytest.param("1234.5678", "private-pharmacy-" + "a" * 200, id="too-long"),
        pytest.param("1234.5678", "pharmacy-public", id="public"),
        pytest.param("1234.5678", "", id="empty"),
        pytest.param("not-a-socket", "private-pharmacy-{own}", id="bad-socket-id"),
    ],
)
def test_crafted_authorization_requests_are_refused_unsigned(
    served: Served, client: httpx.Client, socket_id: str, channel_name: str
) -> None:
    first, _ = served.pharmacy_ids
    token = served.seeded.pharmacists[first].token

    response = client.post(
        f"{served.url}/pusher/auth",
        data={"socket_id": socket_id, "channel_name": channel_name.replace("{own}", first)},
        headers=served.as_user(token),
    )

    assert response.status_code == 400
    assert "auth" not in response.json()
    assert "app-key:" not in response.text


@pytest.mark.parametrize(
    "channel_name",
    [
        pytest.param("private-pharmacy-{own},private-pharmacy-{other}", id="two-channels"),
        pytest.param("private-pharmacy-{own}-x", id="suffix"),
        pytest.param("private-encrypted-order-{own}", id="undeclared-template"),
    ],
)
def test_channels_outside_the_declared_templates_are_forbidden(
    served: Served, client: httpx.Client, channel_name: str
) -> None:
    first, second = served.pharmacy_ids
    token = served.seeded.pharmacists[first].token

    response = client.post(
        f"{served.url}/pusher/auth",
        data={
            "socket_id": "1234.5678",
            "channel_name": channel_name.format(own=first, other=second),
        },
        headers=served.as_user(token),
    )

    assert response.status_code == 403
    assert "auth" not in response.json()


# --- catch-up, order list and the page -----------------------------------------------------


def deliver_all(served: Served) -> None:
    """What the relay does, with a publisher that accepts everything (no Pusher server here)."""
    from outbox.relay import Relay
    from outbox.store import Store
    from tests.integration.helpers import FakePublisher

    relay = Relay(store=Store(served.engine), publisher=FakePublisher(), publish_concurrency=1)
    try:
        relay.drain(max_seconds=5)
    finally:
        relay.close()


def test_catch_up_returns_missed_events_to_the_pharmacist_only(
    served: Served, client: httpx.Client
) -> None:
    first, second = served.pharmacy_ids
    intake = served.as_user(served.seeded.intake.token)
    order_ids = [
        client.post(f"{served.url}/orders", json=order_body(first), headers=intake).json()[
            "order_id"
        ]
        for _ in range(3)
    ]
    url = f"{served.url}/pusher/catchup"
    own = served.as_user(served.seeded.pharmacists[first].token)
    created, details = f"private-pharmacy-{first}", f"private-encrypted-pharmacy-{first}"

    pending = client.get(url, params={"channel": created, "after_seq": 0}, headers=own)
    deliver_all(served)
    after_one = client.get(url, params={"channel": created, "after_seq": 1}, headers=own)
    encrypted = client.get(url, params={"channel": details, "after_seq": 0}, headers=own)

    assert pending.status_code == 200
    assert pending.json()["events"] == []
    assert pending.json()["complete"] is False  # not published yet: it will arrive live
    body = after_one.json()
    assert (body["last_seq"], body["complete"], body["reset"]) == (3, True, False)
    assert [(e["seq"], e["event"], e["data"]) for e in body["events"]] == [
        (2, "order.created", {"order_id": order_ids[1], "status": "pending"}),
        (3, "order.created", {"order_id": order_ids[2], "status": "pending"}),
    ]
    assert after_one.headers["cache-control"] == "no-store"
    # The encrypted channel's payloads (PHI) were erased once sent: ids and positions only.
    assert [(e["seq"], e.get("erased")) for e in encrypted.json()["events"]] == [
        (1, True),
        (2, True),
        (3, True),
    ]
    assert "Quillfeather" not in encrypted.text
    other = served.as_user(served.seeded.pharmacists[second].token)
    for channel in (created, details):
        refused = client.get(url, params={"channel": channel, "after_seq": 0}, headers=other)
        assert refused.status_code == 403
        assert "events" not in refused.json()
    assert client.get(url, params={"channel": created, "after_seq": 0}).status_code == 401
    bad = client.get(url, params={"channel": created, "after_seq": "-1"}, headers=own)
    assert bad.status_code == 400


def test_order_list_holds_own_pending_orders_and_the_channel_positions_read_before_them(
    served: Served, client: httpx.Client
) -> None:
    first, second = served.pharmacy_ids
    intake = served.as_user(served.seeded.intake.token)
    for pharmacy_id in (first, first, second):
        client.post(f"{served.url}/orders", json=order_body(pharmacy_id), headers=intake)

    listed = client.get(
        f"{served.url}/orders", headers=served.as_user(served.seeded.pharmacists[first].token)
    )
    me = client.get(
        f"{served.url}/me", headers=served.as_user(served.seeded.pharmacists[first].token)
    )

    assert listed.status_code == 200
    body = listed.json()
    assert [order["pharmacy_id"] for order in body["orders"]] == [first, first]
    assert body["positions"] == {
        f"private-pharmacy-{first}": 2,
        f"private-encrypted-pharmacy-{first}": 2,
    }
    assert me.json()["pharmacy"] == {
        "pharmacy_id": first,
        "name": served.seeded.pharmacies[first],
        "channels": {
            "orders": f"private-pharmacy-{first}",
            "details": f"private-encrypted-pharmacy-{first}",
        },
    }
    assert client.get(f"{served.url}/orders", headers=intake).status_code == 403
    assert client.get(f"{served.url}/orders").status_code == 401


def test_page_and_scripts_are_served_with_a_strict_policy_and_no_secrets(
    served: Served, client: httpx.Client
) -> None:
    page = client.get(f"{served.url}/")
    script = client.get(f"{served.url}/static/pharmacy.js")
    kit = client.get(f"{served.url}/kit/pusher-outbox.js")
    config = client.get(f"{served.url}/pusher/config")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self' ws://127.0.0.1:9" in policy
    assert page.headers["referrer-policy"] == "no-referrer"  # the page's URL carries a token
    assert script.headers["content-type"].startswith("text/javascript")
    assert "export function subscribe" in kit.text
    assert config.json() == {
        "key": "app-key",
        "cluster": "mt1",
        "wsHost": "127.0.0.1",
        "wsPort": 9,
        "wssPort": 9,
        "forceTLS": False,
        "enabledTransports": ["ws"],
    }
    assert "secret" not in config.text
    for path in ("/static/app.py", "/static/..%2Fapp.py", "/static/index.html"):
        assert client.get(f"{served.url}{path}").status_code == 404
    if (REPO_ROOT / "node_modules/pusher-js").is_dir():
        vendor = client.get(f"{served.url}/vendor/pusher-with-encryption.min.js")
        assert vendor.status_code == 200
        assert "Pusher" in vendor.text[:2000]
