"""The printed table, the ratios to the references, and the targets of issue 7."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.services import REPO_ROOT

TARGET_CEILING_RATIO = 0.8
TARGET_NAIVE_RATIO = 6.0
TARGET_P50_MS = 25.0
TARGET_P99_MS = 150.0
TARGET_BIG_TABLE_RATIO = 0.9


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    for name, argv in {
        "postgresql": ["psql", "--version"],
        "redis": ["redis-server", "--version"],
        "node": ["node", "--version"],
    }.items():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # fixed argv, no shell
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)  # noqa: S603
            info[name] = out.stdout.strip()
    with contextlib.suppress(OSError, ValueError):
        import json

        lock = json.loads((REPO_ROOT / "package-lock.json").read_text())
        info["soketi"] = lock["packages"]["node_modules/@soketi/soketi"]["version"]
    return info


def _by_name(scenarios: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in scenarios if "error" not in s}


def _median(scenario: dict[str, Any] | None, phase: str, metric: str = "events_per_second") -> Any:
    if scenario is None or phase not in scenario:
        return None
    if metric == "events_per_second":
        return scenario[phase]["events_per_second"]["median"]
    return scenario[phase]["latency_ms"][metric]["median"]


def add_ratios(scenarios: list[dict[str, Any]]) -> None:
    """Saturation events/s of every delivery scenario divided by the references of its kind."""
    named = _by_name(scenarios)
    for scenario in named.values():
        if "saturation" not in scenario:
            continue
        mine = _median(scenario, "saturation")
        ratios = {}
        for reference in ("ceiling", "naive"):
            ref = _median(named.get(f"{reference}-{scenario['kind']}"), "saturation")
            ratios[reference] = mine / ref if mine and ref else None
        scenario["ratios"] = ratios


def targets(scenarios: list[dict[str, Any]], options: dict[str, Any]) -> list[dict[str, Any]]:
    named = _by_name(scenarios)
    out: list[dict[str, Any]] = []
    pg_enc = named.get("ours-postgresql-encrypted")
    ratios = (pg_enc or {}).get("ratios", {})
    out.append(
        {
            "target": f"ours/ceiling >= {TARGET_CEILING_RATIO} (saturation events/s, PostgreSQL, "
            "encrypted)",
            "value": ratios.get("ceiling"),
            "met": None
            if ratios.get("ceiling") is None
            else ratios["ceiling"] >= TARGET_CEILING_RATIO,
        }
    )
    out.append(
        {
            "target": f"ours/naive >= {TARGET_NAIVE_RATIO:g} (saturation events/s, PostgreSQL, "
            "encrypted)",
            "value": ratios.get("naive"),
            "met": None if ratios.get("naive") is None else ratios["naive"] >= TARGET_NAIVE_RATIO,
        }
    )
    for name, scenario in named.items():
        if scenario.get("system") != "ours" or "rate" not in scenario:
            continue
        p50, p99 = _median(scenario, "rate", "p50"), _median(scenario, "rate", "p99")
        offered = scenario["rate"]["offered_events_per_second"]["min"]
        sustained = offered is not None and offered >= 0.95 * options["rate"]
        met = None if p50 is None or p99 is None else p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
        out.append(
            {
                "target": f"{name} at {options['rate']:g} ev/s: commit-to-receipt p50 <= "
                f"{TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms"
                + ("" if sustained else " (NOT MET: the producer could not offer the rate)"),
                "value": {"p50_ms": p50, "p99_ms": p99, "offered_min_ev_s": offered},
                "met": met and sustained,
            }
        )
    for name, scenario in named.items():
        if not name.startswith("bigtable-"):
            continue
        ratio = scenario.get("ratio_big_to_empty")
        out.append(
            {
                "target": f"{name}: saturation events/s with {scenario['rows_present']:,} rows "
                f"present within 10% of an empty table (ratio >= {TARGET_BIG_TABLE_RATIO})",
                "value": ratio,
                "met": None if ratio is None else ratio >= TARGET_BIG_TABLE_RATIO,
            }
        )
    return out


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _eps(phase: dict[str, Any]) -> str:
    s = phase["events_per_second"]
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return _f(s["median"])
    return f"{_f(s['median'])} [{_f(s['min'])}-{_f(s['max'])}]"


def _lat(phase: dict[str, Any]) -> str:
    lat = phase["latency_ms"]
    return " / ".join(_f(lat[q]["median"], 1) for q in ("p50", "p95", "p99"))


def _lat_spread(phase: dict[str, Any], q: str) -> str:
    s = phase["latency_ms"][q]
    if s["median"] is None or s["n"] == 1:
        return ""
    return f"{q} [{_f(s['min'], 1)}-{_f(s['max'], 1)}]"


def render(result: dict[str, Any]) -> str:
    options = result["options"]
    lines = []
    m = result["machine"]
    lines.append(
        f"pusher-outbox benchmark: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('memory_gib', '?')} GiB, Python {m['python']}; workers={options['workers']} "
        f"processes, repeat={options['repeat']}, events={options['events']}, "
        f"rate={options['rate']:g} ev/s for {options['duration']:g}s, "
        f"channels={options.get('rooms', 16)}" + (" [quick]" if options["quick"] else "")
    )
    lines.append(
        "Median [min-max] over the repeats. 'saturation': a backlog of --events released at "
        "once, events/s from first to last receipt; 'wait': time in the backlog."
    )
    header = (
        f"{'scenario':28} {'saturation ev/s':>22} {'x ceil':>6} {'x naive':>7} "
        f"{'@rate offered/delivered':>23} {'@rate p50/p95/p99 ms':>22} {'sat wait p50/p99 ms':>20} "
        f"{'RSS MiB':>8} checks"
    )
    lines += ["", header, "-" * len(header)]
    for s in result["scenarios"]:
        if "error" in s:
            lines.append(f"{s['name']:28} ERROR: {s['error']}")
            continue
        if "saturation" not in s:
            continue
        ratios = s.get("ratios", {})
        offered = s["rate"]["offered_events_per_second"]["median"]
        sat_lat = s["saturation"]["latency_ms"]
        rss = (s.get("worker_rss") or {}).get("pool_max_mib")
        runs = s["rate"]["runs"] + s["saturation"]["runs"]
        ok = all(r["ok"] for r in runs)
        short = sum(r["missing"] for r in runs)
        # Order is a check of its own: the naive app promises none (concurrent tasks).
        unordered = sum(r.get("order_violations", 0) for r in runs)
        check = "ok" if ok else f"FAILED ({short} missing)"
        if unordered:
            check += f", {unordered} out of order"
        lines.append(
            f"{s['name']:28} {_eps(s['saturation']):>22} {_f(ratios.get('ceiling'), 2):>6} "
            f"{_f(ratios.get('naive'), 1):>7} "
            f"{_f(offered) + ' / ' + _f(s['rate']['events_per_second']['median']):>23} "
            f"{_lat(s['rate']):>22} "
            f"{_f(sat_lat['p50']['median']) + ' / ' + _f(sat_lat['p99']['median']):>20} "
            f"{_f(rss, 0):>8} {check}"
        )
        spreads = [_lat_spread(s["rate"], q) for q in ("p50", "p99")]
        if any(spreads):
            lines.append(f"{'':28} @rate latency spread: {'  '.join(x for x in spreads if x)}")
    others = [s for s in result["scenarios"] if "error" not in s and "saturation" not in s]
    for s in others:
        if s["name"].startswith("claim-"):
            present = s["rows_present"]
            lines.append("")
            lines.append(
                f"{s['name']}: Store.claim(limit=100) ms, p50 [min-max], with a burst of "
                f"{s['pending_rows']:,} pending rows; big table: {sum(present.values()):,} rows "
                f"({present.get('sent', 0):,} sent)"
            )
            for table in ("empty", "big"):
                cells = []
                for stats in ("stats_before_burst", "stats_current"):
                    c = s[f"{table}_{stats}"]["claim_ms"]
                    cells.append(
                        f"{stats.replace('_', ' ')}: {_f(c['p50'], 1)} "
                        f"[{_f(c['min'], 1)}-{_f(c['max'], 1)}]"
                    )
                mark = s[f"{table}_stats_current"]["mark_sent_ms"]["p50"]
                lines.append(
                    f"  {table + ' table':12} " + "   ".join(cells) + f"   mark_sent {_f(mark, 1)}"
                )
        elif s["name"].startswith("bigtable-"):
            lines.append("")
            missing = sum(r["missing"] for k in ("big", "empty") for r in s[k]["runs"])
            lines.append(
                f"{s['name']}: saturation ev/s (public) {_eps(s['big'])} with {s['rows_present']:,}"
                f" rows present vs {_eps(s['empty'])} on an empty table "
                f"(x{_f(s['ratio_big_to_empty'], 2)})"
                + (f"; {missing} events NOT delivered before the run gave up" if missing else "")
            )
    lines += ["", "Targets (issue 7):"]
    for t in result["targets"]:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        value = t["value"]
        if isinstance(value, dict):
            shown = ", ".join(f"{k}={_f(v, 1)}" for k, v in value.items())
        else:
            shown = _f(value, 2)
        lines.append(f"  [{verdict:7}] {t['target']}: {shown}")
    if options["quick"]:
        lines.append(
            f"  (quick run: {options['backlog_rows']:,} rows instead of 1,000,000 for the "
            "big-table figures; few events: indicative only)"
        )
    lines.append(f"\nTotal time {result['elapsed_seconds']:.0f}s.")
    return "\n".join(lines)
