"""The scenarios: ceiling, naive baseline, ours (per database and channel kind), claim cost and
throughput with a big table.

Each delivery scenario measures two phases, ``repeat`` times:

* **rate**: an open-loop producer offers ``rate`` events/s (200 by default) for ``duration``
  seconds; we report delivered events/s and commit-to-receipt latency.
* **saturation**: a backlog of ``events`` ready events (committed rows and their kicks, queued
  naive tasks, or events in the ceiling processes' memory) is released at once; we report the
  delivered events/s from the first to the last receipt, and how long events waited.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import backlog, procs, workload
from bench.measure import Producers, RunResult, analyze, open_subscriber, wait_received
from bench.services import Databases, Workers, child_env, flush_redis, queue_length
from bench.stats import percentile, spread
from outbox.store import create_engine
from outbox.testing.soketi import Soketi

log = logging.getLogger("bench")

CLAIM_PENDING_ROWS = 2_000  # at least: every sample and the warm-up claim take 100 rows


@dataclass
class Options:
    events: int = 5000
    duration: float = 10.0
    workers: int = 2
    repeat: int = 3
    rate: float = 200.0
    rooms: int = 16
    backlog_rows: int = 1_000_000
    claim_samples: int = 20
    claim_budget_seconds: float = 60.0
    quick: bool = False
    profile_dir: Path | None = None


@dataclass
class Bench:
    """Everything shared by the scenarios of one run."""

    options: Options
    workdir: Path
    soketi: Soketi
    databases: Databases
    master_key_b64: str
    rooms: list[str]
    big_databases: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        pusher_env = self.soketi.env()
        pusher_env["PUSHER_ENCRYPTION_MASTER_KEY_BASE64"] = self.master_key_b64
        return child_env(pusher_env, **extra)

    def big_database(self, db: str) -> str:
        """A database of ``db`` holding ``backlog_rows`` sent rows (built once per run)."""
        if db not in self.big_databases:
            url = self.databases.create(db)
            self.big_databases[db] = url
            engine = create_engine(url)
            try:
                seconds = backlog.fill(
                    engine, rooms=self.rooms, count=self.options.backlog_rows, status="sent"
                )
                backlog.analyze(engine)
            finally:
                engine.dispose()
            log.info("filled %s with %d sent rows in %.1fs", db, self.options.backlog_rows, seconds)
        return self.big_databases[db]


# -- phases ----------------------------------------------------------------------------------


def _rate_phase(
    b: Bench,
    sub: Any,
    kind: str,
    start: Callable[[dict[str, Any]], list[Any]],
    producers: Producers,
    workers: Workers | None,
) -> RunResult:
    count = max(int(b.options.rate * b.options.duration), 1)
    base = len(sub.events)
    profiler = _start_profiler(b, workers, "rate")
    try:
        started = start({"rate": b.options.rate, "count": count})
        produced = producers.finish(started, b.options.duration * 4 + 60)
        received, ended = wait_received(sub, base, count, timeout_seconds=60)
    finally:
        _stop_profiler(profiler)
    result = analyze(produced, received, kind=kind, backlog=False, gave_up_at=ended)
    if workers is not None:
        # Kicks still queued once every event arrived: relay tasks the workers could not keep up
        # with (each kick runs a whole drain).
        result.extra["messages_left_after_delivery"] = queue_length(workers.queue)
        workers.purge()
    return result


def _backlog_phase(
    b: Bench,
    sub: Any,
    kind: str,
    start: Callable[[dict[str, Any]], list[Any]],
    producers: Producers,
    workers: Workers | None,
) -> RunResult:
    count = b.options.events
    if workers is not None:
        workers.pause()
    base = len(sub.events)
    produced = producers.finish(start({"rate": None, "count": count}), count / 50 + 120)
    early = len(sub.events) - base
    profiler = None
    if workers is not None:
        profiler = _start_profiler(b, workers, "saturation")
        queued = queue_length(workers.queue)
        workers.resume()
    received, ended = wait_received(sub, base, count, timeout_seconds=count / 20 + 60)
    result = analyze(produced, received, kind=kind, backlog=True, gave_up_at=ended)
    if workers is not None:
        _stop_profiler(profiler)
        result.extra["queued_messages"] = queued
        result.extra["messages_left_after_delivery"] = queue_length(workers.queue)
        result.extra["delivered_before_release"] = early
        workers.purge()
        time.sleep(0.5)
    return result


def _start_profiler(
    b: Bench, workers: Workers | None, phase: str
) -> list[subprocess.Popen[bytes]] | None:
    """py-spy (``--idle``, raw format) on each pool process (``--profile DIR``)."""
    if b.options.profile_dir is None or workers is None:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        log.warning("--profile needs py-spy: .venv/bin/pip install py-spy")
        return None
    started = []
    label = workers.name.split("@")[0]
    for pid in workers.child_pids():
        out = b.options.profile_dir / f"{label}-{phase}-{pid}-{time.time():.0f}.txt"
        argv = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                "--idle", "--threads", "--nonblocking", "--output", str(out)]  # fmt: skip
        started.append(
            procs.spawn(argv, env={"PATH": "/usr/bin:/bin"}, log_path=b.workdir / "py-spy.log")
        )
    return started


def _stop_profiler(started: list[subprocess.Popen[bytes]] | None) -> None:
    for process in started or []:
        # SIGINT makes py-spy write its output; then the usual stop.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        procs.stop(process)


@contextlib.contextmanager
def _subscriber(b: Bench, kind: str) -> Iterator[Any]:
    sub = open_subscriber(b.soketi, kind, b.rooms, b.master_key_b64)
    try:
        yield sub
    finally:
        sub.close()


def _warm_up(sub: Any, start: Callable[[dict[str, Any]], list[Any]], producers: Producers) -> None:
    base = len(sub.events)
    produced = producers.finish(start({"rate": 50.0, "count": 10}), 60)
    wait_received(sub, base, len(produced.ready), timeout_seconds=30)


def _phase_summary(runs: list[RunResult]) -> dict[str, Any]:
    return {
        "events_per_second": spread([r.events_per_second for r in runs]),
        "offered_events_per_second": spread([r.producer_events_per_second for r in runs]),
        "latency_ms": {
            q: spread([r.latency_ms[q] for r in runs]) for q in ("p50", "p95", "p99", "max")
        },
        "checks_ok": all(r.ok for r in runs),
        "runs": [r.to_json() for r in runs],
    }


def _result(
    name: str,
    system: str,
    kind: str,
    db: str | None,
    rate: list[RunResult],
    saturation: list[RunResult],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "system": system,
        "kind": kind,
        "database": db,
        "rate": _phase_summary(rate),
        "saturation": _phase_summary(saturation),
        **extra,
    }


def _finish_open_rows(url: str) -> None:
    engine = create_engine(url)
    try:
        backlog.finish_open_rows(engine)
    finally:
        engine.dispose()


def _analyze(url: str) -> None:
    """Statistics of the table in its steady state (nothing pending), as autovacuum keeps them."""
    engine = create_engine(url)
    try:
        backlog.analyze(engine)
    finally:
        engine.dispose()


# -- delivery scenarios ------------------------------------------------------------------------


def ceiling(b: Bench, kind: str) -> dict[str, Any]:
    """The SDK's ``trigger_batch`` (10 events) straight to soketi from ``workers`` processes."""
    producers = Producers(b.workdir, b.env())
    shares = b.options.workers

    def start(config: dict[str, Any]) -> list[Any]:
        at = time.time() + 1.5  # let every process import first
        return [
            producers.start(
                {
                    "mode": "ceiling",
                    "kind": kind,
                    "rooms": b.rooms,
                    "share": share,
                    "shares": shares,
                    "start_at": at,
                    **config,
                }
            )
            for share in range(shares)
        ]

    rate_runs, saturation_runs = [], []
    with _subscriber(b, kind) as sub:
        for _ in range(b.options.repeat):
            rate_runs.append(_rate_phase(b, sub, kind, start, producers, None))
            saturation_runs.append(_backlog_phase(b, sub, kind, start, producers, None))
    return _result(f"ceiling-{kind}", "ceiling", kind, None, rate_runs, saturation_runs)


