"""The test kit itself: soketi runner, websocket subscriber and service fixtures.

Publishing here goes through the official ``pusher`` SDK on purpose: these tests pin what the
kit observes from a real server, independently of the product's own publisher.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pusher
import pytest
import redis
import sqlalchemy

from outbox.testing.soketi import Soketi, SoketiNotInstalledError
from outbox.testing.subscriber import Subscriber, SubscriptionError

MakeSubscriber = Callable[..., Subscriber]


@pytest.fixture
def sdk(soketi: Soketi) -> pusher.Pusher:
    """The official SDK pointed at the session's soketi, with a fresh encryption key."""
    return pusher.Pusher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret=soketi.secret,
        host=soketi.host,
        port=soketi.port,
        ssl=False,
        encryption_master_key_base64=base64.b64encode(os.urandom(32)).decode(),
    )


def sdk_authorize(sdk: pusher.Pusher) -> Callable[[str, str], dict[str, Any]]:
    def authorize(socket_id: str, channel: str) -> dict[str, Any]:
        auth: dict[str, Any] = sdk.authenticate(channel=channel, socket_id=socket_id)
        return auth

    return authorize


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def test_soketi_answers_with_its_own_credentials(soketi: Soketi) -> None:
    status, body = soketi.api_get("/channels")

    assert soketi.is_running
    assert status == 200
    assert isinstance(body, dict)
    assert "channels" in body
    assert soketi.env() == {
        "PUSHER_APP_ID": soketi.app_id,
        "PUSHER_KEY": soketi.key,
        "PUSHER_SECRET": soketi.secret,
        "PUSHER_HOST": "127.0.0.1",
        "PUSHER_PORT": str(soketi.port),
        "PUSHER_SCHEME": "http",
    }
    assert soketi.secret not in repr(soketi)


def test_pusher_env_sets_settings_variables_and_a_32_byte_master_key(
    pusher_env: dict[str, str], soketi: Soketi
) -> None:
    assert {k: os.environ[k] for k in pusher_env} == pusher_env
    assert pusher_env["PUSHER_PORT"] == str(soketi.port)
    assert len(base64.b64decode(pusher_env["PUSHER_ENCRYPTION_MASTER_KEY_BASE64"])) == 32


def test_subscriber_receives_public_private_and_decrypted_encrypted_events(
    sdk: pusher.Pusher, make_subscriber: MakeSubscriber
) -> None:
    public, private, encrypted = (
        unique("public-kit-"),
        unique("private-kit-"),
        unique("private-encrypted-kit-"),
    )
    canary = f"CANARY-{uuid.uuid4().hex}"
    subscriber = make_subscriber()
    authorize = sdk_authorize(sdk)
    subscriber.subscribe(public)
    subscriber.subscribe(private, authorize)
    subscriber.subscribe(encrypted, authorize)

    assert sdk.trigger(public, "kit-public", {"n": 1}) == {"ok": True}
    assert sdk.trigger(private, "kit-private", {"n": 2}) == {"ok": True}
    assert sdk.trigger(encrypted, "kit-encrypted", {"secret": canary}) == {"ok": True}
    events = subscriber.wait_for(3, timeout=10)

    by_channel = {event.channel: event for event in events}
    assert [(e.event, e.data, e.decrypted) for e in events] == [
        ("kit-public", {"n": 1}, False),
        ("kit-private", {"n": 2}, False),
        ("kit-encrypted", {"secret": canary}, True),
    ]
    assert by_channel[encrypted].decrypt_error is None
    assert set(json.loads(by_channel[encrypted].raw_data)) == {"nonce", "ciphertext"}
    assert canary not in "".join(subscriber.frames)
    assert any(encrypted in frame for frame in subscriber.frames)


def test_event_that_does_not_decrypt_is_recorded_with_an_error(
    sdk: pusher.Pusher, soketi: Soketi, make_subscriber: MakeSubscriber
) -> None:
    """A publisher using another master key produces ciphertext the subscriber cannot open."""
    channel = unique("private-encrypted-kit-")
    subscriber = make_subscriber()
    subscriber.subscribe(channel, sdk_authorize(sdk))
    other_key = pusher.Pusher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret=soketi.secret,
        host=soketi.host,
        port=soketi.port,
        ssl=False,
        encryption_master_key_base64=base64.b64encode(os.urandom(32)).decode(),
    )

    other_key.trigger(channel, "kit-garbled", {"n": 1})
    sdk.trigger(channel, "kit-fine", {"n": 2})
    first, second = subscriber.wait_for(2, timeout=10)

    assert (first.decrypted, first.data, first.plaintext) == (False, None, None)
    assert first.decrypt_error is not None
    assert (second.decrypted, second.data) == (True, {"n": 2})


