"""The shipped alert rules and Grafana dashboard parse and name only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from outbox import metrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
SUFFIXES = ("_bucket", "_sum", "_count", "_created")
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "and",
    "or",
    "le",
    "without",
}


def exported_names() -> set[str]:
    names = set(metrics.GAUGE_NAMES)
    for collector in metrics.RELAY_METRICS:
        for family in collector.describe():
            base = family.name
            names.add(base)
            names.add(base + "_total")
            names.update(base + suffix for suffix in SUFFIXES)
    return names


def metric_names(expr: str) -> set[str]:
    without_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_groupings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges))
    return {t for t in tokens if t.startswith("outbox_")} | {
        t for t in tokens if t not in PROMQL_WORDS and "_" in t and not t.startswith("outbox_")
    }


def test_alert_rules_name_existing_metrics():
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) >= 5
    known = exported_names()
    for expr in exprs:
        names = metric_names(str(expr))
        assert names, expr
        assert names <= known, f"{expr}: unknown {names - known}"


def test_grafana_dashboard_names_existing_metrics():
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 8
    known = exported_names()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"{expr}: unknown {names - known}"


def test_the_check_itself_catches_a_typo():
    assert metric_names("rate(outbox_events_publishd_total[5m])") - exported_names()
