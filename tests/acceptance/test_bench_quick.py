"""`python -m bench --quick --json` as `make bench` runs it: every scenario, real services.

Not a timed assertion: the figures belong to the benchmark report. What is checked is that every
scenario ran end to end against PostgreSQL, SQLite, Redis, soketi and real Celery workers, that
the subscriber received every event it was owed exactly once (decrypted where encrypted, in
per-channel order for the outbox), and that each delivery scenario reports positive events/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import service_missing

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_UNAVAILABLE = 3  # bench exit status when PostgreSQL, Redis or soketi is missing

DELIVERY_SCENARIOS = {
    "ceiling-public",
    "ceiling-encrypted",
    "naive-public",
    "naive-encrypted",
    "ours-postgresql-public",
    "ours-postgresql-encrypted",
    "ours-sqlite-public",
    "ours-sqlite-encrypted",
}
CLAIM_SCENARIOS = {"claim-postgresql", "claim-sqlite"}


@pytest.fixture(scope="module")
def quick_run() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PUSHER_"))}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--json", "--lock-timeout", "60"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"python -m bench --quick did not finish in {exc.timeout}s")
    if proc.returncode == SERVICES_UNAVAILABLE:
        service_missing(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_benchmark_runs_every_scenario(quick_run):
    names = {s["name"] for s in quick_run["scenarios"]}
    assert names >= DELIVERY_SCENARIOS | CLAIM_SCENARIOS
    assert [s for s in quick_run["scenarios"] if "error" in s] == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_delivery_scenario_reports_positive_events_per_second(quick_run):
    delivery = [s for s in quick_run["scenarios"] if s["name"] in DELIVERY_SCENARIOS]
    assert {s["name"] for s in delivery} == DELIVERY_SCENARIOS
    for scenario in delivery:
        for phase in ("rate", "saturation"):
            assert scenario[phase]["events_per_second"]["median"] > 0, (scenario["name"], phase)
            for run in scenario[phase]["runs"]:
                assert run["events_per_second"] > 0, (scenario["name"], phase)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_subscriber_got_every_event_once_and_readable(quick_run):
    for scenario in quick_run["scenarios"]:
        if scenario["name"] not in DELIVERY_SCENARIOS:
            continue
        for phase in ("rate", "saturation"):
            for run in scenario[phase]["runs"]:
                where = (scenario["name"], phase)
                assert run["delivered"] == run["expected"] > 0, where
                assert run["duplicates"] == 0, where
                assert run["undecrypted"] == 0, where
                if scenario["system"] == "ours":
                    assert run["order_violations"] == 0, where


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_claim_cost_and_targets_are_reported(quick_run):
    claims = [s for s in quick_run["scenarios"] if s["name"] in CLAIM_SCENARIOS]
    for scenario in claims:
        assert sum(scenario["rows_present"].values()) >= quick_run["options"]["backlog_rows"]
        for variant in ("empty", "big"):
            for stats in ("stats_before_burst", "stats_current"):
                assert scenario[f"{variant}_{stats}"]["claim_ms"]["p50"] > 0
    targets = quick_run["targets"]
    assert targets and all(t["met"] in (True, False, None) for t in targets)
    rss = [s["worker_rss"]["pool_max_mib"] for s in quick_run["scenarios"] if "worker_rss" in s]
    assert rss and all(r and r > 0 for r in rss)
