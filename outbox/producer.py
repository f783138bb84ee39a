"""The producer side: validate a notification and write it in the caller's transaction.

Nothing here imports Celery or commits. A notification row exists if and only if the caller's
transaction commits; after the commit an optional ``on_commit`` callback receives the new row ids
(``workers`` uses it to wake a relay at once; the periodic sweep delivers anyway if it fails).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event as sa_event
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from outbox import policy
from outbox.errors import ConfigurationError, PrivacyViolation, SessionError
from outbox.notification import NotificationType
from outbox.policy import new_opaque_id
from outbox.settings import Settings
from outbox.store import insert_event

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

logger = logging.getLogger("outbox.producer")

_PENDING_KEY = "outbox.pending_ids"
_UNSET: Any = object()

OnCommit = Callable[[Sequence[int]], None]


@dataclass(frozen=True)
class Enqueued:
    """What :meth:`Outbox.enqueue` wrote (or found, for a repeated deduplication key)."""

    id: int
    event_id: str
    channel: str
    created: bool


# Size checks at enqueue assume the widest sequence number, so the real text is never larger.
_WIDEST_SEQ = 10**18


def encode_envelope(event_id: str, seq: int, payload: Mapping[str, Any]) -> str:
    """The exact data text subscribers receive (encrypted channels: inside the ciphertext).

    ``{"id": "<stable event id>", "seq": <n>, "data": {...fields}}``: subscribers drop repeats
    by ``id`` and detect gaps by ``seq`` (per channel, no gaps, in commit order).
    """
    return json.dumps(
        {"id": event_id, "seq": seq, "data": payload}, separators=(",", ":"), ensure_ascii=False
    )


class Outbox:
    """Declared notification types plus the rules to enqueue them.

    Create one per application (it is immutable after construction apart from
    :meth:`register`) and share it between threads.
    """

    def __init__(
        self,
        *,
        types: Iterable[NotificationType] = (),
        max_payload_bytes: int = 10_240,
        encryption_enabled: bool = False,
        on_commit: OnCommit | None = None,
    ) -> None:
        if max_payload_bytes < 256:
            raise ConfigurationError("max_payload_bytes must be at least 256")
        self.max_payload_bytes = max_payload_bytes
        self.encryption_enabled = encryption_enabled
        self.on_commit = on_commit
        self._types: dict[str, NotificationType] = {}
        for notification_type in types:
            self.register(notification_type)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        types: Iterable[NotificationType] = (),
        on_commit: OnCommit | None = None,
    ) -> Outbox:
        return cls(
            types=types,
            max_payload_bytes=settings.max_payload_bytes,
            encryption_enabled=settings.encryption_master_key is not None,
            on_commit=on_commit,
        )

    # --- types ---------------------------------------------------------------------------

    def register(self, notification_type: NotificationType) -> NotificationType:
        if not isinstance(notification_type, NotificationType):
            raise TypeError("register() takes a NotificationType")
        existing = self._types.get(notification_type.name)
        if existing is not None and existing != notification_type:
            raise ConfigurationError(
                f"notification type '{notification_type.name}' is registered twice with "
                "different declarations"
            )
        self._types[notification_type.name] = notification_type
        return notification_type

    @property
    def types(self) -> Mapping[str, NotificationType]:
        return dict(self._types)

    def type_for_channel(self, channel: str) -> tuple[NotificationType, dict[str, str]] | None:
        """The registered type whose channel template ``channel`` instantiates, with its ids."""
        for notification_type in self._types.values():
            ids = notification_type.matches(channel)
            if ids is not None:
                return notification_type, ids
        return None

    def _resolve(self, notification_type: NotificationType | str) -> NotificationType:
        if isinstance(notification_type, str):
            found = self._types.get(notification_type)
            if found is None:
                raise ConfigurationError(
                    f"unknown notification type '{notification_type}': declare it and pass it to "
                    "Outbox(types=[...]) or Outbox.register()"
                )
            return found
        if not isinstance(notification_type, NotificationType):
            raise TypeError("enqueue() takes a NotificationType or a registered type name")
        return self.register(notification_type)

    # --- enqueue -------------------------------------------------------------------------

    def build_row(
        self,
        notification_type: NotificationType | str,
        *,
        ids: Mapping[str, object],
        data: Mapping[str, object],
        dedup_key: str | None = None,
        exclude_socket_id: str | None = None,
    ) -> tuple[dict[str, Any], NotificationType]:
        """Validate everything and return the row to insert. Raises before anything is written."""
        nt = self._resolve(notification_type)
        if nt.encrypted and not self.encryption_enabled:
            raise ConfigurationError(
                f"notification type '{nt.name}' uses an encrypted channel but no encryption "
                "master key is configured: set PUSHER_ENCRYPTION_MASTER_KEY_BASE64 (32 bytes, "
                "base64; `outbox keygen` makes one)"
            )
        channel = nt.channel_for(ids)
        payload = policy.check_fields(nt.fields, data, type_name=nt.name)
        if dedup_key is not None and (
            not isinstance(dedup_key, str) or not 1 <= len(dedup_key) <= 200
        ):
            raise PrivacyViolation(
                "dedup_key must be a string of 1-200 characters (build it from opaque ids, "
                "e.g. f'order-created:{order_id}')",
                field="dedup_key",
                rule="dedup_key",
            )
        if dedup_key is not None and policy.phi_shape(policy.strip_opaque_ids(dedup_key)):
            raise PrivacyViolation(
                "dedup_key looks like it contains PHI; build it from opaque ids only",
                field="dedup_key",
                rule="phi_in_name",
            )
        if exclude_socket_id is not None and (
            not isinstance(exclude_socket_id, str) or not policy.SOCKET_ID.match(exclude_socket_id)
        ):
            raise PrivacyViolation(
                "exclude_socket_id must be a Pusher socket id like '123.456' (the client's "
                "pusher.connection.socket_id)",
                field="exclude_socket_id",
                rule="socket_id",
            )
        event_id = new_opaque_id("evt")
        size = policy.check_size(
            encode_envelope(event_id, _WIDEST_SEQ, payload),
            encrypted=nt.encrypted,
            limit_bytes=self.max_payload_bytes,
            type_name=nt.name,
        )
        row = {
            "event_id": event_id,
            "type_name": nt.name,
            "channel": channel,
            "event_name": nt.event,
            "ordering_key": nt.ordering_key_for(channel, ids),
            "payload": payload,
            "data_bytes": size,
            "encrypted": nt.encrypted,
            "contains_phi": nt.contains_phi,
            "exclude_socket_id": exclude_socket_id,
            "dedup_key": dedup_key,
        }
        return row, nt

    def enqueue(
        self,
        session: Session,
        notification_type: NotificationType | str,
        *,
        ids: Mapping[str, object],
        data: Mapping[str, object],
        dedup_key: str | None = None,
        exclude_socket_id: str | None = None,
        ttl_seconds: float | None = _UNSET,
    ) -> Enqueued:
        """Write one notification in ``session``'s transaction. Never commits.

        ``ids`` fill the channel template (opaque ids only); ``data`` holds the declared fields.
        ``dedup_key`` makes a repeated enqueue a no-op returning the first row.
        ``exclude_socket_id`` skips the originating connection ("send to others").
        ``ttl_seconds`` overrides the type's time-to-live (``None``: never expires).

        Raises :class:`PrivacyViolation`, :class:`PayloadTooLarge`, :class:`ConfigurationError`
        or :class:`SessionError` before any row is written.
        """
        row, nt = self.build_row(
            notification_type,
            ids=ids,
            data=data,
            dedup_key=dedup_key,
            exclude_socket_id=exclude_socket_id,
        )
        ttl = nt.ttl_seconds if ttl_seconds is _UNSET else ttl_seconds
        if ttl is not None and not ttl > 0:
            raise ConfigurationError("ttl_seconds must be positive (or None for no expiry)")
        conn = _transactional_connection(session)
        payload = row.pop("payload")
        event_id = str(row["event_id"])
        inserted = insert_event(
            conn,
            row,
            ttl_seconds=ttl,
            render=lambda seq: encode_envelope(event_id, seq, payload),
        )
        if self.on_commit is not None and inserted.created:
            _remember_for_commit(session, inserted.id, self.on_commit)
        return Enqueued(
            id=inserted.id,
            event_id=inserted.event_id,
            channel=str(row["channel"]),
            created=inserted.created,
        )

    async def enqueue_async(
        self,
        session: AsyncSession,
        notification_type: NotificationType | str,
        *,
        ids: Mapping[str, object],
        data: Mapping[str, object],
        dedup_key: str | None = None,
        exclude_socket_id: str | None = None,
        ttl_seconds: float | None = _UNSET,
    ) -> Enqueued:
        """:meth:`enqueue` for an :class:`~sqlalchemy.ext.asyncio.AsyncSession`. Never commits.

        Needs SQLAlchemy's asyncio extra (``pip install 'pusher-outbox[async]'``).
        """
        from sqlalchemy.ext.asyncio import AsyncSession

        if not isinstance(session, AsyncSession):
            raise SessionError(
                "enqueue_async() needs the caller's sqlalchemy AsyncSession; use enqueue() for a "
                "synchronous Session"
            )

        def run(sync_session: Session) -> Enqueued:
            return self.enqueue(
                sync_session,
                notification_type,
                ids=ids,
                data=data,
                dedup_key=dedup_key,
                exclude_socket_id=exclude_socket_id,
                ttl_seconds=ttl_seconds,
            )

        return await session.run_sync(run)


def _transactional_connection(session: object) -> Any:
    if type(session).__name__ == "AsyncSession":
        raise SessionError("this is an AsyncSession: use `await outbox.enqueue_async(...)`")
    if not isinstance(session, Session):
        raise SessionError(
            "enqueue() needs the caller's sqlalchemy Session, so the notification commits or "
            "rolls back with the business change; got "
            f"{type(session).__name__}"
        )
    try:
        conn = session.connection()
    except InvalidRequestError:
        raise SessionError(
            "the session is not in a transaction and cannot begin one (autobegin=False): "
            "call session.begin() first"
        ) from None
    isolation = conn.get_execution_options().get("isolation_level")
    dialect_level = getattr(conn.dialect, "_on_connect_isolation_level", None)
    if "AUTOCOMMIT" in (isolation, dialect_level):
        raise SessionError(
            "the session's connection is in AUTOCOMMIT mode, so the notification would commit "
            "on its own; use a transactional engine/session for enqueue()"
        )
    return conn


def _remember_for_commit(session: Session, row_id: int, on_commit: OnCommit) -> None:
    pending: list[int] | None = session.info.get(_PENDING_KEY)
    if pending is None:
        pending = []
        session.info[_PENDING_KEY] = pending
    pending.append(row_id)
    if not sa_event.contains(session, "after_commit", _after_commit):
        sa_event.listen(session, "after_commit", _after_commit)
        sa_event.listen(session, "after_rollback", _after_rollback)
    session.info["outbox.on_commit"] = on_commit


def _after_commit(session: Session) -> None:
    ids: list[int] = session.info.pop(_PENDING_KEY, None) or []
    on_commit: OnCommit | None = session.info.get("outbox.on_commit")
    if not ids or on_commit is None:
        return
    try:
        on_commit(list(ids))
    except Exception as exc:  # noqa: BLE001 - a failed kick must never fail the app's commit
        logger.warning(
            "outbox kick failed after commit; the periodic sweep will deliver the rows",
            extra={"rows": len(ids), "error_class": type(exc).__name__},
        )


def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)
