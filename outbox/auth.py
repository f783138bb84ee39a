"""Channel authorization for the app's Pusher auth endpoint: deny by default, audit every answer.

Order of checks, before anything is signed: the ``socket_id`` format, the channel name format,
the channel must instantiate a declared notification type's template, encrypted channels need the
master key, then the application's callback decides. Only then does the official SDK sign, for
exactly the channel that was checked; encrypted channels get the SDK's ``shared_secret``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from outbox import policy
from outbox.errors import AuthorizationError, PrivacyViolation
from outbox.notification import NotificationType
from outbox.producer import Outbox
from outbox.store import insert_audit

logger = logging.getLogger("outbox.auth")

MaySubscribe = Callable[[Any, str, NotificationType, Mapping[str, str]], bool]
PresenceData = Callable[[Any], Mapping[str, Any]]


@dataclass(frozen=True)
class AuthResponse:
    """An HTTP answer for the auth endpoint: ``status`` and a JSON-ready ``body``."""

    status: int
    body: dict[str, Any]


class ChannelAuthorizer:
    """Answers Pusher channel authorization requests for the channels an :class:`Outbox` declares.

    ``may_subscribe(user, channel, notification_type, ids)`` is the application's rule; anything
    but ``True`` (including an exception) denies. ``presence_data(user)`` returns
    ``{"user_id": ..., "user_info": {...}}`` for presence channels. ``engine`` (optional) receives
    the audit trail in ``outbox_audit``; ``user_ref(user)`` gives the opaque reference stored there.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        pusher_client: Any,
        may_subscribe: MaySubscribe,
        engine: Engine | None = None,
        user_ref: Callable[[Any], str | None] | None = None,
        presence_data: PresenceData | None = None,
        encryption_enabled: bool | None = None,
    ) -> None:
        self.outbox = outbox
        self.pusher_client = pusher_client
        self.may_subscribe = may_subscribe
        self.engine = engine
        self.user_ref = user_ref
        self.presence_data = presence_data
        self.encryption_enabled = (
            outbox.encryption_enabled if encryption_enabled is None else encryption_enabled
        )

    def authorize(self, user: Any, *, socket_id: object, channel_name: object) -> dict[str, Any]:
        """Return the auth body for ``channel_name`` or raise :class:`AuthorizationError`."""
        ref = self._user_ref(user)
        try:
            body = self._authorize(user, socket_id, channel_name)
        except AuthorizationError as exc:
            self._audit(ref, channel_name, socket_id, "deny", str(exc))
            raise
        self._audit(ref, channel_name, socket_id, "grant", "allowed by application rule")
        return body

    def handle(self, user: Any, params: Mapping[str, Any]) -> AuthResponse:
        """Framework-neutral endpoint: ``params`` are the form fields pusher-js posts."""
        try:
            body = self.authorize(
                user, socket_id=params.get("socket_id"), channel_name=params.get("channel_name")
            )
        except AuthorizationError as exc:
            return AuthResponse(exc.status, {"error": str(exc)})
        return AuthResponse(200, body)

    # --- internals -----------------------------------------------------------------------

    def check_channel(self, user: Any, channel_name: object, *, purpose: str) -> str:
        """Apply every channel rule (format, declared template, ids, the application's rule).

        Used by endpoints other than subscription (catch-up) so that a user who may not
        subscribe may not read the channel either. Audited like subscriptions; returns the
        validated channel name or raises :class:`AuthorizationError`.
        """
        ref = self._user_ref(user)
        try:
            channel, _, _ = self._check_channel(user, channel_name)
        except AuthorizationError as exc:
            self._audit(ref, channel_name, None, "deny", f"{purpose}: {exc}")
            raise
        self._audit(ref, channel, None, "grant", f"{purpose}: allowed by application rule")
        return channel

    def _authorize(self, user: Any, socket_id: object, channel_name: object) -> dict[str, Any]:
        if not isinstance(socket_id, str) or not policy.SOCKET_ID.match(socket_id):
            raise AuthorizationError(
                "socket_id must look like '123.456' (pusher.connection.socket_id)", status=400
            )
        channel, kind, _ = self._check_channel(user, channel_name)
        custom_data = None
        if kind == "presence":
            if self.presence_data is None:
                raise AuthorizationError(
                    "presence channels need presence_data configured on the authorizer",
                    status=403,
                )
            custom_data = dict(self.presence_data(user))
            if "user_id" not in custom_data:
                raise AuthorizationError("presence data must include user_id", status=403)
        body = dict(
            self.pusher_client.authenticate(
                channel=channel, socket_id=socket_id, custom_data=custom_data
            )
        )
        secret = body.get("shared_secret")
        if isinstance(secret, bytes):
            body["shared_secret"] = secret.decode("ascii")
        return body

    def _check_channel(self, user: Any, channel_name: object) -> tuple[str, str, NotificationType]:
        """Validate the channel and ask the application's rule; nothing is signed here."""
        if not isinstance(channel_name, str):
            raise AuthorizationError("channel_name is required", status=400)
        try:
            policy.check_channel_name(channel_name)
        except PrivacyViolation:
            raise AuthorizationError(
                "channel_name is not a valid channel name", status=400
            ) from None
        kind = policy.channel_kind(channel_name)
        if kind == "public":
            raise AuthorizationError(
                "public channels need no authorization; subscribe without auth", status=400
            )
        found = self.outbox.type_for_channel(channel_name)
        if found is None:
            raise AuthorizationError(
                "channel does not match any declared notification type", status=403
            )
        notification_type, ids = found
        try:
            notification_type.channel_for(ids)  # every id must be a well-formed opaque id
        except PrivacyViolation:
            raise AuthorizationError(
                "channel_name does not carry well-formed opaque ids", status=400
            ) from None
        if kind == "encrypted" and not self.encryption_enabled:
            raise AuthorizationError(
                "encrypted channels are disabled: the server has no encryption master key",
                status=503,
            )
        try:
            allowed = self.may_subscribe(user, channel_name, notification_type, ids) is True
        except Exception as exc:  # noqa: BLE001 - a failing rule denies, never grants
            logger.warning(
                "channel authorization rule raised; denying",
                extra={"error_class": type(exc).__name__},
            )
            allowed = False
        if not allowed:
            raise AuthorizationError("not allowed to subscribe to this channel", status=403)
        return channel_name, kind, notification_type

    def _user_ref(self, user: Any) -> str | None:
        if self.user_ref is None:
            return None
        try:
            ref = self.user_ref(user)
        except Exception:  # noqa: BLE001 - the audit must not fail the request
            return None
        if ref is None:
            return None
        ref = str(ref)[:200]
        if policy.phi_shape(policy.strip_opaque_ids(ref)):
            return "(redacted: looked like PHI)"
        return ref

    def _audit(
        self,
        user_ref: str | None,
        channel_name: object,
        socket_id: object,
        decision: str,
        reason: str,
    ) -> None:
        if self.engine is None:
            return
        channel = channel_name if isinstance(channel_name, str) else ""
        try:
            policy.check_channel_name(channel)
        except PrivacyViolation:
            channel = "(invalid channel name)"
        socket = (
            socket_id if isinstance(socket_id, str) and policy.SOCKET_ID.match(socket_id) else None
        )
        try:
            with self.engine.begin() as conn:
                insert_audit(
                    conn,
                    user_ref=user_ref,
                    channel=channel,
                    socket_id=socket,
                    decision=decision,
                    reason=reason[:200],
                )
        except Exception as exc:  # noqa: BLE001 - log and go on; the decision stands
            logger.error(
                "could not write the authorization audit row",
                extra={"error_class": type(exc).__name__},
            )
