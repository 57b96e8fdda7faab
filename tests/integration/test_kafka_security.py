"""The daemon over SASL and TLS against a real broker: PLAIN and SCRAM logins with both clients, over
SASL_PLAINTEXT and SASL_SSL, TLS alone (SSL) and mutual TLS (a client certificate); a refused login, a refused
client and an untrusted broker certificate.

The module's broker has four more listeners, SASL_PLAINTEXT, SASL_SSL, SSL and MTLS (SSL that requires a client
certificate; its own CA, ``ca_file``, issued the broker's and the client's), with PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512 enabled (``LocalKafka(sasl_port=, sasl_ssl_port=, ssl_port=, mtls_port=, sasl_users=)``). The test's
own producer and readers use the broker's PLAINTEXT listener; everything the daemon does (consume, commit,
alerts, dead letters) goes through the secured one.
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
from pipelines.kafka_local_security import CLIENT_KEY_PASSWORD
from pipelines.kafka_security import KafkaAuthenticationError, KafkaBootstrapError
from pipelines.source import make_source

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
    broker = LocalKafka(free_port(), sasl_port=free_port(), sasl_ssl_port=free_port(), ssl_port=free_port(),
                        sasl_users={USER: PASSWORD, "other": "other-secret"}, mtls_port=free_port(),
                        exit_with_parent=True)
    try:
        broker.start(timeout_s=120)
    except KafkaSetupError as exc:
        service_unavailable(f"local Kafka broker with SASL and SASL_SSL listeners could not start: {exc}")
    yield broker
    broker.stop()


def _security(mechanism: str, password: str = PASSWORD, protocol: str = "SASL_PLAINTEXT") -> dict:
    return {"protocol": protocol, "sasl_mechanism": mechanism, "sasl_username": USER, "sasl_password": password}


def _bootstrap(broker: LocalKafka, protocol: str) -> str:
    ports = {"SASL_SSL": broker.sasl_ssl_port, "SSL": broker.ssl_port, "MTLS": broker.mtls_port}
    return f"127.0.0.1:{ports.get(protocol, broker.sasl_port)}"


def _mutual_tls(broker: LocalKafka) -> dict:
    """``kafka.security`` for the MTLS listener: TLS with the broker's CA and the client certificate."""
    cert, key = broker.client_certificate
    return {"protocol": "SSL", "ssl_cafile": str(broker.ca_file), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}


@pytest.mark.parametrize(("client", "mechanism", "protocol"), [
    ("kafka-python", "SCRAM-SHA-512", "SASL_PLAINTEXT"), ("kafka-python", "PLAIN", "SASL_SSL"),
    ("confluent", "SCRAM-SHA-256", "SASL_SSL"), ("confluent", "PLAIN", "SASL_PLAINTEXT"),
    ("kafka-python", None, "SSL"), ("confluent", None, "SSL"), ("kafka-python", None, "MTLS"),
    ("confluent", None, "MTLS")])
def test_the_daemon_consumes_alerts_and_commits_over_sasl(sasl_broker, topic_name, daemon_models, tmp_path, client,
                                                         mechanism, protocol):
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
    security = {**_security(mechanism, protocol=protocol), "sasl_password": None,
                "sasl_password_file": str(password_file)} if mechanism else {"protocol": protocol}
    if protocol.endswith("SSL"):
        security["ssl_cafile"] = str(sasl_broker.ca_file)
    if protocol == "MTLS":
        security = _mutual_tls(sasl_broker)
    cfg = config_dict(_bootstrap(sasl_broker, protocol), topic_name, models_dir, names, client=client)
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


def _anomalyd(command: str, cfg_path: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``anomalyd COMMAND -c CFG ARGS`` in a child process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", command, "-c", str(cfg_path), *args],
                          capture_output=True, text=True, timeout=timeout_s)


def _run_with_wrong_password(broker: LocalKafka, topic: str, models: tuple[Path, list[str]], tmp_path: Path,
                             client: str, timeout_s: float) -> tuple[Path, int, str]:
    """``anomalyd run`` logging in by SCRAM-SHA-256 with a wrong password: (config path, exit code, output)."""
    models_dir, names = models
    create_topic(broker.bootstrap, topic)
    cfg = config_dict(_bootstrap(broker, "SASL_PLAINTEXT"), topic, models_dir, names, client=client)
    cfg["kafka"]["security"] = _security("SCRAM-SHA-256", password="wrong-password")
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    proc = _anomalyd("run", cfg_path, timeout_s=timeout_s)
    return cfg_path, proc.returncode, proc.stdout + proc.stderr


def test_a_refused_login_stops_the_confluent_daemon_with_a_config_error(sasl_broker, topic_name, daemon_models,
                                                                        tmp_path):
    # retrying for ever would time out here
    cfg_path, code, out = _run_with_wrong_password(sasl_broker, topic_name, daemon_models, tmp_path, "confluent", 120)
    assert code == 2, out
    line = next(x for x in out.splitlines() if x.startswith(f"{cfg_path}: kafka.security:"))
    assert "refused the credentials" in line and f"user {USER}" in line and "SCRAM-SHA-256" in line, line
    assert "wrong-password" not in out


