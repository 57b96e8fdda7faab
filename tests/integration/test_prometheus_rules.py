"""A real Prometheus loads deploy/prometheus/rules.yml, scrapes a real HealthServer, and answers every query of the
Grafana dashboard with data."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pipelines.httpserver import HealthServer
from pipelines.metrics import Metrics
from tests.integration.prometheus import Prometheus, api_get, dashboard_queries, prometheus_server, query, wait_for

__all__ = ["prometheus_server"]  # the fixture, imported for pytest

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomalyd.json"


def _rule_states(server: Prometheus) -> dict[str, tuple[str, str]]:
    """alert name -> (health, lastError) from the rules API."""
    groups = api_get(server.base_url, "rules")["groups"]
    return {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}


def test_rules_load_and_evaluate_healthy(prometheus_server: Callable[..., Prometheus]) -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    metrics.set_state(up=True, ready=True)
    metrics.init_topics(["sensors"])
    metrics.set_model_info("sensors-gru", "1", "gru", "cpu")
    with HealthServer(reg, bind="127.0.0.1", port=0) as http:
        server = prometheus_server(targets=[f"127.0.0.1:{http.port}"], rule_files=[RULES])
        expected = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
        deadline = time.monotonic() + 30
        states = _rule_states(server)
        while any(h == "unknown" for h, _ in states.values()) and time.monotonic() < deadline:
            time.sleep(0.5)  # rules are evaluated every second; health is "unknown" until the first run
            states = _rule_states(server)
        assert set(states) == expected
        assert {name: s for name, s in states.items() if s[0] != "ok"} == {}
        # The rules see the daemon's real metrics: it is up, so AnomalydDown has nothing to say.
        assert wait_for(server.base_url, 'up{job="anomalyd"} == 1')
        assert query(server.base_url, 'ALERTS{alertname="AnomalydDown"}') == []


def test_prometheus_scrapes_the_metrics_endpoint(prometheus_server: Callable[..., Prometheus]) -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    metrics.event("sensors", "scored", 17)
    metrics.observe_scores("sensors-gru", [0.5, 2.0])
    with HealthServer(reg, bind="127.0.0.1", port=0) as http:
        server = prometheus_server(targets=[f"127.0.0.1:{http.port}"])
        (sample,) = wait_for(server.base_url, 'anomalyd_events_total{outcome="scored"}')
        assert sample["metric"]["topic"] == "sensors" and float(sample["value"][1]) == 17
        (count,) = wait_for(server.base_url, 'anomalyd_anomaly_score_bucket{le="1.0"}')
        assert float(count["value"][1]) == 1
        assert float(wait_for(server.base_url, "process_resident_memory_bytes")[0]["value"][1]) > 0
    with pytest.raises(RuntimeError, match="parse error"):
        query(server.base_url, "sum(")


def _populate(metrics: Metrics) -> None:
    """Touch every metric the dashboard shows (a GPU gauge needs CUDA and stays empty here)."""
    metrics.set_state(up=True, ready=True)
    metrics.init_topics(["sensors"])
    metrics.set_model_info("sensors-gru", "20261126T200000Z", "gru", "cpu")
    metrics.event("sensors", "scored", 100)
    metrics.dead_letter("sensors", "decode_error")
    metrics.observe_batch("sensors-gru", "cpu", 64, 0.004)
    metrics.observe_scores("sensors-gru", [0.4, 0.8, 1.7], [0.05, 0.08, 0.2], streams=["pump-1", "pump-2", "pump-3"])
    metrics.set_threshold("sensors-gru", 1.0)
    metrics.alert("sensors-gru", "firing", 0.9)
    metrics.open_incidents.set(1)
    metrics.set_consumer_lag({("sensors", 0): 12})
    metrics.rebalances.inc()
    metrics.observe_sink_flush("kafka", 0.003)
    metrics.observe_commit(0.002)
    metrics.set_buffers(3, 4096)
    metrics.streams_max.set(1000)


def test_every_dashboard_query_runs_on_real_prometheus(prometheus_server: Callable[..., Prometheus]) -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg, top_k_streams=5)
    _populate(metrics)
    with HealthServer(reg, bind="127.0.0.1", port=0) as http:
        server = prometheus_server(targets=[f"127.0.0.1:{http.port}"])
        wait_for(server.base_url, "count_over_time(anomalyd_up[1m]) >= 3")  # rates need several scrapes
        # namespace "" is Grafana's value when the variable's query finds no namespace label (docker-compose)
        for namespace in (".*", ""):
            variables = {"datasource": "prometheus", "model": ".*", "namespace": namespace, "job": ".*",
                         "instance": ".*", "__rate_interval": "1m"}
            empty = []
            for title, expr in dashboard_queries(DASHBOARD, variables):
                try:
                    result = query(server.base_url, expr)
                except RuntimeError as exc:
                    pytest.fail(f"panel {title!r}: {expr}\n{exc}")
                if not result:
                    empty.append(title)
            assert empty == ["GPU memory"], namespace  # every other panel shows data from the live metrics endpoint