def test_subscription_with_a_bad_signature_is_refused(make_subscriber: MakeSubscriber) -> None:
    """soketi answers ``pusher:subscription_error`` with data
    ``{"type": "AuthError", "error": "The connection is unauthorized.", "status": 401}``."""
    subscriber = make_subscriber()

    with pytest.raises(SubscriptionError, match="AuthError"):
        subscriber.subscribe(unique("private-kit-"), lambda _s, _c: {"auth": "app-key:00"})
    assert subscriber.errors[-1]["data"]["status"] == 401


def test_oversize_event_is_refused_with_http_200_and_a_413_body(
    sdk: pusher.Pusher, make_subscriber: MakeSubscriber
) -> None:
    """Observed with soketi 1.6.1 and ``SOKETI_EVENT_MAX_SIZE_IN_KB=10``.

    The limit is on the data string in KiB: 10,240 bytes pass, 10,241 bytes are refused. The
    refusal comes back as HTTP **200** with the body
    ``{"error": "The event data should be less than 10 KB.", "code": 413}``, which the SDK
    returns as a normal result: a caller must read ``code`` to see the failure. Nothing is
    delivered. (A bad signature is the same shape: 200 with ``{"error": "The secret
    authentication failed", "code": 401}``; an unknown app id gives ``"code": 404``.)
    """
    channel = unique("public-kit-")
    subscriber = make_subscriber()
    subscriber.subscribe(channel)

    # The SDK sends a str as the data string itself (no JSON encoding).
    largest = sdk.trigger(channel, "kit-size", "x" * 10_240)
    too_large = sdk.trigger(channel, "kit-size", "x" * 10_241)
    events = subscriber.wait_for(1, timeout=10)

    assert largest == {"ok": True}
    assert too_large == {"error": "The event data should be less than 10 KB.", "code": 413}
    assert len(events) == 1
    assert len(events[0].raw_data) == 10_240


def test_request_with_a_bad_secret_is_refused_with_http_200_and_a_401_body(
    soketi: Soketi,
) -> None:
    wrong = pusher.Pusher(
        app_id=soketi.app_id,
        key=soketi.key,
        secret="not-the-secret",
        host=soketi.host,
        port=soketi.port,
        ssl=False,
    )

    assert wrong.trigger(unique("public-kit-"), "kit", {}) == {
        "error": "The secret authentication failed",
        "code": 401,
    }


def test_restart_keeps_port_and_subscriber_reconnects() -> None:
    with Soketi() as server:
        port = server.port
        sdk = pusher.Pusher(
            app_id=server.app_id,
            key=server.key,
            secret=server.secret,
            host=server.host,
            port=server.port,
            ssl=False,
        )
        channel = unique("private-kit-")
        with Subscriber(server.ws_url, server.key, timeout_seconds=10) as subscriber:
            subscriber.subscribe(channel, sdk_authorize(sdk))
            first_socket = subscriber.socket_id

            server.restart()
            subscriber.reconnect()
            sdk.trigger(channel, "kit-after-restart", {"n": 1})
            (event,) = subscriber.wait_for(1, timeout=10)

        assert server.port == port
        assert subscriber.socket_id != first_socket
        assert event.data == {"n": 1}
    assert not server.is_running


def test_stop_leaves_no_process_behind() -> None:
    server = Soketi().start()
    pid = server.pid
    assert pid is not None

    server.close()

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_node_modules_tells_to_run_make_install(tmp_path: Path) -> None:
    with pytest.raises(SoketiNotInstalledError, match="make install"):
        Soketi(root=tmp_path).start()


def test_database_url_is_a_fresh_migrated_database(
    database_url: str, engine: sqlalchemy.Engine
) -> None:
    with engine.begin() as conn:
        version = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
        assert version.scalar_one()
        tables = set(sqlalchemy.inspect(conn).get_table_names())
        # Seen by the next test if databases leaked between tests.
        conn.execute(sqlalchemy.text("CREATE TABLE kit_marker (id INTEGER)"))
    assert "outbox_events" in tables
    assert "kit_marker" not in tables
    assert database_url.startswith(("sqlite:///", "postgresql+psycopg://"))


def test_databases_are_not_shared_between_tests(engine: sqlalchemy.Engine) -> None:
    with engine.connect() as conn:
        tables = set(sqlalchemy.inspect(conn).get_table_names())
        rows = conn.execute(sqlalchemy.text("SELECT count(*) FROM outbox_events")).scalar_one()
    assert "kit_marker" not in tables
    assert rows == 0


def test_redis_url_is_an_empty_dedicated_database(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert redis_url.endswith("/13")
        assert client.dbsize() == 0
        client.set("kit-marker", "1")  # seen by the next test if the flush failed
    finally:
        client.close()


def test_redis_database_is_flushed_between_tests(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()
