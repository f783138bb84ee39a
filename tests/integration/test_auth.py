"""Channel authorization: deny by default, validate before signing, audit every decision."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pusher
import pytest
import sqlalchemy as sa

from outbox import AuthorizationError, ChannelAuthorizer, NotificationType, OpaqueId, new_opaque_id
from outbox.models import audit
from tests.integration.helpers import make_outbox

KEY = base64.b64encode(b"m" * 32).decode()
PHARMACY = new_opaque_id("pha")
OTHER = new_opaque_id("pha")
SOCKET = "1234.5678"
PRESENCE = NotificationType(
    name="pharmacy.staff",
    event="staff.changed",
    channel="presence-pharmacy-{pharmacy_id}",
    fields={"user_id": OpaqueId("usr")},
    channel_ids={"pharmacy_id": "pha"},
)


def client(master_key=KEY):
    return pusher.Pusher(
        app_id="1",
        key="app-key",
        secret="app-secret",
        host="127.0.0.1",
        encryption_master_key_base64=master_key,
    )


@pytest.fixture
def authorizer(engine):
    outbox = make_outbox()
    outbox.register(PRESENCE)
    return ChannelAuthorizer(
        outbox=outbox,
        pusher_client=client(),
        may_subscribe=lambda user, channel, nt, ids: ids["pharmacy_id"] == user["pharmacy"],
        engine=engine,
        user_ref=lambda user: user["ref"],
        presence_data=lambda user: {"user_id": user["ref"], "user_info": {"role": "pharmacist"}},
    )


USER = {"pharmacy": PHARMACY, "ref": new_opaque_id("usr")}


def audit_rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(audit).order_by(audit.c.id)).all()


def expected_signature(string_to_sign):
    return hmac.new(b"app-secret", string_to_sign.encode(), hashlib.sha256).hexdigest()


def test_a_grant_signs_exactly_the_requested_channel(authorizer, engine):
    channel = f"private-pharmacy-{PHARMACY}"
    body = authorizer.authorize(USER, socket_id=SOCKET, channel_name=channel)
    assert body == {"auth": "app-key:" + expected_signature(f"{SOCKET}:{channel}")}
    [row] = audit_rows(engine)
    assert (row.decision, row.channel, row.user_ref, row.socket_id) == (
        "grant",
        channel,
        USER["ref"],
        SOCKET,
    )


def test_encrypted_grant_includes_the_sdk_shared_secret_as_text(authorizer):
    channel = f"private-encrypted-pharmacy-{PHARMACY}"
    body = authorizer.authorize(USER, socket_id=SOCKET, channel_name=channel)
    secret = hashlib.sha256(channel.encode() + b"m" * 32).digest()
    assert body["shared_secret"] == base64.b64encode(secret).decode()
    assert body["auth"] == "app-key:" + expected_signature(f"{SOCKET}:{channel}")


def test_presence_channels_carry_channel_data(authorizer):
    body = authorizer.authorize(
        USER, socket_id=SOCKET, channel_name=f"presence-pharmacy-{PHARMACY}"
    )
    assert '"user_id"' in body["channel_data"]


@pytest.mark.parametrize(
    ("socket_id", "channel", "status"),
    [
        ("1234", f"private-pharmacy-{PHARMACY}", 400),
        ("1234.5678:private-x", f"private-pharmacy-{PHARMACY}", 400),
        (None, f"private-pharmacy-{PHARMACY}", 400),
        (SOCKET, None, 400),
        (SOCKET, "private-pharmacy-jane@example.com", 400),
        (SOCKET, f"private-pharmacy-{PHARMACY} extra", 400),
        (SOCKET, f"public-{PHARMACY}", 400),
        (SOCKET, f"private-pharmacy-{PHARMACY}-x", 403),  # not a declared template
        (SOCKET, f"private-other-{PHARMACY}", 403),
        (SOCKET, f"private-pharmacy-{OTHER}", 403),  # the application's rule says no
        (SOCKET, f"private-encrypted-pharmacy-{OTHER}", 403),
        (SOCKET, "private-pharmacy-pha_12345678901234567890", 400),  # digits only: not opaque
    ],
)
def test_bad_or_unauthorized_requests_get_no_signature(
    authorizer, engine, socket_id, channel, status
):
    response = authorizer.handle(USER, {"socket_id": socket_id, "channel_name": channel})
    assert response.status == status
    assert "auth" not in response.body
    assert "error" in response.body
    [row] = audit_rows(engine)
    assert row.decision == "deny"
    assert "jane@example.com" not in str(tuple(row))


def test_a_failing_rule_denies(engine):
    def broken(*args):
        raise RuntimeError("db down")

    authorizer = ChannelAuthorizer(
        outbox=make_outbox(), pusher_client=client(), may_subscribe=broken
    )
    with pytest.raises(AuthorizationError) as info:
        authorizer.authorize(USER, socket_id=SOCKET, channel_name=f"private-pharmacy-{PHARMACY}")
    assert info.value.status == 403


def test_truthy_but_not_true_denies():
    authorizer = ChannelAuthorizer(
        outbox=make_outbox(), pusher_client=client(), may_subscribe=lambda *a: "yes"
    )
    with pytest.raises(AuthorizationError):
        authorizer.authorize(USER, socket_id=SOCKET, channel_name=f"private-pharmacy-{PHARMACY}")


def test_encrypted_channels_are_refused_without_a_master_key():
    authorizer = ChannelAuthorizer(
        outbox=make_outbox(encryption_enabled=False),
        pusher_client=client(master_key=None),
        may_subscribe=lambda *a: True,
    )
    response = authorizer.handle(
        USER, {"socket_id": SOCKET, "channel_name": f"private-encrypted-pharmacy-{PHARMACY}"}
    )
    assert response.status == 503
    assert "auth" not in response.body


def test_phi_shaped_user_references_are_redacted_in_the_audit(engine):
    authorizer = ChannelAuthorizer(
        outbox=make_outbox(),
        pusher_client=client(),
        may_subscribe=lambda *a: True,
        engine=engine,
        user_ref=lambda user: "jane.roe@example.com",
    )
    authorizer.authorize(USER, socket_id=SOCKET, channel_name=f"private-pharmacy-{PHARMACY}")
    [row] = audit_rows(engine)
    assert row.user_ref == "(redacted: looked like PHI)"
