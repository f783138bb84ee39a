"""The pusher-outbox benchmark suite (``make bench`` / ``python -m bench``).

Everything runs against the real components: PostgreSQL, SQLite, Redis as the Celery broker,
soketi as the Pusher server, ``celery -A workers worker`` subprocesses, and one real websocket
subscriber that counts and checks every event. Each figure is printed next to two references
measured in the same run (the SDK's ``trigger_batch`` ceiling and a naive one-task-per-event
Celery app), as ratios. See ``docs/benchmarks.md`` for the method and the results.

Modules: ``cli`` (options, scenario selection, output), ``scenarios`` (the measurements),
``measure`` (producers as subprocesses, the subscriber, checks), ``producer`` (the load
generator process), ``naive`` (the baseline Celery app), ``services`` (databases, Redis, Celery
workers), ``backlog`` (bulk-filled tables), ``procs`` (bounded subprocesses), ``report`` (table,
ratios, targets), ``flame`` (py-spy profile summaries: ``python -m bench.flame FILE...``).
"""
