"""Catch-up: what a client missed on a channel since the last sequence number it saw.

Pusher delivers to connected clients at most once; a client that was offline, or saw a gap in the
``seq`` numbers, asks the application's catch-up endpoint. Access is decided by the same rule as
channel subscriptions (:meth:`ChannelAuthorizer.check_channel`): a user who may not subscribe may
not catch up.

What is returned, per event with ``seq > after_seq`` (in order):

* sent events whose payload is still retained: ``data`` in full (the same object subscribers got);
* sent events whose payload retention has erased it (PHI by default): ``{"erased": true}`` and no
  data; the client refetches that record from the application's API by its opaque id;
* dead and expired events: ``{"skipped": "dead" | "expired"}`` so the client can move past them;
* nothing at or after the first event not yet published (it will arrive over the websocket):
  ``complete`` is then false.

``reset`` is true when the client's position is older than the oldest retained row (purged by
``OUTBOX_ROW_RETENTION_SECONDS``): the client must refetch its state from the application's API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from outbox.auth import AuthResponse, ChannelAuthorizer
from outbox.errors import AuthorizationError
from outbox.models import Status
from outbox.store import Store

MAX_EVENTS = 500


class CatchUp:
    """The catch-up endpoint's logic, framework-neutral (see :meth:`handle`)."""

    def __init__(
        self, *, store: Store, authorizer: ChannelAuthorizer, max_events: int = 200
    ) -> None:
        if not 1 <= max_events <= MAX_EVENTS:
            raise ValueError(f"max_events must be between 1 and {MAX_EVENTS}")
        self.store = store
        self.authorizer = authorizer
        self.max_events = max_events

    def fetch(self, user: Any, *, channel: object, after_seq: object) -> dict[str, Any]:
        """The events ``user`` missed on ``channel``; raises :class:`AuthorizationError`."""
        if isinstance(after_seq, str) and after_seq.isdigit():
            after_seq = int(after_seq)
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise AuthorizationError(
                "after_seq must be a non-negative integer (the last seq the client saw, 0 for "
                "none)",
                status=400,
            )
        name = self.authorizer.check_channel(user, channel, purpose="catch-up")
        history = self.store.channel_history(name, after_seq=after_seq, limit=self.max_events)
        events: list[dict[str, Any]] = []
        complete = True
        for row in history["rows"]:
            status = row["status"]
            item: dict[str, Any] = {
                "id": row["event_id"],
                "seq": row["seq"],
                "event": row["event_name"],
            }
            if status == Status.SENT.value:
                if row["data"] is None:
                    item["erased"] = True
                else:
                    item["data"] = json.loads(row["data"]).get("data")
            elif status in (Status.DEAD.value, Status.EXPIRED.value):
                item["skipped"] = status
            else:  # pending or in flight: it will arrive over the websocket
                complete = False
                break
            events.append(item)
        if complete and len(history["rows"]) == self.max_events:
            complete = history["rows"][-1]["seq"] >= history["last_seq"]
        first = history["first_seq"]
        reset = (first is not None and after_seq < first - 1) or (
            first is None and history["last_seq"] > after_seq
        )
        return {
            "channel": name,
            "after_seq": after_seq,
            "events": events,
            "last_seq": history["last_seq"],
            "complete": complete,
            "reset": reset,
        }

    def handle(self, user: Any, params: Mapping[str, Any]) -> AuthResponse:
        """Endpoint helper: ``params`` holds ``channel`` and ``after_seq`` (query or JSON)."""
        try:
            body = self.fetch(
                user, channel=params.get("channel"), after_seq=params.get("after_seq")
            )
        except AuthorizationError as exc:
            return AuthResponse(exc.status, {"error": str(exc)})
        return AuthResponse(200, body)
