"""The daemon over SASL against a real broker: PLAIN and SCRAM logins with both clients, and a refused login.

The module's broker has a second listener, SASL_PLAINTEXT, with one user and PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 enabled (``LocalKafka(sasl_port=, sasl_users=)``). The test's own producer and readers use the
broker's PLAINTEXT listener; everything the daemon does (consume, commit, alerts, dead letters) goes through SASL.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_io import make_producer
from pipelines.kafka_local import KafkaSetupError, LocalKafka, create_topic, free_port

from .conftest import service_unavailable
from .daemon_support import (
    committed_offsets,
    config_dict,
    end_offsets,
    produce_with_anomalies,
    read_alerts,
    read_topic,
    write_config,
)

USER, PASSWORD = "anomalyd", "s3cret-for-tests"


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[LocalKafka]:
    broker = LocalKafka(free_port(), sasl_port=free_port(), sasl_users={USER: PASSWORD, "other": "other-secret"})
    try:
        broker.start(timeout_s=120)
    except KafkaSetupError as exc:
        service_unavailable(f"local Kafka broker with a SASL listener could not start: {exc}")
    yield broker
    broker.stop()


def _security(mechanism: str, password: str = PASSWORD) -> dict:
    return {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism, "sasl_username": USER,
            "sasl_password": password}


@pytest.mark.parametrize(("client", "mechanism"), [("kafka-python", "SCRAM-SHA-512"), ("kafka-python", "PLAIN"),
                                                   ("confluent", "SCRAM-SHA-256"), ("confluent", "PLAIN")])
def test_the_daemon_consumes_alerts_and_commits_over_sasl(sasl_broker, topic_name, daemon_models, tmp_path, client,
                                                         mechanism):
    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name, partitions=2)
    truth, n = produce_with_anomalies(sasl_broker.bootstrap, topic_name, 200, ("level_shift",))
    # one malformed record: the dead-letter producer has to log in too
    bad = make_producer("kafka-python", sasl_broker.bootstrap)
    bad.produce(topic_name, b"{not json", key=b"pump-000")
    bad.flush(10)
    bad.close()
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    security = {**_security(mechanism), "sasl_password": None, "sasl_password_file": str(password_file)}
    cfg = config_dict(f"127.0.0.1:{sasl_broker.sasl_port}", topic_name, models_dir, names, client=client)
    cfg["kafka"]["security"] = {k: v for k, v in security.items() if v is not None}
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=n + 1, timeout=120) == 0

    reg = daemon.registry
    assert reg.get_sample_value("anomalyd_events_total", {"topic": topic_name, "outcome": "scored"}) > 0
    alerts = read_alerts(sasl_broker.bootstrap, f"{topic_name}-alerts")
    firing = [a["stream"] for a in alerts if a["status"] == "firing"]
    assert truth[0]["stream"] in firing and len(firing) <= 2, firing  # the anomaly, and at most one false alarm
    assert len(read_topic(sasl_broker.bootstrap, f"{topic_name}-dlq")) == 1
    committed = committed_offsets(sasl_broker.bootstrap, f"g-{topic_name}", topic_name)
    assert committed == end_offsets(sasl_broker.bootstrap, topic_name)


def _run_cli(cfg_path: Path, timeout_s: float) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "-c", str(cfg_path)], capture_output=True,
                          text=True, timeout=timeout_s)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_refused_login_stops_the_confluent_daemon_with_a_config_error(sasl_broker, topic_name, daemon_models,
                                                                        tmp_path):
    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name)
    cfg = config_dict(f"127.0.0.1:{sasl_broker.sasl_port}", topic_name, models_dir, names, client="confluent")
    cfg["kafka"]["security"] = _security("SCRAM-SHA-256", password="wrong-password")
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    code, out = _run_cli(cfg_path, 120)  # retrying for ever would time out here
    assert code == 2, out
    line = next(x for x in out.splitlines() if x.startswith(f"{cfg_path}: kafka.security:"))
    assert "refused the credentials" in line and f"user {USER}" in line and "SCRAM-SHA-256" in line, line
    assert "wrong-password" not in out


def test_a_refused_login_stops_the_kafka_python_daemon_with_a_clear_error(sasl_broker, topic_name, daemon_models,
                                                                         tmp_path):
    """kafka-python retries until its bootstrap timeout (30 s) and often sees only the closed connection."""
    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name)
    cfg = config_dict(f"127.0.0.1:{sasl_broker.sasl_port}", topic_name, models_dir, names, client="kafka-python")
    cfg["kafka"]["security"] = _security("SCRAM-SHA-256", password="wrong-password")
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    code, out = _run_cli(cfg_path, 150)
    error = out[out.index("anomalyd: error:"):]  # to the end: a config error's lines follow its first
    if code == 2:  # the refusal itself was seen
        assert f"{cfg_path}: kafka.security:" in error and "refused the credentials" in error, out
    else:
        assert code == 1 and "cannot connect to Kafka" in error and "check kafka.security" in error, out
    assert f"user {USER}" in error and "Traceback" not in out and "wrong-password" not in out
