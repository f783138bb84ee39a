"""Test kit: a local Pusher-protocol server and a real websocket subscriber.

Needs the development extras (``pip install -e ".[dev]"``, for ``websockets``) and the npm
packages (``make install``).
"""

from outbox.testing.soketi import (
    Soketi,
    SoketiError,
    SoketiNotInstalledError,
    SoketiStartError,
    find_free_port,
)
from outbox.testing.subscriber import Authorize, ReceivedEvent, Subscriber, SubscriptionError

__all__ = [
    "Authorize",
    "ReceivedEvent",
    "Soketi",
    "SoketiError",
    "SoketiNotInstalledError",
    "SoketiStartError",
    "Subscriber",
    "SubscriptionError",
    "find_free_port",
]
