"""Load generator, run as a subprocess: ``python -m bench.producer CONFIG.json``.

It runs apart from the benchmark process so that its timing is not disturbed by the websocket
subscriber (and the other way round). Modes:

* ``ours``: one event per committed transaction, ``Outbox.enqueue`` with ``on_commit`` calling
  :func:`workers.kick`; the commit time is taken in the ``on_commit`` callback (the database
  commit has returned, the kick is not sent yet).
* ``naive``: one ``bench.naive.trigger.apply_async`` per event (the app's "commit" time is taken
  right before it).
* ``ceiling``: the SDK's ``trigger_batch`` straight to soketi, up to 10 events per request;
  ``share``/``shares`` split the events between several processes started together.

``rate`` (events/s, all shares together) makes an open-loop schedule: event ``i`` is due at
``start + i / rate`` whatever happened before. Without it events go as fast as possible.
``threads`` (ours and naive; default 4) sends from that many threads, as a web application
serves several requests at once: one enqueue-and-commit takes 5 to 10 ms here, so a single thread
could not offer 200 events/s. The result file lists ``[event_id, ready_time]`` pairs (wall
clock, seconds).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import workload
from outbox import new_opaque_id
from outbox.producer import encode_envelope


def _sleep_until(wall_time: float) -> None:
    delay = wall_time - time.time()
    if delay > 0:
        time.sleep(delay)


def _schedule(config: dict[str, Any]) -> list[int]:
    """The global event numbers this process sends, in order."""
    share, shares = config.get("share", 0), config.get("shares", 1)
    return list(range(share, config["count"], shares))


DEFAULT_THREADS = 4


def _paced(
    numbers: Sequence[int],
    rate: float | None,
    start: float,
    send: Callable[[int], None],
    threads: int = 1,
) -> None:
    """Call ``send`` with each due event (open loop); as fast as possible without ``rate``.

    With several ``threads`` the schedule is the same; an event is handed to a free thread at
    its due time (or queued until one is free, which the result shows as a lower offered rate).
    """
    if threads <= 1:
        for number in numbers:
            if rate is not None:
                _sleep_until(start + number / rate)
            send(number)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="producer") as pool:
        futures = []
        for number in numbers:
            if rate is not None:
                _sleep_until(start + number / rate)
            futures.append(pool.submit(send, number))
        for future in futures:
            future.result()  # the first failure ends the run


def _threads(config: dict[str, Any]) -> int:
    return int(config.get("threads") or DEFAULT_THREADS)


def run_ours(config: dict[str, Any], results: list[list[Any]]) -> None:
    from sqlalchemy.orm import Session

    import workers
    from outbox import Outbox
    from outbox.store import create_engine

    kind = config["kind"]
    rooms = config["rooms"]
    notification_type = workload.TYPES[kind]
    local = threading.local()  # the commit time of this thread's last transaction
    lock = threading.Lock()

    def on_commit(row_ids: Sequence[int]) -> None:
        local.committed = time.time()
        workers.kick(row_ids)

    outbox = Outbox(types=[notification_type], encryption_enabled=True, on_commit=on_commit)
    engine = create_engine(config["database_url"])
    with engine.connect():  # connect before the clock starts
        pass
    workers.app.connection_for_write().ensure_connection(max_retries=1)

    def send(number: int) -> None:
        with Session(engine) as session, session.begin():
            enqueued = outbox.enqueue(
                session,
                notification_type,
                ids={"room_id": rooms[number % len(rooms)]},
                data=workload.fields(kind, number),
            )
        with lock:
            results.append([enqueued.event_id, local.committed])

    start = config.get("start_at") or time.time()
    _sleep_until(start)
    _paced(_schedule(config), config.get("rate"), start, send, _threads(config))
    engine.dispose()


def run_naive(config: dict[str, Any], results: list[list[Any]]) -> None:
    from bench import naive

    kind = config["kind"]
    rooms = config["rooms"]
    naive.app.connection_for_write().ensure_connection(max_retries=1)

    lock = threading.Lock()

    def send(number: int) -> None:
        event_id = new_opaque_id("evt")
        envelope = {
            "id": event_id,
            "seq": workload.channel_seq(number, rooms),
            "data": workload.fields(kind, number),
        }
        ready = time.time()
        naive.trigger.apply_async(
            args=(
                workload.channel(kind, rooms[number % len(rooms)]),
                workload.EVENT_NAME,
                envelope,
            ),
        )
        with lock:
            results.append([event_id, ready])

    start = config.get("start_at") or time.time()
    _sleep_until(start)
    _paced(_schedule(config), config.get("rate"), start, send, _threads(config))


def run_ceiling(config: dict[str, Any], results: list[list[Any]]) -> None:
    import pusher

    kind = config["kind"]
    rooms = config["rooms"]
    client = pusher.Pusher(
        app_id=os.environ["PUSHER_APP_ID"],
        key=os.environ["PUSHER_KEY"],
        secret=os.environ["PUSHER_SECRET"],
        host=os.environ["PUSHER_HOST"],
        port=int(os.environ["PUSHER_PORT"]),
        ssl=False,
        encryption_master_key_base64=os.environ["PUSHER_ENCRYPTION_MASTER_KEY_BASE64"],
    )
    rate = config.get("rate")
    start = config.get("start_at") or time.time()
    numbers = _schedule(config)
    _sleep_until(start)
    index = 0
    while index < len(numbers):
        if rate is not None:
            _sleep_until(start + numbers[index] / rate)
            now = time.time()
            end = index + 1
            while end < len(numbers) and end - index < 10 and start + numbers[end] / rate <= now:
                end += 1
        else:
            end = min(index + 10, len(numbers))
        batch, ready = [], []
        for number in numbers[index:end]:
            event_id = new_opaque_id("evt")
            seq = workload.channel_seq(number, rooms)
            data = encode_envelope(event_id, seq, workload.fields(kind, number))
            room = rooms[number % len(rooms)]
            batch.append(
                {"channel": workload.channel(kind, room), "name": workload.EVENT_NAME, "data": data}
            )
            ready.append([event_id, start + number / rate if rate is not None else start])
        client.trigger_batch(batch)  # fresh dicts: the SDK encrypts them in place
        results.extend(ready)
        index = end


MODES = {"ours": run_ours, "naive": run_naive, "ceiling": run_ceiling}


def main(argv: Sequence[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    results: list[list[Any]] = []
    started = time.time()
    error = None
    try:
        MODES[config["mode"]](config, results)
    except Exception as exc:  # noqa: BLE001 - reported to the parent in the result file
        error = f"{type(exc).__name__}: {exc}"
    finished = time.time()
    Path(config["out"]).write_text(
        json.dumps({"events": results, "started": started, "finished": finished, "error": error})
    )
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
