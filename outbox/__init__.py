"""pusher-outbox: a transactional outbox that relays realtime notifications to Pusher Channels
without exposing protected health information (PHI).

Public API (everything else is internal)::

    from outbox import Outbox, NotificationType, OpaqueId, Phi, Enum, new_opaque_id
"""

from outbox.auth import AuthResponse, ChannelAuthorizer
from outbox.catchup import CatchUp
from outbox.errors import (
    AuthorizationError,
    ConfigurationError,
    NotificationTypeError,
    OutboxError,
    PayloadTooLarge,
    PermanentPublishError,
    PrivacyViolation,
    PublishError,
    SessionError,
    TransientPublishError,
)
from outbox.notification import NotificationType
from outbox.policy import Boolean, Count, Enum, OpaqueId, Phi, Timestamp, new_opaque_id
from outbox.producer import Enqueued, Outbox
from outbox.publisher import PusherPublisher
from outbox.retry import RetryPolicy
from outbox.settings import Settings, load_settings
from outbox.store import create_engine

__version__ = "0.1.0"

__all__ = [
    "AuthResponse",
    "AuthorizationError",
    "Boolean",
    "CatchUp",
    "ChannelAuthorizer",
    "ConfigurationError",
    "Count",
    "Enqueued",
    "Enum",
    "NotificationType",
    "NotificationTypeError",
    "OpaqueId",
    "Outbox",
    "OutboxError",
    "PayloadTooLarge",
    "PermanentPublishError",
    "Phi",
    "PrivacyViolation",
    "PublishError",
    "PusherPublisher",
    "RetryPolicy",
    "SessionError",
    "Settings",
    "Timestamp",
    "TransientPublishError",
    "__version__",
    "create_engine",
    "load_settings",
    "new_opaque_id",
]
