import json
import math

import pytest

from outbox import policy
from outbox.errors import PayloadTooLarge, PrivacyViolation
from outbox.policy import Boolean, Count, Enum, OpaqueId, Phi, Timestamp, new_opaque_id


def test_minted_opaque_ids_are_prefixed_unique_and_pass_their_own_check():
    ids = {new_opaque_id("ord") for _ in range(2000)}
    assert len(ids) == 2000
    for value in ids:
        assert value.startswith("ord_")
        assert policy.check_opaque_id(value, field="order_id", prefix="ord") == value


@pytest.mark.parametrize("prefix", ["", "O", "1ab", "toolongprefix1", "a-b"])
def test_opaque_id_prefix_must_be_short_lowercase(prefix):
    with pytest.raises(ValueError, match="prefix"):
        new_opaque_id(prefix)


@pytest.mark.parametrize(
    "value",
    [
        12345,  # internal sequential id
        "12345",
        "ord_1234567890123456",  # digits only
        "ord_abcdefghijklmnopqr",  # letters only: looks like a name
        "MRN-0012345",
        "jane.doe@example.com",
        "ord_555-12-3456xxxxxxxx",
        "ord_ab5551234567cdefgh",  # phone-like digit run
        "pha_Ab3dEf6hIj9kLm2nOp",  # wrong prefix
    ],
)
def test_values_that_are_not_opaque_ids_are_refused_without_echo(value):
    with pytest.raises(PrivacyViolation) as info:
        policy.check_opaque_id(value, field="order_id", prefix="ord")
    assert info.value.field == "order_id"
    assert info.value.rule == "opaque_id"
    assert str(value) not in str(info.value)


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("contact jane@example.org", "email address"),
        ("123-45-6789", "SSN-like number"),
        ("(555) 123-4567", "phone number"),
        ("+1 555 123 4567", "phone number"),
        ("born 1984-02-29", "date"),
        ("02/29/1984", "date"),
        ("mrn 00123456", "long number (record number or sequential id)"),
    ],
)
def test_phi_shapes_are_detected(text, shape):
    assert policy.phi_shape(text) == shape


@pytest.mark.parametrize("text", ["order.created", "private-pharmacy-", "status", "v2"])
def test_ordinary_words_are_not_phi_shaped(text):
    assert policy.phi_shape(text) is None


def test_channel_names_follow_pusher_rules():
    ok = f"private-encrypted-pharmacy-{new_opaque_id('pha')}"
    assert policy.check_channel_name(ok) == ok
    for bad in ["", "private-with space", "x" * 165, "private-é"]:
        with pytest.raises(PrivacyViolation) as info:
            policy.check_channel_name(bad)
        assert info.value.rule == "channel_name"


@pytest.mark.parametrize(
    "name",
    ["private-patient-jane@example.com", "private-ssn-123-45-6789", "private-dob-1984-02-29"],
)
def test_channel_names_with_phi_shapes_are_refused(name):
    with pytest.raises(PrivacyViolation) as info:
        policy.check_channel_name(name)
    assert info.value.rule == "phi_in_name"


@pytest.mark.parametrize("name", ["", "a" * 201, "has space", "client-x", "pusher:x", "mail@x.com"])
def test_event_names_are_checked(name):
    with pytest.raises(PrivacyViolation):
        policy.check_event_name(name)


def test_field_kinds_validate_and_never_echo_values():
    assert OpaqueId("ord").check(new_opaque_id("ord"), field="f").startswith("ord_")
    assert Enum(("new", "filled")).check("new", field="f") == "new"
    assert Count().check(3, field="f") == 3
    assert Boolean().check(True, field="f") is True
    assert Timestamp().check(1700000000, field="f") == 1700000000
    assert Phi().check({"name": "x"}, field="f") == {"name": "x"}
    cases = [
        (Enum(("new",)), "SECRET-VALUE"),
        (Count(), -1),
        (Count(), True),
        (Boolean(), "SECRET-VALUE"),
        (Timestamp(), "SECRET-VALUE"),
    ]
    for kind, value in cases:
        with pytest.raises(PrivacyViolation) as info:
            kind.check(value, field="f")
        assert "SECRET-VALUE" not in str(info.value)


def test_undeclared_and_missing_fields_are_refused():
    declared = {"order_id": OpaqueId("ord")}
    with pytest.raises(PrivacyViolation) as info:
        policy.check_fields(
            declared, {"order_id": new_opaque_id("ord"), "name": "Jane"}, type_name="t"
        )
    assert info.value.rule == "undeclared_field"
    assert "Jane" not in str(info.value)
    with pytest.raises(PrivacyViolation) as info:
        policy.check_fields(declared, {}, type_name="t")
    assert info.value.rule == "missing_field"


@pytest.mark.parametrize("n", [0, 1, 2, 3, 100, 7400, 9999])
def test_encrypted_wire_size_matches_what_the_sdk_sends(n):
    from pusher import crypto

    plaintext = "a" * n
    sent = json.dumps(
        crypto.encrypt("private-encrypted-x", plaintext, b"k" * 32), ensure_ascii=False
    )
    assert policy.wire_data_bytes(plaintext, encrypted=True) == len(sent.encode())
    assert policy.wire_data_bytes(plaintext, encrypted=True) == 63 + 4 * math.ceil((n + 16) / 3)


def test_non_ascii_counts_by_utf8_bytes():
    assert policy.wire_data_bytes("é" * 10, encrypted=False) == 20


def test_oversize_is_refused_with_measured_size_and_limit():
    text = json.dumps({"d": "x" * 7500})
    with pytest.raises(PayloadTooLarge) as info:
        policy.check_size(text, encrypted=True, limit_bytes=10_000, type_name="t")
    assert info.value.limit_bytes == 10_000
    assert info.value.size_bytes == policy.wire_data_bytes(text, encrypted=True)
    assert str(info.value.size_bytes) in str(info.value)
    # the same text fits unencrypted
    assert policy.check_size(text, encrypted=False, limit_bytes=10_000, type_name="t") < 10_000
