"""Privacy rules: field classifications, PHI-shaped text, opaque identifiers, names and sizes.

Every check here raises :class:`~outbox.errors.PrivacyViolation` (or
:class:`~outbox.errors.PayloadTooLarge`) with a text naming the field and the rule; no text ever
contains the value that was checked.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from outbox.errors import PayloadTooLarge, PrivacyViolation

ENCRYPTED_PREFIX = "private-encrypted-"
PRIVATE_PREFIX = "private-"
PRESENCE_PREFIX = "presence-"

# Pusher: channel names at most 164 characters (the SDK and soketi allow 200), event names at
# most 200; both from this character set.
MAX_CHANNEL_NAME_LENGTH = 164
MAX_EVENT_NAME_LENGTH = 200
NAME_CHARACTERS = re.compile(r"^[-a-zA-Z0-9_=@,.;]+$")
SOCKET_ID = re.compile(r"^\d+\.\d+$")

# Encrypted data as the SDK sends it: {"nonce": "<32 base64 chars>", "ciphertext": "<base64>"}.
_ENCRYPTED_OVERHEAD = len('{"nonce": "", "ciphertext": ""}') + 32
_SECRETBOX_MAC_BYTES = 16

_ALPHABET = string.ascii_letters + string.digits
OPAQUE_RANDOM_LENGTH = 22  # 22 base62 characters: about 131 bits
_OPAQUE_SPACE = len(_ALPHABET) ** OPAQUE_RANDOM_LENGTH
_OPAQUE_ID = re.compile(r"^(?P<prefix>[a-z][a-z0-9]{1,11})_(?P<random>[A-Za-z0-9]{16,64})$")

# PHI-shaped text. Deliberately broad: a false positive costs a clear error at development time,
# a false negative costs a disclosure.
_PHI_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email address", re.compile(r"[^\s@]+@[^\s@]+\.[A-Za-z]{2,}")),
    ("SSN-like number", re.compile(r"(?<!\d)\d{3}[- .]?\d{2}[- .]?\d{4}(?!\d)")),
    (
        "phone number",
        re.compile(r"(?<![\dA-Za-z])(?:\+?\d{1,3}[- .]?)?\(?\d{3}\)?[- .]?\d{3}[- .]?\d{4}(?!\d)"),
    ),
    (
        "date",
        re.compile(
            r"(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})(?!\d)"
        ),
    ),
    ("long number (record number or sequential id)", re.compile(r"\d{6,}")),
)


def phi_shape(text: str) -> str | None:
    """Return the name of the first PHI shape found in ``text``, or ``None``."""
    for name, pattern in _PHI_SHAPES:
        if pattern.search(text):
            return name
    return None


def new_opaque_id(prefix: str) -> str:
    """Mint an unguessable identifier such as ``ord_4kq7Zb0wYt1Lm9PxQe2sRa``.

    The random part carries about 131 bits from :mod:`secrets`, reveals nothing about the record
    and never looks like PHI. Store it on your record and use it in channel names and payloads
    instead of internal ids or MRNs.
    """
    if not re.fullmatch(r"[a-z][a-z0-9]{1,11}", prefix):
        raise ValueError(
            "opaque id prefix must be 2-12 lowercase letters or digits starting with a letter, "
            "e.g. 'ord'"
        )
    while True:
        # One uniform draw below 62**22, written in base 62: the same distribution as 22
        # independent secrets.choice() calls, at a tenth of the cost (ids are minted per event).
        number = secrets.randbelow(_OPAQUE_SPACE)
        digits = []
        for _ in range(OPAQUE_RANDOM_LENGTH):
            number, digit = divmod(number, len(_ALPHABET))
            digits.append(_ALPHABET[digit])
        candidate = f"{prefix}_" + "".join(digits)
        if _opaque_id_problem(candidate, prefix) is None:
            return candidate


def _opaque_id_problem(value: object, prefix: str | None) -> str | None:
    if not isinstance(value, str):
        return "must be a string minted by outbox.new_opaque_id()"
    match = _OPAQUE_ID.match(value)
    if match is None:
        return (
            "must look like '<prefix>_<16-64 letters and digits>' as minted by "
            "outbox.new_opaque_id(); internal ids, MRNs and names are not opaque"
        )
    if prefix is not None and match["prefix"] != prefix:
        return f"must have the prefix '{prefix}_' (mint it with new_opaque_id('{prefix}'))"
    random_part = match["random"]
    if random_part.isdigit() or random_part.isalpha():
        return "must mix letters and digits like a minted id; it looks like a name or a number"
    shape = phi_shape(random_part)
    if shape is not None:
        return f"contains a {shape}; mint ids with outbox.new_opaque_id()"
    return None


def check_opaque_id(value: object, *, field: str, prefix: str | None = None) -> str:
    """Return ``value`` if it is a well-formed opaque id, else raise :class:`PrivacyViolation`."""
    problem = _opaque_id_problem(value, prefix)
    if problem is not None:
        raise PrivacyViolation(
            f"field '{field}' is declared as an opaque id and {problem}",
            field=field,
            rule="opaque_id",
        )
    assert isinstance(value, str)
    return value


# --- field classifications -------------------------------------------------------------------


class FieldKind:
    """Base of the payload field classifications."""

    phi: bool = False

    def check(self, value: object, *, field: str) -> Any:
        """Validate ``value`` and return the JSON-ready value to send."""
        raise NotImplementedError


@dataclass(frozen=True)
class OpaqueId(FieldKind):
    """An opaque identifier minted by :func:`new_opaque_id`, optionally with a fixed prefix."""

    prefix: str | None = None

    def check(self, value: object, *, field: str) -> Any:
        return check_opaque_id(value, field=field, prefix=self.prefix)


@dataclass(frozen=True)
class Enum(FieldKind):
    """One value of a fixed, non-identifying set (a status, a kind)."""

    choices: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("Enum needs at least one choice")
        for choice in self.choices:
            if not isinstance(choice, str) or phi_shape(choice):
                raise ValueError("Enum choices must be strings that do not look like PHI")

    def check(self, value: object, *, field: str) -> Any:
        if value not in self.choices:
            raise PrivacyViolation(
                f"field '{field}' is declared as an enum and its value is not one of the "
                f"declared choices ({', '.join(self.choices)})",
                field=field,
                rule="enum",
            )
        return value


@dataclass(frozen=True)
class Count(FieldKind):
    """A non-negative integer count."""

    maximum: int = 1_000_000

    def check(self, value: object, *, field: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.maximum:
            raise PrivacyViolation(
                f"field '{field}' is declared as a count and must be an integer from 0 to "
                f"{self.maximum}",
                field=field,
                rule="count",
            )
        return value


@dataclass(frozen=True)
class Boolean(FieldKind):
    """``true`` or ``false``."""

    def check(self, value: object, *, field: str) -> Any:
        if not isinstance(value, bool):
            raise PrivacyViolation(
                f"field '{field}' is declared as a boolean and must be True or False",
                field=field,
                rule="boolean",
            )
        return value


@dataclass(frozen=True)
class Timestamp(FieldKind):
    """When something happened in the system (not a date about a person: that is PHI).

    Accepts an aware :class:`datetime.datetime` (sent as ISO 8601 UTC) or epoch seconds.
    """

    def check(self, value: object, *, field: str) -> Any:
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return value
        raise PrivacyViolation(
            f"field '{field}' is declared as a timestamp and must be a timezone-aware datetime "
            "or epoch seconds",
            field=field,
            rule="timestamp",
        )


@dataclass(frozen=True)
class Phi(FieldKind):
    """Protected health information: allowed only on ``private-encrypted-`` channels.

    Any JSON value (string, number, list, object) may be sent; it travels end-to-end encrypted.
    """

    phi = True

    def check(self, value: object, *, field: str) -> Any:
        return value


# --- names -----------------------------------------------------------------------------------


def check_event_name(name: str) -> str:
    """Validate a fixed event name: Pusher's characters and length, no PHI shapes."""
    if not name or len(name) > MAX_EVENT_NAME_LENGTH or not NAME_CHARACTERS.match(name):
        raise PrivacyViolation(
            f"event name must be 1-{MAX_EVENT_NAME_LENGTH} characters from "
            "[-a-zA-Z0-9_=@,.;], e.g. 'order.created'",
            field="event",
            rule="event_name",
        )
    if name.startswith(("pusher:", "pusher_internal:", "client-")):
        raise PrivacyViolation(
            "event name must not start with 'pusher:', 'pusher_internal:' or 'client-' "
            "(reserved by Pusher)",
            field="event",
            rule="event_name",
        )
    shape = phi_shape(name)
    if shape is not None:
        raise PrivacyViolation(
            f"event name contains a {shape}; event names are never encrypted and must not "
            "carry PHI",
            field="event",
            rule="phi_in_name",
        )
    return name


