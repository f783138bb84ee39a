import pytest

from outbox import NotificationType, OpaqueId, Phi, new_opaque_id
from outbox.errors import NotificationTypeError, PrivacyViolation


def make(**overrides):
    spec = {
        "name": "order.created",
        "event": "order.created",
        "channel": "private-pharmacy-{pharmacy_id}",
        "fields": {"order_id": OpaqueId("ord")},
        "channel_ids": {"pharmacy_id": "pha"},
    }
    spec.update(overrides)
    return NotificationType(**spec)


def test_phi_on_a_non_encrypted_channel_is_refused_at_declaration():
    with pytest.raises(NotificationTypeError, match="'patient'.*PHI"):
        make(fields={"patient": Phi()})
    with pytest.raises(NotificationTypeError):
        make(channel="presence-pharmacy-{pharmacy_id}", fields={"patient": Phi()})


def test_phi_on_an_encrypted_channel_is_accepted():
    nt = make(channel="private-encrypted-pharmacy-{pharmacy_id}", fields={"patient": Phi()})
    assert nt.encrypted and nt.contains_phi


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "Bad Name"},
        {"event": "bad event"},
        {"event": "patient-jane@example.com"},
        {"channel": "private-pharmacy-{pharmacy_id}-jane@example.com"},
        {"channel": "private pharmacy"},
        {"channel": "private-{0}"},
        {"channel_ids": {"other": "pha"}},
        {"fields": {"order_id": "opaque"}},
        {"ttl_seconds": 0},
        {"channel": "private-" + "x" * 200 + "-{pharmacy_id}"},
    ],
)
def test_bad_declarations_are_refused(overrides):
    with pytest.raises(NotificationTypeError):
        make(**overrides)


def test_channel_is_built_only_from_opaque_ids():
    nt = make()
    pharmacy = new_opaque_id("pha")
    assert nt.channel_for({"pharmacy_id": pharmacy}) == f"private-pharmacy-{pharmacy}"
    assert nt.matches(f"private-pharmacy-{pharmacy}") == {"pharmacy_id": pharmacy}
    assert nt.matches("private-pharmacy-12") is None
    for ids in [{"pharmacy_id": "42"}, {}, {"pharmacy_id": pharmacy, "x": pharmacy}]:
        with pytest.raises(PrivacyViolation):
            nt.channel_for(ids)
    with pytest.raises(PrivacyViolation):
        nt.channel_for({"pharmacy_id": new_opaque_id("ord")})  # wrong prefix
