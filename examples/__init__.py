"""Runnable examples of pusher-outbox (run them from the repository root)."""
