"""Celery wiring for the pusher-outbox relay: ``celery -A workers worker`` and ``… beat``."""

from workers.app import app
from workers.tasks import kick

__all__ = ["app", "kick"]
