"""Tests of pipelines.config's limits: the Kafka numbers each client takes, topic names, and numbers from the
environment (decimal text, in a key's own variable and in a mapping or list from one)."""

from __future__ import annotations

import logging

import pytest

from pipelines.config import Config, load_config
from tests.needs import unavailable
from tests.test_config import errors_of, one_error, write_yaml


def _confluent_kafka():
    """The confluent_kafka module: skipped without it, a failure under CI=true (a dev dependency)."""
    try:
        import confluent_kafka
    except ImportError:
        unavailable("confluent-kafka is not installed (a dev dependency: pip install -e '.[dev]')")
    return confluent_kafka


_CLIENT_MAXIMA = {"session_timeout_ms": 300_000, "heartbeat_interval_ms": 3_600_000, "fetch_max_wait_ms": 300_000,
                  "fetch_min_bytes": 100_000_000, "poll_max_records": 1_000_000}


@pytest.mark.parametrize("name", sorted(_CLIENT_MAXIMA))
def test_kafka_numbers_the_clients_refuse_are_refused_at_load(name):
    """librdkafka refused them when `run` built its consumer (a traceback, exit 1), consume() a poll of more than
    1,000,000 records; session_timeout_ms over max.poll.interval.ms (300,000) too."""
    most = _CLIENT_MAXIMA[name]
    kafka = {"client": "confluent", "session_timeout_ms": 300_000, name: most + 1}
    errors = errors_of({"kafka": kafka})
    assert errors[0] == f"<string>: kafka.{name}: must be <= {most}, got {most + 1}", errors


def test_the_kafka_maxima_are_what_the_clients_take():
    """At the bounds the real clients build their consumers (no broker needed); one more and they refuse."""
    confluent_kafka = _confluent_kafka()
    conf = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "session.timeout.ms": 300_000,
            "heartbeat.interval.ms": 3_600_000, "fetch.wait.max.ms": 300_000, "fetch.min.bytes": 100_000_000,
            "logger": __import__("logging").getLogger("test-librdkafka")}
    consumer = confluent_kafka.Consumer(conf)
    try:
        assert consumer.consume(num_messages=1_000_000, timeout=0) == []
        with pytest.raises(ValueError):
            consumer.consume(num_messages=1_000_001, timeout=0)
    finally:
        consumer.close()
    for name in ("session.timeout.ms", "heartbeat.interval.ms", "fetch.wait.max.ms", "fetch.min.bytes"):
        with pytest.raises(confluent_kafka.KafkaException):
            confluent_kafka.Consumer(conf | {name: conf[name] + 1})
    from kafka import KafkaConsumer
    from kafka.errors import KafkaConfigurationError

    with pytest.raises(KafkaConfigurationError):
        KafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=30000, api_version=(2, 5, 0))
    KafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=29999, api_version=(2, 5, 0)).close()


def test_the_fetch_wait_is_bounded_by_the_client(tmp_path):
    """kafka-python refuses a fetch wait of its request timeout (30 s) or more; librdkafka's fetches time out past
    its socket timeout (60 s) less a second. The client set from the environment is named."""
    line = one_error({"kafka": {"fetch_max_wait_ms": 30000}}, "kafka.fetch_max_wait_ms")
    assert line.endswith("must be <= 29999 with kafka.client kafka-python (below its request_timeout_ms, 30000: it "
                         "refuses more), got 30000"), line
    assert Config.from_dict({"kafka": {"fetch_max_wait_ms": 29999}}).kafka.fetch_max_wait_ms == 29999
    path = write_yaml(tmp_path, {"kafka": {"fetch_max_wait_ms": 59001}})
    (line,) = errors_of(path=path, env={"ANOMALYD_KAFKA__CLIENT": "confluent"})
    assert line.startswith(f"{path}: kafka.fetch_max_wait_ms: must be <= 59000 with kafka.client confluent")
    assert line.endswith("got 59001 (kafka.client from environment variable ANOMALYD_KAFKA__CLIENT)"), line
    assert load_config(path, env={"ANOMALYD_KAFKA__CLIENT": "confluent",
                                  "ANOMALYD_KAFKA__FETCH_MAX_WAIT_MS": "59000"}).kafka.fetch_max_wait_ms == 59000


def test_the_confluent_fetch_wait_limit_is_where_librdkafka_starts_to_warn():
    """librdkafka warns of a fetch.wait.max.ms within a second of socket.timeout.ms (60000): above 59000, not at it."""
    confluent_kafka = _confluent_kafka()

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    def warned(wait_ms: int) -> bool:
        log, lines = logging.getLogger(f"test-librdkafka-fetch-wait-{wait_ms}"), Lines()
        log.addHandler(lines)
        log.propagate = False
        consumer = confluent_kafka.Consumer({"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "logger": log,
                                             "fetch.wait.max.ms": wait_ms})
        consumer.poll(0)  # the log lines are served by a poll
        consumer.close()
        return any("fetch.wait.max.ms" in line for line in lines.lines)

    assert warned(59001) and not warned(59000)
    assert Config.from_dict({"kafka": {"client": "confluent", "fetch_max_wait_ms": 59000}})
    one_error({"kafka": {"client": "confluent", "fetch_max_wait_ms": 59001}}, "kafka.fetch_max_wait_ms")


def test_a_bad_client_does_not_bound_the_fetch_wait_as_the_default_client():
    """A misspelt kafka.client fell back to kafka-python, whose fetch wait limit was then reported too."""
    for client in ("confluent-kafka", 1):
        line = one_error({"kafka": {"client": client, "fetch_max_wait_ms": 45000}}, "kafka.client")
        assert "must be one of kafka-python, confluent" in line, line
    (line,) = errors_of(env={"ANOMALYD_KAFKA__CLIENT": "confluent_kafka", "ANOMALYD_KAFKA__FETCH_MAX_WAIT_MS": "45000"})
    assert line.startswith("environment variable ANOMALYD_KAFKA__CLIENT: kafka.client: must be one of"), line


