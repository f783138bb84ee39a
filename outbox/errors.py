"""The exceptions pusher-outbox raises.

Every exception derives from :class:`OutboxError`. Texts name the field, the rule and the fix and
never echo payload values: an exception text may end up in a log, an error column or a terminal.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Root of every error raised by pusher-outbox."""


class ConfigurationError(OutboxError):
    """A setting is missing or invalid. The text names the variable, never its value."""


class NotificationTypeError(OutboxError):
    """A notification type declaration breaks a rule (raised at declaration time)."""


class PrivacyViolation(OutboxError):
    """Data or names would expose PHI; nothing was written.

    ``field`` names the offending field (or ``"channel"`` / ``"event"``), ``rule`` the rule broken.
    """

    def __init__(self, message: str, *, field: str, rule: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


class PayloadTooLarge(OutboxError):
    """The event's data, as it will be sent, exceeds the size limit; nothing was written."""

    def __init__(self, message: str, *, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(message)
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class SessionError(OutboxError):
    """The session given to enqueue cannot guarantee transactional writes."""


class AuthorizationError(OutboxError):
    """A channel authorization request is malformed or denied.

    ``status`` is the HTTP status an endpoint should answer with (400, 403 or 503).
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class PublishError(OutboxError):
    """Publishing to Pusher failed. ``reason`` is a sanitized, payload-free description."""

    transient: bool = False

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_seconds = retry_after_seconds


class TransientPublishError(PublishError):
    """A failure that may succeed on retry (network, timeout, 5xx, 429, quota, clock skew)."""

    transient = True


class PermanentPublishError(PublishError):
    """A failure that cannot succeed on retry (bad request, bad credentials, too large)."""

    transient = False
