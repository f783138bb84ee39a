"""``python -m bench``: run the benchmark scenarios and print a table (or JSON).

Exit status: 0 when every selected scenario ran (targets are reported, never enforced), 1 when a
scenario failed, 2 on bad arguments, 3 when PostgreSQL, Redis or soketi is unavailable, 4 when
another run kept the benchmark lock too long.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import procs, report, scenarios, workload
from bench.services import (
    POSTGRESQL,
    SQLITE,
    Databases,
    ServiceUnavailable,
    check_services,
    drop_leftover_databases,
    exclusive_run,
    flush_redis,
    new_master_key_b64,
)

log = logging.getLogger("bench")

ScenarioFn = Callable[[scenarios.Bench], dict[str, Any]]

SCENARIOS: dict[str, ScenarioFn] = {
    "ceiling-public": lambda b: scenarios.ceiling(b, workload.PUBLIC),
    "ceiling-encrypted": lambda b: scenarios.ceiling(b, workload.ENCRYPTED),
    "naive-public": lambda b: scenarios.naive(b, workload.PUBLIC),
    "naive-encrypted": lambda b: scenarios.naive(b, workload.ENCRYPTED),
    "ours-postgresql-public": lambda b: scenarios.ours(b, POSTGRESQL, workload.PUBLIC),
    "ours-postgresql-encrypted": lambda b: scenarios.ours(b, POSTGRESQL, workload.ENCRYPTED),
    "ours-sqlite-public": lambda b: scenarios.ours(b, SQLITE, workload.PUBLIC),
    "ours-sqlite-encrypted": lambda b: scenarios.ours(b, SQLITE, workload.ENCRYPTED),
    "claim-postgresql": lambda b: scenarios.claim(b, POSTGRESQL),
    "claim-sqlite": lambda b: scenarios.claim(b, SQLITE),
    "bigtable-postgresql": lambda b: scenarios.big_table(b, POSTGRESQL),
    "bigtable-sqlite": lambda b: scenarios.big_table(b, SQLITE),
}

QUICK = {
    "events": 400,
    "duration": 2.0,
    "repeat": 1,
    "backlog_rows": 100_000,
    "claim_samples": 4,
    "claim_budget_seconds": 4.0,
}
FULL = {
    "events": 5000,
    "duration": 10.0,
    "repeat": 3,
    "backlog_rows": 1_000_000,
    "claim_samples": 20,
    "claim_budget_seconds": 60.0,
}
# Too slow for --quick (two relay runs each, on tables of --backlog-rows): only with --only.
NOT_QUICK = ("bigtable-postgresql", "bigtable-sqlite")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pusher-outbox against the SDK ceiling and a naive Celery app.",
        epilog="Scenarios: " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--events",
        type=int,
        help="backlog size of a saturation run "
        f"(default {FULL['events']}, quick {QUICK['events']})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds of a fixed-rate run "
        f"(default {FULL['duration']:g}, quick {QUICK['duration']:g})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes of the relay, the naive app and the ceiling (default 2)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per phase, for medians and spread "
        f"(default {FULL['repeat']}, quick {QUICK['repeat']})",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="offered load of the fixed-rate runs, events/s (default 200)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=16,
        help="channels the events are spread over, each its own ordering key (default 16); "
        "events of one channel are delivered in order, so channels bound how many relay "
        "processes can work at once",
    )
    parser.add_argument(
        "--backlog-rows",
        type=int,
        help="sent rows in the big-table scenarios "
        f"(default {FULL['backlog_rows']:,}, quick {QUICK['backlog_rows']:,})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small run (under 2 minutes): fewer events, one repeat, 100k rows",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--only", help="comma-separated scenario names or globs, e.g. 'ours-postgresql-*,ceiling-*'"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of the relay pool processes during saturation runs into DIR",
    )
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=3600.0,
        help="seconds to wait for another benchmark run to finish (default 3600)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (logs) even when everything passed",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.events < 10 or args.duration <= 0 or args.workers < 1 or args.repeat < 1:
        parser.error("--events >= 10, --duration > 0, --workers >= 1 and --repeat >= 1")
    if args.rate <= 0 or args.backlog_rows < 1000:
        parser.error("--rate > 0 and --backlog-rows >= 1000")
    selected = [n for n in SCENARIOS if not (args.quick and n in NOT_QUICK)]
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        selected = [n for n in SCENARIOS if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not selected:
            parser.error(
                f"--only {args.only!r} selects no scenario; choose from " + ", ".join(SCENARIOS)
            )
    args.selected = selected
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    procs.install_signal_handlers()
    try:
        with exclusive_run(args.lock_timeout):
            return run(args)
    except TimeoutError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 4


def run(args: argparse.Namespace) -> int:
    options = scenarios.Options(
        events=args.events,
        duration=args.duration,
        workers=args.workers,
        repeat=args.repeat,
        rate=args.rate,
        rooms=args.channels,
        backlog_rows=args.backlog_rows,
        claim_samples=args.claim_samples,
        claim_budget_seconds=args.claim_budget_seconds,
        quick=args.quick,
        profile_dir=args.profile.resolve() if args.profile else None,
    )
    if options.profile_dir is not None:
        options.profile_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        check_services()
    except ServiceUnavailable as exc:
        print(f"bench: service unavailable: {exc}; run scripts/ensure_services.sh", file=sys.stderr)
        return 3
    from outbox.testing.soketi import Soketi, SoketiError

    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    failed = False
    results: list[dict[str, Any]] = []
    machine = report.machine()
    databases = Databases(workdir)
    server = Soketi()
    try:
        drop_leftover_databases()
        flush_redis()
        try:
            server.start()
        except SoketiError as exc:
            print(f"bench: soketi unavailable: {exc}", file=sys.stderr)
            return 3
        bench = scenarios.Bench(
            options=options,
            workdir=workdir,
            soketi=server,
            databases=databases,
            master_key_b64=new_master_key_b64(),
            rooms=workload.new_rooms(options.rooms),
        )
        for name in args.selected:
            log.info("scenario %s ...", name)
            t0 = time.monotonic()
            for attempt in (1, 2):
                try:
                    results.append(SCENARIOS[name](bench))
                    break
                except Exception as exc:  # noqa: BLE001 - a failed scenario must not hide the rest
                    log.error("scenario %s failed: %s", name, traceback.format_exc())
                    if attempt == 1:
                        # A service restarted under us (another test suite on the machine):
                        # one more try before reporting the scenario as failed.
                        log.info("scenario %s: retrying once", name)
                        procs.stop_all()
                        flush_redis()
                        time.sleep(5)
                        continue
                    failed = True
                    results.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            log.info("scenario %s done in %.0fs", name, time.monotonic() - t0)
    finally:
        procs.stop_all()
        server.close()
        databases.close()
        flush_redis()
        if failed or args.keep:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report.add_ratios(results)
    option_values = {k: v for k, v in dataclasses.asdict(options).items() if k != "profile_dir"}
    result = {
        "version": 1,
        "machine": machine,
        "options": option_values,
        "scenarios": results,
        "targets": report.targets(results, option_values),
        "elapsed_seconds": time.monotonic() - started,
    }
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(report.render(result))
    return 1 if failed else 0
