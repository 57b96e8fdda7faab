"""An incident open across a clean restart: the shutdown's commit hands it over, the next daemon continues it (one
firing and one resolved alert, one id, on the alerts topic; Alertmanager keeps it active and then resolves it)."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_local import create_topic

from .daemon_support import (
    HISTORY,
    INTERVAL_MS,
    committed_offsets,
    config_dict,
    produce_with_anomalies,
    read_alerts,
    write_config,
)


def _committed_metadata(bootstrap: str, group: str, topic: str) -> str:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    return next(oam.metadata for tp, oam in got.items() if tp.topic == topic)


@pytest.mark.parametrize(("first_client", "second_client"), [("kafka-python", "confluent"),
                                                              ("confluent", "kafka-python")])
def test_an_incident_open_at_a_restart_is_continued_not_fired_again(kafka_bootstrap, topic_name, daemon_models,
                                                                     tmp_path, alertmanager, caplog, first_client,
                                                                     second_client):
    models_dir, names = daemon_models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    group, run = f"g-{topic_name}", uuid.uuid4().hex[:12]
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, group, f"{topic_name}-alerts",
                      client=first_client)
    cfg["sinks"]["alertmanager"] = {"enabled": True, "url": alertmanager.url, "labels": {"test_run": run},
                                    "resend_interval_s": 5}
    path = write_config(tmp_path / "c.yaml", cfg)
    steps, t0 = 200, int(time.time() * 1000) - (HISTORY + 200) * INTERVAL_MS
    # ending inside the anomaly (steps 100-125): the first daemon stops with its incident open
    truth, n1 = produce_with_anomalies(kafka_bootstrap, topic_name, steps, ("level_shift",), first_steps=118,
                                       t0_ms=t0)
    stream = truth[0]["stream"]
    first = Daemon(load_config(path))
    assert first.run(count=n1, timeout=90) == 0
    assert committed_offsets(kafka_bootstrap, group, topic_name) == {0: n1}
    (fired,) = [a for a in read_alerts(kafka_bootstrap, f"{topic_name}-alerts") if a["stream"] == stream]
    assert fired["status"] == "firing"
    handed = json.loads(_committed_metadata(kafka_bootstrap, group, topic_name).rstrip("\x00"))
    assert [i["id"] for i in handed["incidents"]] == [fired["id"]]

    _, n2 = produce_with_anomalies(kafka_bootstrap, topic_name, steps, ("level_shift",), from_step=118, t0_ms=t0)
    cfg["kafka"]["client"] = second_client
    second = Daemon(load_config(write_config(path, cfg)))
    caplog.set_level(logging.INFO, logger="anomalyd")
    runner = threading.Thread(target=second.run, kwargs={"timeout": 120})
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while committed_offsets(kafka_bootstrap, group, topic_name) != {0: n1 + n2}:
            assert runner.is_alive() and time.monotonic() < deadline, "the second daemon did not catch up"
            time.sleep(0.3)
    finally:
        second.request_stop()
        runner.join(timeout=30)
    assert "continuing 1 open incidents handed over" in caplog.text
    alerts = read_alerts(kafka_bootstrap, f"{topic_name}-alerts")
    ours = [(a["status"], a["id"]) for a in alerts if a["stream"] == stream]
    assert ours == [("firing", fired["id"]), ("resolved", fired["id"])]  # not fired again, resolved once
    (resolved,) = [a for a in alerts if a["stream"] == stream and a["status"] == "resolved"]
    assert resolved["started_at"] == fired["started_at"] and resolved["peak_score"] >= fired["peak_score"]
    still = [a for a in alertmanager.alerts() if a["annotations"].get("alert_id") == fired["id"]]
    assert not still, still  # Alertmanager had it active, and got it resolved by the second daemon


def _run(daemon: Daemon) -> threading.Thread:
    runner = threading.Thread(target=daemon.run, kwargs={"timeout": 180})
    runner.start()
    return runner


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_an_incident_open_at_a_rebalance_is_continued_by_whoever_gets_its_partition(kafka_bootstrap, topic_name,
                                                                                     daemon_models, tmp_path, caplog,
                                                                                     client):
    """A second member joins while the first has an incident open: the revoke's commit hands it over, to the
    other member or back to the first (an eager rebalance revokes every partition): one firing, one resolved."""
    models_dir, names = daemon_models
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    group = f"g-{topic_name}"
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, group, f"{topic_name}-alerts", client=client)
    path = write_config(tmp_path / "c.yaml", cfg)
    steps, t0 = 200, int(time.time() * 1000) - (HISTORY + 200) * INTERVAL_MS
    truth, n1 = produce_with_anomalies(kafka_bootstrap, topic_name, steps, ("level_shift",), first_steps=118,
                                       t0_ms=t0)
    stream = truth[0]["stream"]
    caplog.set_level(logging.INFO, logger="anomalyd")
    first, second = Daemon(load_config(path)), Daemon(load_config(path))
    runners = [_run(first)]
    try:
        deadline = time.monotonic() + 90
        while sum(committed_offsets(kafka_bootstrap, group, topic_name).values()) < n1 or not [
                a for a in read_alerts(kafka_bootstrap, f"{topic_name}-alerts") if a["stream"] == stream]:
            assert runners[0].is_alive() and time.monotonic() < deadline, "the first member did not fire"
            time.sleep(0.3)
        runners.append(_run(second))  # the group rebalances: the first member's revoke hands its incident over
        deadline = time.monotonic() + 90
        while len(second.positions.assigned) == 0:
            assert time.monotonic() < deadline, "the second member got no partition"
            time.sleep(0.2)
        _, n2 = produce_with_anomalies(kafka_bootstrap, topic_name, steps, ("level_shift",), from_step=118,
                                       t0_ms=t0)
        deadline = time.monotonic() + 120
        while sum(committed_offsets(kafka_bootstrap, group, topic_name).values()) < n1 + n2:
            assert all(r.is_alive() for r in runners) and time.monotonic() < deadline, "not caught up"
            time.sleep(0.3)
    finally:
        for daemon in (first, second):
            daemon.request_stop()
        for runner in runners:
            runner.join(timeout=30)
    assert "continuing 1 open incidents handed over" in caplog.text
    ours = [(a["status"], a["id"]) for a in read_alerts(kafka_bootstrap, f"{topic_name}-alerts")
            if a["stream"] == stream]
    assert [s for s, _ in ours] == ["firing", "resolved"] and ours[0][1] == ours[1][1], ours
