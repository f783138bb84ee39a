"""What the pharmacy service sends to pharmacies, declared once and checked by the outbox.

Two ways to tell a pharmacy about a new order without exposing PHI:

- ``order.created`` on ``private-pharmacy-{pharmacy_id}`` carries only the order's opaque id and a
  non-identifying status. The pharmacy's screen then fetches the details from our API with the
  pharmacist's own credentials (``GET /orders/{order_id}``), where access is checked per user.
- ``order.details`` on ``private-encrypted-pharmacy-{pharmacy_id}`` carries the details
  themselves, end-to-end encrypted: Pusher relays ciphertext it cannot read, and only clients our
  auth endpoint gave the channel's shared secret can decrypt it.

Channel names hold the pharmacy's opaque id (``pha_…``), never a name or an internal id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from outbox import Enum, NotificationType, OpaqueId, Outbox, Phi, Settings

ORDER_STATUSES = ("pending", "dispatched", "cancelled")

ORDER_CREATED = NotificationType(
    name="order.created",
    event="order.created",
    channel="private-pharmacy-{pharmacy_id}",
    fields={"order_id": OpaqueId("ord"), "status": Enum(ORDER_STATUSES)},
    channel_ids={"pharmacy_id": "pha"},
)

ORDER_DETAILS = NotificationType(
    name="order.details",
    event="order.details",
    channel="private-encrypted-pharmacy-{pharmacy_id}",
    fields={
        "order_id": OpaqueId("ord"),
        "patient_name": Phi(),
        "medication": Phi(),
        "dosage": Phi(),
        "quantity": Phi(),
    },
    channel_ids={"pharmacy_id": "pha"},
)

TYPES: Sequence[NotificationType] = (ORDER_CREATED, ORDER_DETAILS)

# Sentinel: "wake the Celery relay after each commit" (imported lazily: see build_outbox).
KICK_WORKERS: Any = object()


def build_outbox(settings: Settings, *, on_commit: Any = KICK_WORKERS) -> Outbox:
    """The service's :class:`~outbox.Outbox`, with both notification types registered.

    By default each commit that enqueued notifications sends one Celery task carrying row ids
    (``workers.kick``) so a relay delivers them at once; the periodic sweep delivers them anyway
    if that kick is lost. Pass ``on_commit=None`` to rely on the sweep alone (tests).
    """
    if on_commit is KICK_WORKERS:
        from workers import kick  # Celery is imported only by apps that use it

        on_commit = kick
    return Outbox.from_settings(settings, types=TYPES, on_commit=on_commit)
