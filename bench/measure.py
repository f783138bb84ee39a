"""Producers as subprocesses, the websocket subscriber, and what one run measured.

Latency is ``received_at`` (the subscriber's wall clock when the frame arrived) minus the
event's ready time (commit for the outbox, the ``apply_async`` call for the naive baseline, the
scheduled time for the ceiling); both clocks are this machine's. Throughput counts events the
subscriber received and checked, from the first to the last one of the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pusher

from bench import procs, workload
from bench.stats import latency_ms
from outbox import ChannelAuthorizer, Outbox
from outbox.testing.soketi import Soketi
from outbox.testing.subscriber import ReceivedEvent, Subscriber

# A run ends when everything arrived, or when nothing new arrived for this long.
STALL_SECONDS = 15.0


@dataclass
class Produced:
    ready: dict[str, float]
    started: float
    finished: float

    @property
    def rate(self) -> float | None:
        """Events/s the producer achieved (from its first to its last ready time)."""
        times = self.ready.values()
        if len(self.ready) < 2 or max(times) <= min(times):
            return None
        return (len(self.ready) - 1) / (max(times) - min(times))


class Producers:
    """Start ``python -m bench.producer`` processes and collect what they sent."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env

    def start(self, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
        token = uuid.uuid4().hex[:8]
        config_path = self.workdir / f"producer-{token}.json"
        out = self.workdir / f"producer-{token}.out.json"
        config_path.write_text(json.dumps({**config, "out": str(out)}))
        process = procs.spawn(
            [sys.executable, "-m", "bench.producer", str(config_path)],
            env=self.env,
            log_path=self.workdir / "producers.log",
            cwd=self.workdir,
        )
        return process, out

    def finish(
        self, started: list[tuple[subprocess.Popen[bytes], Path]], timeout_seconds: float
    ) -> Produced:
        ready: dict[str, float] = {}
        first, last = float("inf"), 0.0
        deadline = time.monotonic() + timeout_seconds
        for process, out in started:
            code = procs.wait(process, max(deadline - time.monotonic(), 1.0), "producer")
            result = json.loads(out.read_text()) if out.exists() else {"error": "no result"}
            if code != 0 or result.get("error"):
                raise RuntimeError(
                    f"producer failed ({code}): {result.get('error')}; see "
                    f"{self.workdir / 'producers.log'}"
                )
            ready.update((event_id, at) for event_id, at in result["events"])
            first, last = min(first, result["started"]), max(last, result["finished"])
        return Produced(ready, first, last)

    def run(self, config: dict[str, Any], timeout_seconds: float) -> Produced:
        return self.finish([self.start(config)], timeout_seconds)


def open_subscriber(server: Soketi, kind: str, rooms: list[str], master_key_b64: str) -> Subscriber:
    """A websocket subscriber on every channel of ``kind``, encrypted ones authorized by the
    product's own :class:`ChannelAuthorizer`."""
    sub = Subscriber(server.ws_url, server.key, timeout_seconds=15)
    try:
        sub.connect()
        client = pusher.Pusher(
            app_id=server.app_id,
            key=server.key,
            secret=server.secret,
            host=server.host,
            port=server.port,
            ssl=False,
            encryption_master_key_base64=master_key_b64,
        )
        authorizer = ChannelAuthorizer(
            outbox=Outbox(types=[workload.TYPES[kind]], encryption_enabled=True),
            pusher_client=client,
            may_subscribe=lambda user, channel, notification_type, ids: True,
        )

        def authorize(socket_id: str, channel: str) -> dict[str, Any]:
            return authorizer.authorize("bench", socket_id=socket_id, channel_name=channel)

        for room in rooms:
            name = workload.channel(kind, room)
            sub.subscribe(name, authorize if kind == workload.ENCRYPTED else None)
    except BaseException:
        sub.close()
        raise
    return sub


def wait_received(
    sub: Subscriber, base: int, expected: int, timeout_seconds: float
) -> tuple[list[ReceivedEvent], float]:
    """Events received after index ``base``, once ``expected`` arrived or progress stalled,
    and the wall-clock time the wait ended."""
    deadline = time.monotonic() + timeout_seconds
    last_count, last_progress = -1, time.monotonic()
    while True:
        count = len(sub.events) - base
        now = time.monotonic()
        if count != last_count:
            last_count, last_progress = count, now
        if count >= expected or now >= deadline or now - last_progress >= STALL_SECONDS:
            break
        time.sleep(0.05)
    ended = time.time()
    time.sleep(0.2)  # let late duplicates show up
    return sub.events[base:], ended


@dataclass
class RunResult:
    """One measured run. ``events_per_second`` counts checked receipts, first to last."""

    expected: int
    delivered: int
    events_per_second: float | None
    latency_ms: dict[str, float | None]
    producer_events_per_second: float | None
    missing: int = 0
    duplicates: int = 0
    unknown: int = 0
    undecrypted: int = 0
    order_violations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicates == 0 and self.undecrypted == 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def analyze(
    produced: Produced,
    received: list[ReceivedEvent],
    *,
    kind: str,
    backlog: bool,
    gave_up_at: float | None = None,
) -> RunResult:
    """Check every receipt against what was produced and compute throughput and latency.

    ``backlog``: the events were all ready before delivery started, so a receipt's latency is
    counted from the later of its ready time and the first receipt (the time it waited in the
    backlog while delivery was running). When events are missing, throughput is counted up to
    ``gave_up_at`` (when the wait for them ended), not up to the last receipt.
    """
    seen: dict[str, float] = {}
    duplicates = unknown = undecrypted = order_violations = 0
    last_seq: dict[str, int] = {}
    for event in received:
        data = event.data
        if kind == workload.ENCRYPTED and not event.decrypted:
            undecrypted += 1
            continue
        if not isinstance(data, dict) or data.get("id") not in produced.ready:
            unknown += 1
            continue
        event_id = data["id"]
        if event_id in seen:
            duplicates += 1
            continue
        seen[event_id] = event.received_at
        seq = data.get("seq")
        if isinstance(seq, int):
            if seq < last_seq.get(event.channel, -1):
                order_violations += 1
            last_seq[event.channel] = seq
    times = sorted(seen.values())
    eps = None
    end = times[-1] if times else 0.0
    if len(seen) < len(produced.ready) and gave_up_at is not None:
        end = max(end, gave_up_at)
    if len(times) > 1 and end > times[0]:
        eps = (len(times) - 1) / (end - times[0])
    start = times[0] if times else 0.0
    waits = [
        at - (max(produced.ready[event_id], start) if backlog else produced.ready[event_id])
        for event_id, at in seen.items()
    ]
    return RunResult(
        expected=len(produced.ready),
        delivered=len(seen),
        events_per_second=eps,
        latency_ms=latency_ms(waits),
        producer_events_per_second=produced.rate,
        missing=len(produced.ready) - len(seen),
        duplicates=duplicates,
        unknown=unknown,
        undecrypted=undecrypted,
        order_violations=order_violations,
        extra={"first_receipt_at": start, "last_receipt_at": end},
    )