def test_a_refused_login_stops_the_kafka_python_daemon_with_a_clear_error(sasl_broker, topic_name, daemon_models,
                                                                         tmp_path):
    """kafka-python retries until its bootstrap timeout (30 s) and often sees only the closed connection."""
    cfg_path, code, out = _run_with_wrong_password(sasl_broker, topic_name, daemon_models, tmp_path, "kafka-python",
                                                   150)
    error = out[out.index("anomalyd: error:"):]  # to the end: a config error's lines follow its first
    if code == 2:  # the refusal itself was seen
        assert f"{cfg_path}: kafka.security:" in error and "refused the credentials" in error, out
    else:
        assert code == 1 and "cannot connect to Kafka" in error and "check kafka.security" in error, out
    assert f"user {USER}" in error and "Traceback" not in out and "wrong-password" not in out


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_broker_certificate_from_an_unknown_ca_is_refused(sasl_broker, topic_name, client):
    """Without ``ssl_cafile`` the clients check the broker against the system's CAs, which do not know this
    broker's CA: the consumer must refuse the broker (and say so), not fall back to an unverified connection."""
    create_topic(sasl_broker.bootstrap, topic_name)
    extra = {"bootstrap_timeout_ms": 15_000} if client == "kafka-python" else {}  # its retries end sooner (30 s)
    with pytest.raises((KafkaAuthenticationError, KafkaBootstrapError)) as err:
        source = make_source(client=client, bootstrap_servers=_bootstrap(sasl_broker, "SASL_SSL"), group_id="g",
                             topics=[topic_name], pattern=None, on_assign=lambda _: None, on_revoke=lambda _: None,
                             security=_security("PLAIN", protocol="SASL_SSL"), **extra)
        try:
            for _ in range(300):  # about a minute of polls: librdkafka reports the failed handshake at once
                source.poll(100, 200)
        finally:
            source.close()
    assert isinstance(err.value, KafkaAuthenticationError), err.value
    assert "TLS handshake" in str(err.value) and "certificate verify failed" in str(err.value).lower(), err.value


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_client_without_the_required_certificate_is_refused(sasl_broker, topic_name, client):
    """The MTLS listener requires a client certificate: without one the consumer stops with the reason (the
    broker's TLS alert), rather than retrying for ever."""
    create_topic(sasl_broker.bootstrap, topic_name)
    security = {k: v for k, v in _mutual_tls(sasl_broker).items() if k not in ("ssl_certfile", "ssl_keyfile")}
    extra = {"bootstrap_timeout_ms": 15_000} if client == "kafka-python" else {}
    with pytest.raises((KafkaAuthenticationError, KafkaBootstrapError)) as err:
        source = make_source(client=client, bootstrap_servers=_bootstrap(sasl_broker, "MTLS"), group_id="g",
                             topics=[topic_name], pattern=None, on_assign=lambda _: None, on_revoke=lambda _: None,
                             security=security, **extra)
        try:
            for _ in range(300):
                source.poll(100, 200)
        finally:
            source.close()
    assert isinstance(err.value, KafkaAuthenticationError), err.value
    assert "requires a client certificate it trusts (ssl_certfile not set" in str(err.value), err.value
    assert "bad certificate" in str(err.value).lower(), err.value  # the broker's alert, as the client saw it


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_check_connect_logs_in_and_finds_the_topics(sasl_broker, topic_name, daemon_models, tmp_path, client):
    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name, partitions=3)
    cfg = config_dict(_bootstrap(sasl_broker, "SASL_SSL"), topic_name, models_dir, names, client=client)
    cfg["kafka"]["security"] = {**_security("SCRAM-SHA-512", protocol="SASL_SSL"),
                                "ssl_cafile": str(sasl_broker.ca_file)}
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = _anomalyd("check", path, "--connect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"input topic {topic_name}: 3 partitions" in proc.stdout, proc.stdout
    assert f"kafka.dead_letter_topic {topic_name}-dlq: not found: the brokers create it on its first write" in \
        proc.stdout, proc.stdout

    cfg["kafka"]["topics"] = [f"{topic_name}-missing"]
    proc = _anomalyd("check", write_config(path, cfg), "--connect")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"kafka.topics: topic '{topic_name}-missing' not found" in proc.stdout, proc.stdout

    del cfg["kafka"]["topics"]
    cfg["kafka"]["topic_pattern"] = f"{topic_name[:-10]}[0-9a-f]*$"  # the test's name: only this topic matches
    # (not its -dlq and -alerts outputs, which the config refuses to read back)
    proc = _anomalyd("check", write_config(path, cfg), "--connect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"1 topics ['{topic_name}']" in proc.stdout, proc.stdout


def test_check_connect_fails_on_a_missing_output_topic_where_the_brokers_do_not_create_topics(
        topic_name, daemon_models, tmp_path):
    """With auto.create.topics.enable=false the first dead letter is refused, which stops the daemon (uncommitted)
    on that record after every restart: check (and helm test) passed, saying only "not found"."""
    models_dir, names = daemon_models
    broker = LocalKafka(free_port(), controller_port=free_port(), data_dir=tmp_path / "kafka", exit_with_parent=True,
                        overrides={"auto.create.topics.enable": "false"})
    try:
        broker.start(timeout_s=120)
    except KafkaSetupError as exc:
        service_unavailable(f"local Kafka broker could not start: {exc}")
    try:
        create_topic(broker.bootstrap, topic_name)
        cfg = config_dict(broker.bootstrap, topic_name, models_dir, names)
        path = write_config(tmp_path / "c.yaml", cfg)
        proc = _anomalyd("check", path, "--connect")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert (f"kafka.dead_letter_topic: topic '{topic_name}-dlq' not found at {broker.bootstrap}, and the brokers "
                "do not create topics (auto.create.topics.enable=false): create it") in proc.stdout, proc.stdout
        for out in (f"{topic_name}-dlq", f"{topic_name}-alerts"):
            create_topic(broker.bootstrap, out)
        proc = _anomalyd("check", path, "--connect")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"kafka.dead_letter_topic {topic_name}-dlq: 1 partitions" in proc.stdout, proc.stdout
    finally:
        broker.stop()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_check_connect_over_mutual_tls_with_an_encrypted_key(sasl_broker, topic_name, daemon_models, tmp_path,
                                                            client):
    """The client key encrypted, its password from a file: both clients decrypt it and log in."""
    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name, partitions=2)
    security = _mutual_tls(sasl_broker)
    key = Path(security["ssl_keyfile"])
    security |= {"ssl_keyfile": str(key.with_name("client-encrypted.key")),
                 "ssl_key_password_file": str(key.with_name("client-key.password"))}
    cfg = config_dict(_bootstrap(sasl_broker, "MTLS"), topic_name, models_dir, names, client=client)
    cfg["kafka"]["security"] = security
    proc = _anomalyd("check", write_config(tmp_path / "c.yaml", cfg), "--connect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"input topic {topic_name}: 2 partitions" in proc.stdout, proc.stdout
    assert "client certificate" in proc.stdout and CLIENT_KEY_PASSWORD not in proc.stdout + proc.stderr


def test_check_connect_with_a_wrong_password_is_a_config_error(sasl_broker, topic_name, daemon_models, tmp_path):
    models_dir, names = daemon_models
    cfg = config_dict(_bootstrap(sasl_broker, "SASL_PLAINTEXT"), topic_name, models_dir, names, client="confluent")
    cfg["kafka"]["security"] = _security("PLAIN", password="wrong-password")
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = _anomalyd("check", path, "--connect")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}: kafka.security: Kafka at" in proc.stderr and "refused the credentials" in proc.stderr
    assert "wrong-password" not in proc.stdout + proc.stderr


def test_train_reads_a_topic_with_the_daemon_configs_credentials(sasl_broker, topic_name, daemon_models, tmp_path):
    """``anomalyd train --kafka-topic T -c config.yaml``: the brokers and the SASL_SSL login come from the config."""
    from pipelines.cli import main as cli_main
    from pipelines.model_store import ModelStore

    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name, partitions=2)
    produce_with_anomalies(sasl_broker.bootstrap, topic_name, 150, ())
    cfg = config_dict(_bootstrap(sasl_broker, "SASL_SSL"), topic_name, models_dir, names)
    cfg["kafka"]["security"] = {**_security("SCRAM-SHA-256", protocol="SASL_SSL"),
                                "ssl_cafile": str(sasl_broker.ca_file)}
    path = write_config(tmp_path / "c.yaml", cfg)
    code = cli_main(["train", "--kafka-topic", topic_name, "-c", str(path), "--streams", "pump-*",
                     "--name", "over-sasl", "--models-dir", str(tmp_path / "trained"), "--kind", "gru",
                     "--window", "8", "--hidden", "8", "--epochs", "1", "--threshold", "quantile", "--device", "cpu"])
    assert code == 0
    assert ModelStore(tmp_path / "trained").load("over-sasl").detector.summary["n_series"] == 4


def test_check_connect_asks_an_enabled_alertmanager(sasl_broker, topic_name, daemon_models, tmp_path, alertmanager):
    models_dir, names = daemon_models
    create_topic(sasl_broker.bootstrap, topic_name)
    cfg = config_dict(sasl_broker.bootstrap, topic_name, models_dir, names)  # PLAINTEXT: this test is about the sink
    cfg["sinks"]["alertmanager"] = {"enabled": True, "url": alertmanager.url}
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = _anomalyd("check", path, "--connect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"alertmanager {alertmanager.url}: version " in proc.stdout and "cluster " in proc.stdout, proc.stdout

    cfg["sinks"]["alertmanager"]["url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _anomalyd("check", write_config(path, cfg), "--connect")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sinks.alertmanager.url: http://127.0.0.1:" in proc.stdout and "no Alertmanager status" in proc.stdout