@pytest.mark.parametrize("topic", ["", ".", "..", "a b", "sensors/1", "x" * 250, "tópico", "a,b"])
def test_topic_names_kafka_refuses_are_refused_at_load(topic):
    for key, d in (("kafka.topics[0]", {"kafka": {"topics": [topic]}}),
                   ("kafka.dead_letter_topic", {"kafka": {"dead_letter_topic": topic}}),
                   ("sinks.kafka.topic", {"sinks": {"kafka": {"topic": topic}}})):
        line = one_error(d, key)
        assert ("must not be empty" if not topic else f"not a legal Kafka topic name: {topic!r}") in line, line
    assert Config.from_dict({"kafka": {"topics": ["a.b_c-D9", "x" * 249, "..."]}}).kafka.topics[1] == "x" * 249


# ---------------------------------------------------------------------------------------------- environment


@pytest.mark.parametrize(("var", "text", "want"), [
    ("ANOMALYD_ALERTS__K", "010", "010"), ("ANOMALYD_ALERTS__COOLDOWN_S", "1:30", "1:30"),
    ("ANOMALYD_ALERTS__K", "0x10", "0x10"), ("ANOMALYD_ALERTS__K", "true", "true"),
    ("ANOMALYD_ALERTS__COOLDOWN_S", ".inf", ".inf"), ("ANOMALYD_ALERTS__COOLDOWN_S", "1e999", "1e999"),
])
def test_numbers_from_the_environment_are_decimal_text(var, text, want):
    """YAML 1.1 read 010 as 8 (octal) and 1:30 as 90 (base 60), silently."""
    if text == "010":
        assert load_config(None, env={var: text, "ANOMALYD_ALERTS__N": "20"}).alerts.k == 10
        return
    key = var.removeprefix("ANOMALYD_").lower().replace("__", ".")
    (line,) = errors_of(env={var: text})
    assert line.startswith(f"environment variable {var}: {key}: expected a decimal ") and line.endswith(f"{want!r}")


def test_numbers_from_the_environment():
    env = {"ANOMALYD_ALERTS__COOLDOWN_S": "1e3", "ANOMALYD_ALERTS__M": " +7 ", "ANOMALYD_MODELS__WATCH_INTERVAL_S": "2"}
    cfg = load_config(None, env=env)
    assert (cfg.alerts.cooldown_s, cfg.alerts.m, cfg.models.watch_interval_s) == (1000.0, 7, 2.0)


def test_numbers_in_a_mapping_or_list_from_a_variable_are_decimal_text():
    """ANOMALYD_ALERTS='{k: 010, n: 20}' had k 8 (YAML 1.1's octal), and 1:30 there was 90 (base 60)."""
    cfg = load_config(None, env={"ANOMALYD_ALERTS": "{k: 010, n: 20, cooldown_s: 1e3}",
                                 "ANOMALYD_SINKS": "{alertmanager: {max_retries: 010}}"})
    assert (cfg.alerts.k, cfg.alerts.n, cfg.alerts.cooldown_s) == (10, 20, 1000.0)
    assert cfg.sinks.alertmanager.max_retries == 10
    assert sorted(errors_of(env={"ANOMALYD_ALERTS": "{cooldown_s: 1:30, m: 0x10}"})) == [
        "environment variable ANOMALYD_ALERTS: alerts.cooldown_s: expected a decimal number such as 2.5 or 1e3, "
        "got '1:30'",
        "environment variable ANOMALYD_ALERTS: alerts.m: expected a decimal integer such as 30, got '0x10'"]
    served = load_config(None, env={"ANOMALYD_MODELS__SERVED": '[{name: m, version: "010"}]',
                                    "ANOMALYD_ROUTES": "[{match: '*', models: [m]}]"}).models.served
    assert served[0].version == "010"  # a quoted string stays one


def test_number_like_text_in_a_variables_mapping_stays_text_for_string_keys():
    """Every number-looking scalar of a variable's mapping had become a number: a label zone: 09 (a string to
    YAML 1.1, and in the file) was refused as int 9, and shift: 0800 as 800."""
    cfg = load_config(None, env={"ANOMALYD_SINKS__ALERTMANAGER__LABELS": "{team: ops, zone: 09, shift: 0800, n: 10}",
                                 "ANOMALYD_KAFKA__TOPICS": "[sensors, 2026]"})
    assert cfg.sinks.alertmanager.labels == {"team": "ops", "zone": "09", "shift": "0800", "n": "10"}
    assert cfg.kafka.topics == ["sensors", "2026"]


def test_a_variable_below_a_number_or_string_key_is_not_dropped():
    """ANOMALYD_ALERTS__K=4 with ANOMALYD_ALERTS__K__X=1 loaded with k 4: the first variable's text was taken, the
    second one silently not read."""
    assert errors_of(env={"ANOMALYD_ALERTS__K": "4", "ANOMALYD_ALERTS__K__X": "1"}) == [
        "environment variable ANOMALYD_ALERTS__K__X: alerts.k: expected int, got dict {'x': '1'}"]
    assert errors_of(env={"ANOMALYD_KAFKA__GROUP_ID": "g", "ANOMALYD_KAFKA__GROUP_ID__X": "1"}) == [
        "environment variable ANOMALYD_KAFKA__GROUP_ID__X: kafka.group_id: expected str, got dict {'x': '1'}"]
