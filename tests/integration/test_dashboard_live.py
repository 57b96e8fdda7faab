"""Every Grafana panel query returns data from a real Prometheus scraping a daemon on a real Kafka stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from tests.integration.prometheus import Prometheus, dashboard_queries, prometheus_server, query, wait_for  # noqa: F401

from .daemon_support import config_dict, produce_with_anomalies, write_config

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "anomalyd.json"


def test_every_dashboard_panel_has_data_from_a_live_daemon(kafka_bootstrap, topic_name, daemon_models, tmp_path,
                                                           prometheus_server: Callable[..., Prometheus]):  # noqa: F811
    models_dir, names = daemon_models
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, f"g-{topic_name}", f"{topic_name}-alerts")
    cfg["metrics"] = {"top_k_streams": 3}
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    runner = threading.Thread(target=daemon.run, kwargs={"timeout": 180})
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.http_port is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.http_port, "daemon HTTP server did not start"
        server = prometheus_server(targets=[f"127.0.0.1:{daemon.http_port}"])
        bad = make_producer("kafka-python", kafka_bootstrap)
        for raw in (b"{broken", b'{"stream": "pump-0", "values": "x"}'):
            bad.produce(topic_name, raw)
        bad.flush(30)
        bad.close()
        produce_with_anomalies(kafka_bootstrap, topic_name, 400, ("spike", "level_shift"), rate=200.0)
        wait_for(server.base_url, "count_over_time(anomalyd_up[1m]) >= 5")
        wait_for(server.base_url, 'anomalyd_alerts_total{status="firing"} > 0')
        variables = {"datasource": "prometheus", "model": ".*", "namespace": ".*", "job": ".*", "instance": ".*",
                     "__rate_interval": "1m"}
        empty = []
        for title, expr in dashboard_queries(DASHBOARD, variables):
            if not query(server.base_url, expr):
                empty.append(title)
        assert empty == ["GPU memory"], empty  # GPU memory is only reported on CUDA devices
    finally:
        daemon.request_stop()
        runner.join(timeout=60)
