"""The naive baseline: what most applications write today.

One Celery task per event, the payload in the task arguments (so it sits in the broker, PHI
included), and ``pusher.trigger`` called once per event by a module-level client. Default Celery
settings apart from JSON and no result backend. Run it with::

    celery -A bench.naive worker -Q bench-naive

Configured from the environment: ``BENCH_BROKER_URL`` and the ``PUSHER_*`` variables.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pusher
from celery import Celery

QUEUE = "bench-naive"
TASK = "bench.naive.trigger"

app = Celery("bench_naive")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12"),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@functools.cache
def client() -> pusher.Pusher:
    """One SDK client per worker process (created after fork, on first use)."""
    return pusher.Pusher(
        app_id=os.environ["PUSHER_APP_ID"],
        key=os.environ["PUSHER_KEY"],
        secret=os.environ["PUSHER_SECRET"],
        host=os.environ["PUSHER_HOST"],
        port=int(os.environ["PUSHER_PORT"]),
        ssl=os.environ.get("PUSHER_SCHEME", "http") == "https",
        encryption_master_key_base64=os.environ.get("PUSHER_ENCRYPTION_MASTER_KEY_BASE64"),
    )


@app.task(name=TASK, ignore_result=True)
def trigger(channel: str, event: str, data: dict[str, Any]) -> None:
    client().trigger(channel, event, data)
