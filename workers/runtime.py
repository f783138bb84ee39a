"""Per-process relay objects, built lazily after fork and never shared between processes."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from outbox.metrics import PrometheusObserver
from outbox.publisher import PusherPublisher
from outbox.relay import Relay
from outbox.retry import RetryPolicy
from outbox.settings import Settings, load_settings
from outbox.store import Store, create_engine


@dataclass
class Runtime:
    settings: Settings
    store: Store
    relay: Relay
    pid: int


_lock = threading.Lock()
_runtime: Runtime | None = None


def build(settings: Settings | None = None) -> Runtime:
    """Validate configuration and build the store, publisher and relay for this process."""
    settings = settings or load_settings()
    publisher = PusherPublisher.from_settings(settings)
    engine = create_engine(settings.database_url)
    store = Store(engine)
    relay = Relay(
        store=store,
        publisher=publisher,
        retry_policy=RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay_seconds=settings.retry_base_delay_seconds,
            max_delay_seconds=settings.retry_max_delay_seconds,
            max_age_seconds=settings.retry_max_age_seconds,
        ),
        claim_batch_size=settings.claim_batch_size,
        lease_seconds=settings.lease_seconds,
        publish_concurrency=settings.publish_concurrency,
        phi_retention_seconds=settings.phi_retention_seconds,
        observer=PrometheusObserver(),
        publish_timeout_seconds=settings.publish_timeout_seconds,
    )
    return Runtime(settings=settings, store=store, relay=relay, pid=os.getpid())


def get() -> Runtime:
    """This process's runtime; rebuilt when the process was forked since it was made."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = build()
        return _runtime


def reset() -> None:
    """Forget the runtime (called after fork: engines and pools must not cross a fork)."""
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            _runtime.relay.close()
            _runtime.store.engine.dispose()
        _runtime = None
