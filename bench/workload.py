"""What the benchmark sends: two notification types, the channels, and one payload per event.

The same envelope (``{"id": <event id>, "seq": <per-channel number>, "data": {...}}``, written by
:func:`outbox.producer.encode_envelope`) travels through the ceiling, the naive baseline and the
outbox, so that the subscriber checks every event the same way and the three carry the same
bytes. Event ``n`` of a run goes to room ``n % rooms``; the ceiling and the naive app number
each channel's events like the outbox does (1, 2, 3, … in order).
"""

from __future__ import annotations

from typing import Any

from outbox import Count, NotificationType, OpaqueId, Phi, new_opaque_id

PUBLIC = "public"
ENCRYPTED = "encrypted"
CHANNEL_KINDS = (PUBLIC, ENCRYPTED)

EVENT_NAME = "bench.tick"

# Public channel, opaque ids and counts only: what most notifications look like.
PUBLIC_TYPE = NotificationType(
    name="bench.public",
    event=EVENT_NAME,
    channel="bench-room-{room_id}",
    fields={"order_id": OpaqueId("ord"), "n": Count()},
    channel_ids={"room_id": "room"},
)
# End-to-end encrypted channel carrying PHI.
ENCRYPTED_TYPE = NotificationType(
    name="bench.encrypted",
    event=EVENT_NAME,
    channel="private-encrypted-bench-room-{room_id}",
    fields={"order_id": OpaqueId("ord"), "n": Count(), "patient": Phi(), "note": Phi()},
    channel_ids={"room_id": "room"},
)
TYPES = {PUBLIC: PUBLIC_TYPE, ENCRYPTED: ENCRYPTED_TYPE}

# Synthetic PHI (about 120 bytes): realistic size, obviously fake.
_PATIENT = "Bench Patient Doe"
_NOTE = "Synthetic note: 2 tablets of ibuprofen 200 mg, twice a day, with food, for five days."


def new_rooms(count: int) -> list[str]:
    return [new_opaque_id("room") for _ in range(count)]


def channel(kind: str, room: str) -> str:
    return TYPES[kind].channel_for({"room_id": room})


def fields(kind: str, number: int) -> dict[str, Any]:
    """The declared fields of event ``number`` (of the run)."""
    data: dict[str, Any] = {"order_id": new_opaque_id("ord"), "n": number}
    if kind == ENCRYPTED:
        data["patient"] = _PATIENT
        data["note"] = _NOTE
    return data


def room_of(number: int, rooms: list[str]) -> str:
    return rooms[number % len(rooms)]


def channel_seq(number: int, rooms: list[str]) -> int:
    """The per-channel sequence number of event ``number`` (as the outbox assigns them)."""
    return number // len(rooms) + 1