def naive(b: Bench, kind: str) -> dict[str, Any]:
    """One Celery task per event calling ``pusher.trigger`` (:mod:`bench.naive`)."""
    from bench import naive as naive_app

    env = b.env()
    producers = Producers(b.workdir, env)
    workers = Workers(
        app="bench.naive",
        queue=naive_app.QUEUE,
        concurrency=b.options.workers,
        env=env,
        workdir=b.workdir,
        label=f"naive-{kind}",
    )

    def start(config: dict[str, Any]) -> list[Any]:
        return [producers.start({"mode": "naive", "kind": kind, "rooms": b.rooms, **config})]

    rate_runs, saturation_runs = [], []
    flush_redis()
    try:
        workers.start()
        with _subscriber(b, kind) as sub:
            _warm_up(sub, start, producers)
            for _ in range(b.options.repeat):
                rate_runs.append(_rate_phase(b, sub, kind, start, producers, workers))
                saturation_runs.append(_backlog_phase(b, sub, kind, start, producers, workers))
            rss = workers.rss()
    finally:
        workers.stop()
        flush_redis()
    return _result(f"naive-{kind}", "naive", kind, None, rate_runs, saturation_runs, worker_rss=rss)


def _ours_runs(
    b: Bench, db: str, kind: str, url: str, label: str, *, with_rate: bool
) -> tuple[list[RunResult], list[RunResult], dict[str, Any]]:
    env = b.env(OUTBOX_DATABASE_URL=url)
    producers = Producers(b.workdir, env)
    workers = Workers(
        app="workers",
        queue="outbox",
        concurrency=b.options.workers,
        env=env,
        workdir=b.workdir,
        label=label,
    )

    def start(config: dict[str, Any]) -> list[Any]:
        return [
            producers.start(
                {"mode": "ours", "kind": kind, "rooms": b.rooms, "database_url": url, **config}
            )
        ]

    rate_runs, saturation_runs = [], []
    stalled = False
    flush_redis()
    try:
        workers.start()
        with _subscriber(b, kind) as sub:
            _warm_up(sub, start, producers)
            _analyze(url)
            for _ in range(b.options.repeat):
                if with_rate:
                    rate_runs.append(_rate_phase(b, sub, kind, start, producers, workers))
                saturation_runs.append(_backlog_phase(b, sub, kind, start, producers, workers))
                if saturation_runs[-1].missing:
                    # Delivery stalled: the rows left would pollute another run. Give up here.
                    stalled = True
                    break
            rss = workers.rss()
    finally:
        workers.stop()
        flush_redis()
    if stalled:
        _finish_open_rows(url)
    return rate_runs, saturation_runs, rss