def check_channel_name(name: str) -> str:
    """Validate a concrete channel name: characters, length and no PHI shapes."""
    if not name or len(name) > MAX_CHANNEL_NAME_LENGTH or not NAME_CHARACTERS.match(name):
        raise PrivacyViolation(
            f"channel name must be 1-{MAX_CHANNEL_NAME_LENGTH} characters from "
            "[-a-zA-Z0-9_=@,.;]; shorten the template or the ids",
            field="channel",
            rule="channel_name",
        )
    for prefix in ("private-encrypted-", "presence-", "private-"):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            break
    else:
        rest = name
    # Opaque ids legitimately contain digits; look for PHI shapes in the name with the ids'
    # random parts removed as well as in the whole.
    stripped = strip_opaque_ids(rest)
    shape = phi_shape(stripped)
    if shape is not None:
        raise PrivacyViolation(
            f"channel name contains a {shape}; channel names are never encrypted and must "
            "be built from opaque ids only",
            field="channel",
            rule="phi_in_name",
        )
    return name


_OPAQUE_IN_TEXT = re.compile(r"[a-z][a-z0-9]{1,11}_[A-Za-z0-9]{16,64}")


def strip_opaque_ids(text: str) -> str:
    """``text`` with well-formed opaque ids removed (their random part may hold digit runs)."""
    return _OPAQUE_IN_TEXT.sub("", text)


