"""deploy/grafana: the dashboard is valid Grafana JSON on a Prometheus datasource variable and
queries only metrics the services document (docs/observability.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.deploy.manifests import DEPLOY, ROOT

DASHBOARD = DEPLOY / "grafana" / "tandem-dashboard.json"
OBSERVABILITY_DOC = ROOT / "docs" / "observability.md"
# The metric names agreed for issue 7 (+ the two docs/observability.md added: parked requests and
# computed prompt tokens), used when that document, the reference, is absent.
AGREED_METRICS = frozenset(
    [
        "tandem_gateway_requests_total",
        "tandem_gateway_request_duration_seconds",
        "tandem_gateway_time_to_first_token_seconds",
        "tandem_gateway_requests_in_flight",
        "tandem_router_requests_total",
        "tandem_router_requests_running",
        "tandem_router_time_to_first_token_seconds",
        "tandem_router_inter_token_latency_seconds",
        "tandem_router_e2e_request_latency_seconds",
        "tandem_router_prompt_tokens_total",
        "tandem_router_generation_tokens_total",
        "tandem_router_cached_tokens_total",
        "tandem_router_decisions_total",
        "tandem_router_worker_errors_total",
        "tandem_router_retries_total",
        "tandem_router_workers",
        "tandem_worker_info",
        "tandem_worker_requests_running",
        "tandem_worker_requests_waiting",
        "tandem_worker_requests_parked",
        "tandem_worker_kv_usage_ratio",
        "tandem_worker_kv_tokens",
        "tandem_worker_prompt_tokens_total",
        "tandem_worker_prompt_tokens_computed_total",
        "tandem_worker_generation_tokens_total",
        "tandem_worker_cached_tokens_total",
        "tandem_worker_prefix_cache_hit_ratio",
        "tandem_worker_time_to_first_token_seconds",
        "tandem_worker_inter_token_latency_seconds",
        "tandem_worker_e2e_request_latency_seconds",
        "tandem_worker_kv_transfer_bytes_total",
        "tandem_worker_kv_transfer_seconds",
        "tandem_worker_kv_transfer_failures_total",
        "tandem_worker_retractions_total",
    ]
)
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def documented_metrics() -> frozenset[str]:
    """The backticked first column of the metric tables in docs/observability.md (else the list)."""
    if not OBSERVABILITY_DOC.exists():
        return AGREED_METRICS
    names = set()
    for line in OBSERVABILITY_DOC.read_text().splitlines():
        cells = line.strip().split("|")
        if len(cells) > 2 and (m := re.match(r"\s*`(tandem_[A-Za-z0-9_:]*)", cells[1])):
            names.add(m.group(1))
    assert names, f"{OBSERVABILITY_DOC} has no metric table (| `tandem_...` | ... |)"
    return frozenset(names)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def queried_series(dashboard: dict[str, Any]) -> set[str]:
    return {
        name
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        for name in re.findall(r"\btandem_[a-z0-9_]+\b", target["expr"])
    }


def metric_family(series: str, documented: frozenset[str]) -> str | None:
    if series in documented:
        return series
    for suffix in _HISTOGRAM_SERIES:
        if series.endswith(suffix) and series.removesuffix(suffix) in documented:
            return series.removesuffix(suffix)
    return None


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_grafana_json_on_a_prometheus_datasource_variable() -> None:
    dashboard = load()
    (variable,) = (v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"] == panel["datasource"]


def test_dashboard_queries_only_documented_metrics() -> None:
    documented = documented_metrics()
    unknown = {s for s in queried_series(load()) if metric_family(s, documented) is None}
    assert not unknown, f"not in {OBSERVABILITY_DOC.name}: {sorted(unknown)}"


def test_dashboard_shows_every_agreed_metric() -> None:
    documented = documented_metrics()
    shown = {metric_family(s, documented) for s in queried_series(load())}
    assert not (AGREED_METRICS & documented) - shown


def test_latency_panels_use_histogram_quantiles_over_rates() -> None:
    for panel in panels(load()):
        for target in panel.get("targets", []):
            for series in re.findall(r"\btandem_[a-z0-9_]+_bucket\b", target["expr"]):
                assert "histogram_quantile(" in target["expr"] and f"rate({series}[" in target["expr"]
