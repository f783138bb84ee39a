"""The Celery application. Thin: configuration and signal wiring; delivery logic is in ``outbox``.

Settings are read when Celery first needs its configuration (not at import), and the worker
validates the whole configuration at start, exiting with a message that names the wrong variable.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    beat_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from sqlalchemy.pool import NullPool

from outbox import __version__, log
from outbox.errors import ConfigurationError
from outbox.settings import Settings, load_settings
from outbox.store import Store, create_engine
from workers import runtime

logger = logging.getLogger("workers")

RELAY_TASK = "outbox.relay"
SWEEP_TASK = "outbox.sweep"
QUEUE = "outbox"


def celery_config(settings: Settings, *, producer: bool = True) -> dict[str, Any]:
    """Celery configuration derived from our settings.

    ``producer`` is true in application processes (they only send kicks) and false under
    ``celery worker``/``celery beat``, which keep kombu's reconnection defaults.
    """
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE,
        "task_publish_retry": False,
        "broker_connection_timeout": 2.0,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "outbox-sweep": {"task": SWEEP_TASK, "schedule": settings.sweep_interval_seconds}
        },
        "beat_schedule_filename": str(Path(settings.broker_dir).parent / "celerybeat-schedule"),
    }
    if settings.broker_url.startswith("filesystem://"):
        folder = Path(settings.broker_dir)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        config["broker_transport"] = "workers.broker:Transport"
        config["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "visibility_timeout": 3600,
        }
        if producer:
            # An application's after-commit kick must not wait for a broker that is down: no
            # implicit reconnect loop when publishing. Workers and beat keep kombu's defaults.
            config["broker_transport_options"]["max_retries"] = 0
    return config


def _running_celery_command() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.startswith("celery") or os.path.basename(sys.argv[0]) == "celery"


def _lazy_config() -> dict[str, Any]:
    """Celery's configuration, read when first needed.

    Under ``celery worker``/``celery beat`` a bad setting stops the command with one line naming
    the variable (no traceback); inside an application the error propagates to the caller.
    """
    try:
        return celery_config(load_settings(), producer=not _running_celery_command())
    except ConfigurationError as exc:
        if _running_celery_command():
            raise SystemExit(f"pusher-outbox: {exc}") from None
        raise


app = Celery("pusher_outbox", include=["workers.tasks"])
app.add_defaults(_lazy_config)


@worker_init.connect
def _validate_on_start(**_: Any) -> None:
    """Fail at start, naming the variable, when the configuration is wrong.

    Celery catches ``Exception`` from signal handlers and only logs it (before logging is even
    configured), so the worker would report "ready" and fail every task; ``SystemExit`` is not
    caught and stops the worker with the message.
    """
    try:
        runtime.build().relay.close()
    except ConfigurationError as exc:
        raise SystemExit(f"pusher-outbox worker: {exc}") from None


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    runtime.reset()


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Our structured formatters (payload-free, exception messages withheld) for all logs."""
    settings = load_settings()
    log.configure(settings.log_format, settings.log_level)


class Heartbeat:
    """A daemon thread in the worker's main process that records liveness in outbox_workers."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.store = Store(create_engine(settings.database_url, poolclass=NullPool))
        self.started_at = dt.datetime.now(dt.UTC)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.heartbeat(
                    worker_id=self.worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    version=__version__,
                    started_at=self.started_at,
                )
            except Exception as exc:  # noqa: BLE001 - liveness must not kill the worker
                logger.warning("heartbeat failed", extra={"error_class": type(exc).__name__})
            self._stop.wait(self.settings.heartbeat_seconds)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.forget_worker(self.worker_id)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not remove heartbeat", extra={"error_class": type(exc).__name__})


_heartbeat: Heartbeat | None = None


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    settings = load_settings()
    worker_id = str(getattr(sender, "hostname", None) or f"{socket.gethostname()}:{os.getpid()}")
    _heartbeat = Heartbeat(settings, worker_id)
    _heartbeat.start()
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        from outbox import metrics

        start_http_server(
            settings.metrics_port,
            addr=settings.metrics_host,
            registry=metrics.registry(_heartbeat.store),
        )
        logger.info(
            "metrics exporter listening",
            extra={"host": settings.metrics_host, "port": settings.metrics_port},
        )


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@beat_init.connect
def _validate_beat(**_: Any) -> None:
    load_settings()
