"""Shared declarations and helpers for integration tests."""

from __future__ import annotations

import base64
import os
from typing import Any

from outbox import Count, Enum, NotificationType, OpaqueId, Outbox, Phi
from outbox.errors import PublishError
from outbox.publisher import OutgoingEvent

ORDER_CREATED = NotificationType(
    name="order.created",
    event="order.created",
    channel="private-pharmacy-{pharmacy_id}",
    fields={"order_id": OpaqueId("ord"), "status": Enum(("new", "filled")), "items": Count()},
    channel_ids={"pharmacy_id": "pha"},
)
ORDER_DETAILS = NotificationType(
    name="order.details",
    event="order.details",
    channel="private-encrypted-pharmacy-{pharmacy_id}",
    fields={"order_id": OpaqueId("ord"), "patient": Phi(), "medication": Phi()},
    channel_ids={"pharmacy_id": "pha"},
)


def new_master_key() -> bytes:
    return os.urandom(32)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def make_outbox(**kwargs: Any) -> Outbox:
    kwargs.setdefault("encryption_enabled", True)
    return Outbox(types=[ORDER_CREATED, ORDER_DETAILS], **kwargs)


class FakePublisher:
    """Records batches; raises the scripted errors (for outcomes soketi cannot produce)."""

    def __init__(self, script: list[PublishError | None] | None = None, fail_for: Any = None):
        self.script = list(script or [])
        self.fail_for = fail_for  # callable(OutgoingEvent) -> PublishError | None
        self.batches: list[list[OutgoingEvent]] = []
        self.published: list[OutgoingEvent] = []

    def publish_batch(self, events):
        events = list(events)
        self.batches.append(events)
        if self.script:
            error = self.script.pop(0)
            if error is not None:
                raise error
        if self.fail_for is not None:
            for event in events:
                error = self.fail_for(event)
                if error is not None:
                    raise error
        self.published.extend(events)