def ours(b: Bench, db: str, kind: str) -> dict[str, Any]:
    """Committed transactions + after-commit kick + our Celery relay workers."""
    url = b.databases.create(db)
    try:
        rate_runs, saturation_runs, rss = _ours_runs(
            b, db, kind, url, f"ours-{db}-{kind}", with_rate=True
        )
    finally:
        b.databases.drop(url)
    return _result(
        f"ours-{db}-{kind}", "ours", kind, db, rate_runs, saturation_runs, worker_rss=rss
    )


def big_table(b: Bench, db: str) -> dict[str, Any]:
    """Saturation throughput (public events) on an empty table and on one with many sent rows."""
    empty_url = b.databases.create(db)
    try:
        _, empty_runs, _ = _ours_runs(
            b, db, workload.PUBLIC, empty_url, f"empty-{db}", with_rate=False
        )
    finally:
        b.databases.drop(empty_url)
    big_url = b.big_database(db)

    engine = create_engine(big_url)
    try:
        backlog.finish_open_rows(engine)
        rows = sum(backlog.count_rows(engine).values())
    finally:
        engine.dispose()
    _, big_runs, _ = _ours_runs(b, db, workload.PUBLIC, big_url, f"big-{db}", with_rate=False)
    empty = spread([r.events_per_second for r in empty_runs])
    big = spread([r.events_per_second for r in big_runs])
    ratio = big["median"] / empty["median"] if big["median"] and empty["median"] else None
    if ratio is None and any(r.missing for r in big_runs):
        ratio = 0.0  # delivery stalled on the big table: certainly not within 10%
    return {
        "name": f"bigtable-{db}",
        "system": "ours",
        "kind": workload.PUBLIC,
        "database": db,
        "rows_present": rows,
        "empty": _phase_summary(empty_runs),
        "big": _phase_summary(big_runs),
        "ratio_big_to_empty": ratio,
    }


