"""The Celery application. Thin: configuration and signal wiring; delivery logic is in ``outbox``.

Settings are read when Celery first needs its configuration (not at import), and the worker
validates the whole configuration at start, exiting with a message that names the wrong variable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init

from outbox.settings import Settings, load_settings
from workers import runtime

logger = logging.getLogger("workers")

RELAY_TASK = "outbox.relay"
SWEEP_TASK = "outbox.sweep"
QUEUE = "outbox"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from our settings."""
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
        config["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "visibility_timeout": 3600,
        }
    return config


app = Celery("pusher_outbox", include=["workers.tasks"])
app.add_defaults(lambda: celery_config(load_settings()))


@worker_init.connect
def _validate_on_start(**_: Any) -> None:
    """Fail at start, naming the variable, when the configuration is wrong."""
    runtime.build().relay.close()


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    runtime.reset()


@beat_init.connect
def _validate_beat(**_: Any) -> None:
    load_settings()