def channel_kind(name: str) -> str:
    """``encrypted``, ``presence``, ``private`` or ``public``."""
    if name.startswith(ENCRYPTED_PREFIX):
        return "encrypted"
    if name.startswith(PRESENCE_PREFIX):
        return "presence"
    if name.startswith(PRIVATE_PREFIX):
        return "private"
    return "public"


# --- sizes -----------------------------------------------------------------------------------


def wire_data_bytes(plaintext: str, *, encrypted: bool) -> int:
    """Bytes of the event's ``data`` string as Pusher receives it.

    Unencrypted: the UTF-8 length of the JSON text. Encrypted: the SDK sends
    ``{"nonce": "<base64 of 24 bytes>", "ciphertext": "<base64 of n + 16 bytes>"}``.
    """
    size = len(plaintext.encode("utf-8"))
    if not encrypted:
        return size
    return _ENCRYPTED_OVERHEAD + 4 * math.ceil((size + _SECRETBOX_MAC_BYTES) / 3)


def check_size(plaintext: str, *, encrypted: bool, limit_bytes: int, type_name: str) -> int:
    """Return the wire size, or raise :class:`PayloadTooLarge` naming size and limit."""
    size = wire_data_bytes(plaintext, encrypted=encrypted)
    if size > limit_bytes:
        after = " after encryption and base64" if encrypted else ""
        raise PayloadTooLarge(
            f"notification '{type_name}' would send {size} bytes of data{after}, over the "
            f"limit of {limit_bytes} bytes; send opaque ids and let the client fetch the "
            "details, or raise OUTBOX_MAX_PAYLOAD_BYTES if your Pusher plan allows more",
            size_bytes=size,
            limit_bytes=limit_bytes,
        )
    return size


def check_fields(
    declared: Mapping[str, FieldKind], data: Mapping[str, object], *, type_name: str
) -> dict[str, Any]:
    """Validate ``data`` against the declared fields and return the JSON-ready payload."""
    if not isinstance(data, Mapping):
        raise PrivacyViolation(
            f"data for '{type_name}' must be a mapping of declared field names to values",
            field="data",
            rule="shape",
        )
    unknown = sorted(str(key) for key in data if key not in declared)
    if unknown:
        raise PrivacyViolation(
            f"field(s) {', '.join(repr(k) for k in unknown)} are not declared by '{type_name}'; "
            "declare each field with its classification (OpaqueId, Enum, Count, Boolean, "
            "Timestamp, Phi)",
            field=unknown[0],
            rule="undeclared_field",
        )
    missing = sorted(name for name in declared if name not in data)
    if missing:
        raise PrivacyViolation(
            f"field(s) {', '.join(repr(k) for k in missing)} declared by '{type_name}' are "
            "missing from data",
            field=missing[0],
            rule="missing_field",
        )
    return {name: declared[name].check(data[name], field=name) for name in declared}


def placeholders(template: str) -> Sequence[str]:
    """The ``{name}`` placeholders of a channel template, in order."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    for name in names:
        if not name.isidentifier():
            raise ValueError("channel template placeholders must be plain names like {order_id}")
    return names