# -- claim cost ------------------------------------------------------------------------------


def _claim_samples(url: str, samples: int, budget_seconds: float) -> dict[str, Any]:
    """Time ``samples`` claims of 100 rows (after a warm-up claim), within ``budget_seconds``
    (at least one)."""
    from outbox.store import Store, create_engine

    engine = create_engine(url)
    store = Store(engine)
    claim_ms: list[float] = []
    mark_ms: list[float] = []
    deadline = time.monotonic() + budget_seconds
    try:
        for i in range(samples + 1):
            if i > 1 and time.monotonic() > deadline:
                break
            started = time.perf_counter()
            claim = store.claim(limit=100, lease_seconds=30).events
            claimed = time.perf_counter()
            store.mark_sent(claim, erase_phi_now=True)
            marked = time.perf_counter()
            if len(claim) != 100:
                raise RuntimeError(f"claim returned {len(claim)} rows instead of 100")
            if i >= 1:  # the first claim warms the connection and the caches
                claim_ms.append((claimed - started) * 1000)
                mark_ms.append((marked - claimed) * 1000)
    finally:
        engine.dispose()
    return {
        "claim_ms": {
            "p50": percentile(claim_ms, 50),
            "p90": percentile(claim_ms, 90),
            "min": min(claim_ms),
            "max": max(claim_ms),
        },
        "mark_sent_ms": {
            "p50": percentile(mark_ms, 50),
            "p90": percentile(mark_ms, 90),
            "min": min(mark_ms),
            "max": max(mark_ms),
        },
        "samples": len(claim_ms),
    }


def claim(b: Bench, db: str) -> dict[str, Any]:
    """``Store.claim(limit=100)`` with a burst of pending rows, on a fresh table and on one holding
    ``backlog_rows`` sent rows; each with the planner statistics of the table as it was before the
    burst (what a real table has when a burst arrives) and refreshed after it."""

    results: dict[str, Any] = {}
    rows: dict[str, int] = {}
    pending = max(CLAIM_PENDING_ROWS, 100 * (b.options.claim_samples + 1))
    empty_url = b.databases.create(db)
    try:
        for table, url in (("empty", empty_url), ("big", b.big_database(db))):
            engine = create_engine(url)
            try:
                for stats in ("stats_before_burst", "stats_current"):
                    backlog.finish_open_rows(engine)
                    if stats == "stats_before_burst":
                        backlog.analyze(engine)
                    backlog.fill(engine, rooms=b.rooms, count=pending, status="pending")
                    if stats == "stats_current":
                        backlog.analyze(engine)
                    if table == "big":
                        rows = backlog.count_rows(engine)
                    results[f"{table}_{stats}"] = _claim_samples(
                        url, b.options.claim_samples, b.options.claim_budget_seconds
                    )
                backlog.finish_open_rows(engine)
            finally:
                engine.dispose()
    finally:
        b.databases.drop(empty_url)
    worst = max(r["claim_ms"]["p50"] for r in results.values())
    best = min(r["claim_ms"]["p50"] for r in results.values())
    return {
        "name": f"claim-{db}",
        "database": db,
        "rows_present": rows,
        "pending_rows": pending,
        **results,
        "ratio_big_to_empty": results["big_stats_current"]["claim_ms"]["p50"]
        / results["empty_stats_current"]["claim_ms"]["p50"],
        "ratio_worst_to_best": worst / best if best else None,
    }
