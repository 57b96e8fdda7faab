"""Tests of pipelines.config: defaults, every error kind, environment overrides, aggregation, secrets, model files."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from pipelines._config_schema import load_yaml
from pipelines.config import (
    Config,
    ConfigError,
    Route,
    SecurityConfig,
    ServedModel,
    check_model_files,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "config.example.yaml"
_FILE = str(EXAMPLE)  # any file that exists


def errors_of(d: dict | None = None, *, path: Path | None = None, env: dict | None = None) -> list[str]:
    """The error lines of an invalid config (from a dict, or a file plus environment)."""
    with pytest.raises(ConfigError) as info:
        if path is None and env is None:
            Config.from_dict(d)
        else:
            load_config(path, env=env or {})
    assert str(info.value).splitlines()[1:] == info.value.errors  # one per line after the header
    return info.value.errors


def one_error(d: dict, key: str) -> str:
    (line,) = errors_of(d)
    assert line.startswith(f"<string>: {key}: "), line
    return line


def write_yaml(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "anomalyd.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_equal_the_example_file():
    assert load_config(EXAMPLE, env={}) == Config()
    assert Config.from_dict(yaml.safe_load(EXAMPLE.read_text())) == Config()
    assert load_config(None, env={}) == Config() and Config.from_dict({}) == Config()


def test_example_values():
    cfg = load_config(EXAMPLE, env={})
    assert cfg.source == str(EXAMPLE)
    assert cfg.kafka.topics == ["sensors"] and cfg.kafka.security.protocol == "PLAINTEXT"
    assert cfg.models.served == [ServedModel("sensors-gru", None), ServedModel("sensors-lstm", None)]
    assert cfg.routes == [Route(match="pump-*", models=["sensors-gru", "sensors-lstm"], combine="max")]
    assert (cfg.alerts.k, cfg.alerts.n, cfg.alerts.m, cfg.http.port) == (3, 5, 10, 9308)
    assert cfg.default_models == [] and cfg.sinks.alertmanager.labels == {}


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().alerts.k = 4  # type: ignore[misc]


def test_int_accepted_for_float_and_null_section_means_defaults():
    cfg = Config.from_dict({"alerts": {"cooldown_s": 7}, "shutdown": None})
    assert cfg.alerts.cooldown_s == 7.0 and isinstance(cfg.alerts.cooldown_s, float)
    assert cfg.shutdown == Config().shutdown


def test_route_matching():
    assert Route(match="pump-*", models=["m"]).matches("pump-17")
    assert not Route(match="pump-*", models=["m"]).matches("Pump-17")
    assert Route(regex="^pump-[0-9]+$", models=["m"]).matches("pump-17")
    assert not Route(regex="^pump-[0-9]+$", models=["m"]).matches("pump-x")


# ---------------------------------------------------------------------------------------------- error kinds


@pytest.mark.parametrize("d, key, text", [
    ({"alerts": {"kk": 3}}, "alerts.kk", "did you mean 'k'"),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"kafka": {"security": {"protocl": "SSL"}}}, "kafka.security.protocl", "did you mean 'protocol'"),
    ({"alerts": {"k": True}}, "alerts.k", "expected int, got bool"),
    ({"alerts": {"k": "3"}}, "alerts.k", "expected int, got str"),
    ({"alerts": {"cooldown_s": "60s"}}, "alerts.cooldown_s", "expected a finite float"),
    ({"alerts": {"cooldown_s": float("inf")}}, "alerts.cooldown_s", "expected a finite float"),
    ({"sinks": {"log": {"enabled": "yes"}}}, "sinks.log.enabled", "expected bool"),
    ({"kafka": {"group_id": 5}}, "kafka.group_id", "quote it"),
    ({"kafka": {"topics": "sensors"}}, "kafka.topics", "expected a list"),
    ({"kafka": "broker:9092"}, "kafka", "expected a mapping"),
    ({"models": {"served": [{"name": "a", "version": 2}]}, "default_models": ["a"], "routes": []},
     "models.served[0].version", "quote it"),
    ({"kafka": {"client": "librdkafka"}}, "kafka.client", "must be one of kafka-python, confluent"),
    ({"kafka": {"auto_offset_reset": "none"}}, "kafka.auto_offset_reset", "must be one of"),
    ({"models": {"precision": "float64"}}, "models.precision", "must be one of"),
    ({"models": {"device": "gpu"}}, "models.device", "must be auto, cpu"),
    ({"routes": [{"match": "*", "models": ["sensors-gru"], "combine": "sum"}]}, "routes[0].combine", "max, mean"),
    ({"alerts": {"k": 6}}, "alerts.k", "must be <= alerts.n (5)"),
    ({"alerts": {"n": 65, "k": 3}}, "alerts.n", "must be <= 64"),
    ({"alerts": {"k": 0}}, "alerts.k", "must be >= 1"),
    ({"alerts": {"m": 0}}, "alerts.m", "must be >= 1"),
    ({"http": {"port": 65536}}, "http.port", "must be <= 65535"),
    ({"http": {"port": -1}}, "http.port", "must be >= 0"),
    ({"processing": {"stride": 0}}, "processing.stride", "must be >= 1"),
    ({"models": {"watch_interval_s": 0}}, "models.watch_interval_s", "must be > 0"),
    ({"kafka": {"heartbeat_interval_ms": 10000}}, "kafka.heartbeat_interval_ms", "must be < kafka.session_timeout"),
    ({"kafka": {"group_id": ""}}, "kafka.group_id", "must not be empty"),
    ({"kafka": {"topics": []}}, "kafka.topics", "no topics to consume"),
    ({"kafka": {"topic_pattern": "^s-.*", "topics": ["a"]}}, "kafka.topic_pattern", "not both"),
    ({"kafka": {"topic_pattern": "(", "topics": []}}, "kafka.topic_pattern", "invalid regex"),
    ({"kafka": {"topic_pattern": "anomalyd-d.*"}}, "kafka.dead_letter_topic", "matches the input kafka.topic_pattern"),
    ({"kafka": {"topic_pattern": "^anomalyd-a"}}, "sinks.kafka.topic", "would read back"),
    ({"kafka": {"topics": ["sensors", "anomalyd-dead-letter"]}}, "kafka.dead_letter_topic", "also an input topic"),
    ({"kafka": {"dead_letter_topic": "sensors"}}, "kafka.dead_letter_topic", "also an input topic"),
    ({"sinks": {"kafka": {"topic": "sensors"}}}, "sinks.kafka.topic", "also an input topic"),
    ({"routes": [{"match": "a", "regex": "a", "models": ["sensors-gru"]}]}, "routes[0]", "exactly one of"),
    ({"routes": [{"models": ["sensors-gru"]}]}, "routes[0]", "exactly one of"),
    ({"routes": [{"regex": "pump-[", "models": ["sensors-gru"]}]}, "routes[0].regex", "invalid regex"),
    ({"routes": [{"match": "*"}]}, "routes[0].models", "missing required key"),
    ({"routes": [{"match": "*", "models": []}]}, "routes[0].models", "must not be empty"),
    ({"routes": [{"match": "*", "models": ["nope"]}]}, "routes[0].models[0]", "'nope' is not in models.served"),
    ({"default_models": ["sensors-gru", "nope"]}, "default_models[1]", "not in models.served"),
    ({"models": {"served": [{"name": "a"}, {"name": "a"}]}, "routes": []}, "models.served[1].name", "served twice"),
    ({"models": {"served": [{"name": "../a"}]}, "routes": []}, "models.served[0].name", "plain directory name"),
    ({"models": {"served": []}}, "models.served", "must not be empty"),
    ({"kafka": {"security": {"protocol": "SASL_SSL"}}}, "kafka.security.sasl_mechanism", "needs a sasl_mechanism"),
    ({"kafka": {"security": {"protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}}},
     "kafka.security.ssl_cafile", "not found"),
    ({"kafka": {"security": {"protocol": "SSL", "ssl_certfile": "/nonexistent/c.crt", "ssl_keyfile": _FILE}}},
     "kafka.security.ssl_certfile", "not found"),
    ({"kafka": {"security": {"protocol": "SSL", "ssl_certfile": _FILE}}}, "kafka.security.ssl_certfile",
     "needs both ssl_certfile and ssl_keyfile; set ssl_keyfile"),
    ({"kafka": {"security": {"protocol": "SSL", "ssl_keyfile": _FILE}}}, "kafka.security.ssl_keyfile",
     "set ssl_certfile"),
    ({"kafka": {"security": {"ssl_certfile": _FILE, "ssl_keyfile": _FILE}}}, "kafka.security.ssl_certfile",
     "needs protocol SSL or SASL_SSL, got PLAINTEXT"),
    ({"sinks": {"alertmanager": {"url": "alertmanager:9093"}}}, "sinks.alertmanager.url", "http:// or https://"),
    ({"sinks": {"alertmanager": {"labels": {"team-a": "x"}}}}, "sinks.alertmanager.labels.team-a", "label name"),
    ({"sinks": {"alertmanager": {"labels": {"team": 5}}}}, "sinks.alertmanager.labels.team", "expected str"),
    ({"sinks": {"alertmanager": {"labels": {"stream": "x"}}}}, "sinks.alertmanager.labels.stream", "reserved label"),
    ({"sinks": {"alertmanager": {"labels": {"severity": "page"}}}}, "sinks.alertmanager.labels.severity",
     "set sinks.alertmanager.severity instead"),  # it overrode that key silently
    ({"kafka": {"security": {"sasl_username": "u", "sasl_password": "p"}}}, "kafka.security.sasl_username",
     "SASL credentials (sasl_username, sasl_password) are used only with protocol SASL_PLAINTEXT or SASL_SSL"),
    ({"kafka": {"security": {"protocol": "SSL", "sasl_password_file": _FILE}}}, "kafka.security.sasl_password_file",
     "and a sasl_mechanism; got protocol SSL"),
    ({"kafka": {"security": {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                             "sasl_password": "p", "ssl_cafile": _FILE}}}, "kafka.security.ssl_cafile",
     "a CA file is used only with protocol SSL or SASL_SSL, got SASL_PLAINTEXT"),
    ({"kafka": {"security": {"ssl_cafile": _FILE}}}, "kafka.security.ssl_cafile", "got PLAINTEXT"),
    ({"kafka": {"security": {"protocol": "SSL", "ssl_cafile": _FILE}}}, "kafka.security.ssl_cafile",
     "as CA certificates: NO_CERTIFICATE_OR_CRL_FOUND (it must hold PEM certificates"),  # was a failed connection
    ({"default_models": ["sensors-gru", "sensors-gru"]}, "default_models", "lists a model twice"),  # as a route
    ({"kafka": {"bootstrap_servers": ","}}, "kafka.bootstrap_servers", "no broker in ','"),
    ({"kafka": {"bootstrap_servers": " "}}, "kafka.bootstrap_servers", "no broker in ' '"),
    ({"kafka": {"poll_timeout_ms": 10001}}, "kafka.poll_timeout_ms", "must be <= 10000"),  # /healthz: 60 s
    ({"alerts": {"cooldown_s": 1e16}}, "alerts.cooldown_s", "must be <= 1000000000.0"),  # OverflowError in scoring
    ({"models": {"watch_interval_s": 1e300}}, "models.watch_interval_s", "must be <= 1000000000.0"),
    ({"shutdown": {"grace_period_s": 1e10}}, "shutdown.grace_period_s", "must be <= 1000000000.0"),
])
def test_error_kinds(d, key, text):
    assert text in one_error(d, key)


def test_sasl_mechanism_without_credentials():
    errors = errors_of({"kafka": {"security": {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}}})
    assert len(errors) == 2 and all(e.startswith("<string>: kafka.security.sasl_mechanism: ") for e in errors)
    assert "sasl_username" in errors[0] and "sasl_password" in errors[1]


def test_confluent_client_needs_its_package(monkeypatch):  # with the variable named: tests/test_check_cmd.py
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # as if confluent-kafka were not installed
    line = one_error({"kafka": {"client": "confluent"}}, "kafka.client")
    assert line.endswith("confluent needs the confluent-kafka package (pip install 'anomalyd[fast]')"), line


def test_sasl_mechanism_needs_sasl_protocol():
    sec = {"protocol": "SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"}
    assert "needs protocol SASL_PLAINTEXT or SASL_SSL" in one_error({"kafka": {"security": sec}},
                                                                     "kafka.security.sasl_mechanism")


def test_topic_pattern_replaces_default_topics():
    cfg = Config.from_dict({"kafka": {"topic_pattern": "^sensors-.*"}})
    assert cfg.kafka.topics == [] and cfg.kafka.topic_pattern == "^sensors-.*"


def test_errors_are_aggregated_and_name_the_file(tmp_path):
    path = write_yaml(tmp_path, {"alerts": {"k": 9, "m": 0, "extra": 1}, "http": {"port": "80"},
                                 "routes": [{"match": "x", "regex": "y", "models": ["ghost"]}]})
    errors = errors_of(path=path)
    assert len(errors) == 6, errors
    assert all(e.startswith(f"{path}: ") for e in errors)
    keys = sorted(e.split(": ")[1] for e in errors)
    assert keys == ["alerts.extra", "alerts.k", "alerts.m", "http.port", "routes[0]", "routes[0].models[0]"]
    with pytest.raises(ConfigError, match=r"invalid configuration \(6 errors\)"):
        load_config(path, env={})


def test_bad_served_model_does_not_cause_spurious_reference_errors():
    errors = errors_of({"models": {"served": [{"version": "1"}, {"name": "sensors-lstm"}]}})  # [0] is dropped
    assert errors == ["<string>: models.served[0].name: missing required key"]


def test_unreadable_or_invalid_files(tmp_path):
    (missing,) = errors_of(path=tmp_path / "nope.yaml")
    assert "nope.yaml: cannot read config file" in missing
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    assert errors_of(path=bad) == [f"{bad}: invalid YAML at line 2, column 1: expected ',' or ']', but got "
                                   "'<stream end>' (while parsing a flow sequence)"]
    bad.write_text("- a\n- b\n")
    assert errors_of(path=bad) == [f"{bad}: (top level): expected a mapping, got list ['a', 'b']"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty, env={}) == Config()
    bad.write_bytes(b"kafka:\n  topics: [\xff]\n")
    assert errors_of(path=bad) == [f"{bad}: cannot read config file: not UTF-8 (byte 0xff at position 18)"]


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``processing:`` would replace the first section whole."""
    path = tmp_path / "c.yaml"
    path.write_text("processing:\n  stride: 1\n  max_delay_ms: 5\nprocessing:\n  stride: 8\n")
    assert errors_of(path=path) == [f"{path}: invalid YAML at line 4, column 1: duplicate key 'processing' "
                                    "(first at line 1)"]
    path.write_text("processing:\n  stride: 1\n  stride: 8\n")
    assert errors_of(path=path) == [f"{path}: invalid YAML at line 3, column 3: duplicate key 'stride' "
                                    "(first at line 2)"]
    base = "base: &b {stride: 1, max_delay_ms: 5}\n"  # merge keys may override what they merge
    assert load_yaml(base + "processing:\n  <<: *b\n  stride: 8\n")["processing"] == {"stride": 8, "max_delay_ms": 5}
    nested = "defaults: {proc: &m {<<: {stride: 1}, stride: 2}}\nprocessing: {<<: *m}\n"  # merging rewrites nodes
    assert load_yaml(nested) == yaml.safe_load(nested)


# ---------------------------------------------------------------------------------------------- environment


def test_env_overrides_on_top_of_file():
    env = {
        "ANOMALYD_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092",
        "ANOMALYD_KAFKA__TOPICS": "[a, b]",
        "anomalyd_alerts__k": "4",  # names are case-insensitive
        "ANOMALYD_Alerts__Cooldown_S": "1.5",
        "ANOMALYD_KAFKA__SECURITY__PROTOCOL": "SASL_SSL",
        "ANOMALYD_KAFKA__SECURITY__SASL_MECHANISM": "PLAIN",
        "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME": "svc",
        "ANOMALYD_KAFKA__SECURITY__SASL_PASSWORD": "s3cret",
        "ANOMALYD_SINKS__ALERTMANAGER__LABELS": "{team: ops}",
        "ANOMALYD_DEFAULT_MODELS": "[sensors-gru]",
        "ANOMALYD_KAFKA__GROUP_ID": "1234",  # a YAML int, but the key is a string
        "ANOMALYD_CONFIG": "/etc/anomalyd.yaml",  # not an override
        "ANOMALYD_CACHE": "/tmp",
        "OTHER__KAFKA__TOPICS": "[x]",
    }
    cfg = load_config(EXAMPLE, env=env)
    assert cfg.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092" and cfg.kafka.topics == ["a", "b"]
    assert cfg.alerts.k == 4 and cfg.alerts.cooldown_s == 1.5 and cfg.kafka.group_id == "1234"
    assert cfg.kafka.security == SecurityConfig("SASL_SSL", "PLAIN", "svc", "s3cret")
    assert cfg.sinks.alertmanager.labels == {"team": "ops"} and cfg.default_models == ["sensors-gru"]
    assert dataclasses.replace(cfg, kafka=Config().kafka, alerts=Config().alerts, sinks=Config().sinks,
                               default_models=[]) == Config()


def test_env_overrides_without_file_and_whole_lists():
    env = {"ANOMALYD_MODELS__SERVED": '[{name: m1, version: "7"}]', "ANOMALYD_ROUTES": "[]",
           "ANOMALYD_KAFKA__TOPIC_PATTERN": "^sensors-.*"}
    cfg = load_config(None, env=env)
    assert cfg.models.served == [ServedModel("m1", "7")] and cfg.routes == []
    assert cfg.kafka.topics == [] and cfg.kafka.topic_pattern == "^sensors-.*"
    assert load_config(None, env={"ANOMALYD_KAFKA__TOPIC_PATTERN": ""}).kafka.topic_pattern is None


def test_env_values_of_string_keys_are_taken_as_they_are():
    """YAML would read 'grp #1' as 'grp' (a comment) and 'a: b' as a mapping; string keys take the text, less the
    line breaks that end it (a Kubernetes Secret from --from-file), and keep its spaces."""
    env = {"ANOMALYD_KAFKA__GROUP_ID": "grp #1", "ANOMALYD_KAFKA__SECURITY__PROTOCOL": "SASL_SSL",
           "ANOMALYD_KAFKA__SECURITY__SASL_MECHANISM": "PLAIN", "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME": "svc: a\n",
           "ANOMALYD_KAFKA__SECURITY__SASL_PASSWORD": "p#ss [1] \r\n",
           "ANOMALYD_SINKS__ALERTMANAGER__LABELS__TEAM": "#ops",
           "ANOMALYD_MODELS__DEVICE": "cpu", "ANOMALYD_KAFKA__TOPICS": "[a, b]  # YAML", "ANOMALYD_ALERTS__K": "4",
           "ANOMALYD_KAFKA__TOPIC_PATTERN": ""}
    cfg = load_config(EXAMPLE, env=env)
    assert cfg.kafka.group_id == "grp #1" and cfg.kafka.topics == ["a", "b"] and cfg.alerts.k == 4
    assert (cfg.kafka.security.sasl_username, cfg.kafka.security.sasl_password) == ("svc: a", "p#ss [1] ")
    assert cfg.sinks.alertmanager.labels == {"team": "#ops"} and cfg.kafka.topic_pattern is None
    assert errors_of(path=EXAMPLE, env={"ANOMALYD_KAFKA__GROUP_ID": ""}) == [
        "environment variable ANOMALYD_KAFKA__GROUP_ID: kafka.group_id: must not be empty, got ''"]
    assert errors_of(path=EXAMPLE, env={"ANOMALYD_KAFKA__GROUP_ID": "\n"}) == [
        "environment variable ANOMALYD_KAFKA__GROUP_ID: kafka.group_id: must not be empty, got ''"]


def test_later_errors_name_the_variable_that_set_the_value(tmp_path):
    """check_model_files (models.dir: tests/test_check_cmd.py) and the CLI's kafka.security errors (Config.where)
    name the variable, not the file."""
    env = {"ANOMALYD_MODELS__DIR": str(tmp_path), "ANOMALYD_MODELS__SERVED": '[{name: m, version: "1"}]',
           "ANOMALYD_ROUTES": "[]", "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME": "u"}
    cfg = load_config(write_yaml(tmp_path, {"kafka": {"security": {
        "protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_password": "p"}}}), env=env)
    with pytest.raises(ConfigError) as info:
        check_model_files(cfg)
    assert info.value.errors[0].startswith("environment variable ANOMALYD_MODELS__SERVED: models.served[0]: model")
    env_var = "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME"
    assert cfg.where("kafka.security") == f"{cfg.source} and environment variable {env_var}"
    assert cfg.where("alerts.k") == cfg.source and "env_keys" not in cfg.redacted_dict()


def test_env_errors_name_the_variable(tmp_path):
    path = write_yaml(tmp_path, {"alerts": {"n": 4}, "http": {"port": 8080}})
    errors = errors_of(path=path, env={"ANOMALYD_ALERTS__K": "5", "ANOMALYD_KAFKA__BOGUS": "1",
                                       "ANOMALYD_NOPE__X": "1", "ANOMALYD_HTTP__PORT": "[1]",
                                       "ANOMALYD_MODELS__SERVED__0__VERSION": "2"})
    assert sorted(errors) == sorted([
        "environment variable ANOMALYD_ALERTS__K: alerts.k: must be <= alerts.n (4), got 5",
        "environment variable ANOMALYD_KAFKA__BOGUS: kafka.bogus: unknown key (known keys: bootstrap_servers, "
        "client, group_id, topics, topic_pattern, dead_letter_topic, max_message_bytes, "
        "poll_max_records, poll_timeout_ms, poll_ahead, commit_interval_ms, fetch_min_bytes, fetch_max_wait_ms, "
            "session_timeout_ms, heartbeat_interval_ms, "
        "auto_offset_reset, max_rebuild_records, commit_metadata_max_bytes, security)",
        "environment variable ANOMALYD_NOPE__X: nope: unknown key (known keys: kafka, models, routes, "
        "default_models, processing, alerts, sinks, http, metrics, shutdown)",
        "environment variable ANOMALYD_HTTP__PORT: http.port: expected a decimal integer such as 30, got '[1]'",
        "environment variable ANOMALYD_MODELS__SERVED__0__VERSION: models.served: expected a list, "
        "got dict {'0': {'version': '2'}}",
    ])


def test_bootstrap_servers_that_are_not_host_port_are_refused_at_load():
    """The daemon found it only in its first connection (kafka-python), after start: a crash with a trace."""
    for fine in ("a:9092,,b:9093", "[::1]:9092", "PLAINTEXT://k:9092", "kafka", "k_1:65535"):
        Config.from_dict({"kafka": {"bootstrap_servers": fine}})
    for bad in ("kafka:notaport", "k:99999", "k:0"):
        with pytest.raises(ConfigError) as err:
            Config.from_dict({"kafka": {"bootstrap_servers": f"a:9092, {bad}"}})
        assert err.value.errors == [f"<string>: kafka.bootstrap_servers: cannot read {bad!r} as host:port (a "
                                    "comma-separated list of host:port, [IPv6]:port or host; ports 1-65535)"]


def test_a_cross_key_error_caused_by_the_environment_names_its_variable(tmp_path):
    """A key left out of the file is wrong because of another key set from the environment: the error line named
    only the file, which the operator then searched in vain."""
    path = write_yaml(tmp_path, {"alerts": {"k": 4}, "kafka": {"security": {"protocol": "PLAINTEXT"}}})
    errors = errors_of(path=path, env={"ANOMALYD_KAFKA__SECURITY__PROTOCOL": "SASL_SSL", "ANOMALYD_ALERTS__N": "3",
                                       "ANOMALYD_KAFKA__TOPIC_PATTERN": "^anomalyd-.*"})
    assert sorted(errors) == sorted([
        f"{path}: kafka.security.sasl_mechanism: protocol SASL_SSL needs a sasl_mechanism (PLAIN, SCRAM-SHA-256, "
        "SCRAM-SHA-512) (kafka.security.protocol from environment variable ANOMALYD_KAFKA__SECURITY__PROTOCOL)",
        f"{path}: alerts.k: must be <= alerts.n (3), got 4 (alerts.n from environment variable ANOMALYD_ALERTS__N)",
        f"{path}: kafka.dead_letter_topic: 'anomalyd-dead-letter' matches the input kafka.topic_pattern "
        "'^anomalyd-.*': what the daemon writes there it would read back (rename it, or narrow the pattern) "
        "(kafka.topic_pattern from environment variable ANOMALYD_KAFKA__TOPIC_PATTERN)",
        f"{path}: sinks.kafka.topic: 'anomalyd-alerts' matches the input kafka.topic_pattern '^anomalyd-.*': what "
        "the daemon writes there it would read back (rename it, or narrow the pattern) (kafka.topic_pattern from "
        "environment variable ANOMALYD_KAFKA__TOPIC_PATTERN)",
    ]), errors


@pytest.mark.parametrize(("url", "error"), [
    ("http://u:pa/ss@am:9093", "'http://***@am:9093' is not a URL urllib can take apart"),  # a piece: 'pa'
    ("http://u:pw@[::1/x", "'http://***@[::1/x' is not a URL urllib can take apart"),  # was a traceback
    ("u:s3cret@am:9093", "must be an http:// or https:// URL, got '***@am:9093'"),
])
def test_an_alertmanager_url_urllib_cannot_take_apart_is_refused_without_showing_its_password(url, error):
    (line,) = errors_of({"sinks": {"alertmanager": {"enabled": True, "url": url}}})
    assert error in line and "'pa'" not in line and "pw" not in line and "s3cret" not in line


@pytest.mark.parametrize(("url", "why"), [
    ("grafana.example.com/d/x", "neither an absolute URL nor a path from /"),
    ("https://g.example.com/d/%zz", "a '%' not followed by two hex digits"),
    ("https://ex^ample.com/d", "a character not allowed in a host name: 'ex^ample.com'"),
    ("https://g.example.com:30a/d", "a port that is not a number: '30a'"),
    ("https://g.example.com/d/\tx", "a control character"),
])
def test_a_generator_url_alertmanager_would_refuse_is_refused_here(url, why):
    """Alertmanager answers 400 to a post with a generatorURL that Go's url.ParseRequestURI refuses: no alert went
    out, and nothing was committed. What it takes is taken, however little use (a path, a space)."""
    (line,) = errors_of({"sinks": {"alertmanager": {"enabled": True, "generator_url": url}}})
    assert line.startswith(f"<string>: sinks.alertmanager.generator_url: Alertmanager would refuse it ({why})"), line
    for fine in ("https://grafana.example.com/d/anomalyd?orgId=1&var-model=All", "http://grafana:3000", None, "",
                 "/d/anomalyd", "https:///d/x", "https://g.example.com/d/a b", "http://[::1]:3000/d"):
        cfg = Config.from_dict({"sinks": {"alertmanager": {"enabled": True, "generator_url": fine}}})
        assert cfg.sinks.alertmanager.generator_url == fine


def test_the_default_route_is_named_as_such_when_its_models_are_not_served():
    """Without routes in the file, the example's route (models sensors-gru, sensors-lstm) applies: its error named
    a key the file does not have, without a word why."""
    errors = errors_of({"models": {"served": [{"name": "m"}]}})
    assert errors[0] == ("<string>: routes[0].models[0]: model 'sensors-gru' is not in models.served (m) (routes is "
                         "not set: this is the default route, of the example config; set routes, or routes: [] with "
                         "default_models)")
    assert "default route" not in errors_of({"models": {"served": [{"name": "m"}]},
                                             "routes": [{"match": "*", "models": ["x"]}]})[0]
    assert errors_of({"models": {"served": [{"name": "m"}]}, "routes": 5}) == [  # not the default's models too
        "<string>: routes: expected a list, got int 5"]


def test_a_section_and_key_joined_by_one_underscore_is_an_error_not_ignored(tmp_path):
    """ANOMALYD_KAFKA_BOOTSTRAP_SERVERS (one underscore) was silently not read; variables that name no key of the
    section (ANOMALYD_KAFKA_PORT, the local broker's) are left alone, and so are Kubernetes' service links
    (ANOMALYD_HTTP_PORT=tcp://... for a Service named anomalyd-http)."""
    errors = errors_of(env={"ANOMALYD_KAFKA_BOOTSTRAP_SERVERS": "b:9092", "ANOMALYD_KAFKA_PORT": "19092",
                            "ANOMALYD_CACHE": "/tmp/x", "ANOMALYD_HTTP_PORT": "tcp://10.0.0.7:9308"})
    assert errors == ["environment variable ANOMALYD_KAFKA_BOOTSTRAP_SERVERS: kafka.bootstrap_servers: not read: a "
                      "section and its key are separated by two underscores (ANOMALYD_KAFKA__BOOTSTRAP_SERVERS)"]


# ---------------------------------------------------------------------------------------------- secrets


def test_password_file_is_read_and_redacted(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    sec = {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "svc",
           "sasl_password_file": str(secret)}
    cfg = Config.from_dict({"kafka": {"security": sec}})
    assert cfg.kafka.security.sasl_password == "hunter2"
    assert cfg.kafka.security.client_settings() == {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                                                    "sasl_username": "svc", "sasl_password": "hunter2"}
    red = cfg.redacted_dict()
    assert red["kafka"]["security"]["sasl_password"] == "***"
    assert red["kafka"]["security"]["sasl_password_file"] == str(secret)
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(red)
    assert "source" not in red and yaml.safe_load(yaml.safe_dump(red))["alerts"] == {
        "k": 3, "n": 5, "m": 10, "cooldown_s": 60.0, "top_features": 3}


def test_a_user_name_from_a_secret_file_loses_its_trailing_newline_as_the_password_does(tmp_path):
    """kubectl create secret --from-file=username=...: the chart passes the name in an environment variable, with
    the file's newline, which no broker takes as part of the name."""
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    env = {"ANOMALYD_KAFKA__SECURITY__PROTOCOL": "SASL_SSL", "ANOMALYD_KAFKA__SECURITY__SASL_MECHANISM": "PLAIN",
           "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME": "alice\n",
           "ANOMALYD_KAFKA__SECURITY__SASL_PASSWORD_FILE": str(secret)}
    assert load_config(None, env=env).kafka.security.sasl_username == "alice"


def test_password_file_errors(tmp_path):
    sec = {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "svc",
           "sasl_password_file": str(tmp_path / "missing")}
    line = one_error({"kafka": {"security": sec}}, "kafka.security.sasl_password_file")
    assert "cannot read password file" in line and str(tmp_path / "missing") in line
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in one_error({"kafka": {"security": sec | {"sasl_password_file": str(tmp_path / "empty")}}},
                                   "kafka.security.sasl_password_file")
    both = sec | {"sasl_password_file": str(tmp_path / "empty"), "sasl_password": "x"}
    assert "not both" in one_error({"kafka": {"security": both}}, "kafka.security.sasl_password_file")


def test_secrets_never_in_messages():
    line = one_error({"kafka": {"security": {"sasl_password": 987654}}}, "kafka.security.sasl_password")
    assert "987654" not in line
    cfg = Config.from_dict({"sinks": {"alertmanager": {"url": "https://bot:t0ken@am.example:9093/x"}}})
    assert cfg.redacted_dict()["sinks"]["alertmanager"]["url"] == "https://bot:***@am.example:9093/x"


# ---------------------------------------------------------------------------------------------- model files


def _model_dirs(root: Path, *paths: str) -> None:
    for p in paths:
        (root / p).mkdir(parents=True)
        (root / p / "model.json").write_text("{}")


def test_check_model_files(tmp_path):
    served = [{"name": "gru", "version": "2"}, {"name": "lstm"}, {"name": "old", "version": "9"}, {"name": "empty"}]
    cfg = Config.from_dict({"models": {"dir": str(tmp_path), "served": served}, "routes": []})
    _model_dirs(tmp_path, "gru/2", "lstm/1", "lstm/2", "old/1")
    (tmp_path / "empty" / ".tmp-3").mkdir(parents=True)
    (tmp_path / "empty" / "4").mkdir()  # a version directory without model.json
    with pytest.raises(ConfigError) as info:
        check_model_files(cfg)
    assert info.value.errors == [
        f"<string>: models.served[2]: model 'old' version '9': {tmp_path / 'old' / '9' / 'model.json'} not found",
        f"<string>: models.served[3]: model 'empty': no version directory with a model.json under {tmp_path / 'empty'}",
    ]
    _model_dirs(tmp_path, "old/9", "empty/4x")
    check_model_files(cfg)


def test_check_model_files_missing_dir(tmp_path):
    cfg = Config.from_dict({"models": {"dir": str(tmp_path / "none")}})
    with pytest.raises(ConfigError, match=r"models\.dir: model directory .*none does not exist"):
        check_model_files(cfg)
    (tmp_path / "none").write_text("")
    with pytest.raises(ConfigError, match=r"models\.dir: model directory .*none is not a directory"):
        check_model_files(cfg)


@pytest.fixture(scope="module")
def client_tls(tmp_path_factory) -> Path:
    """A CA, a broker certificate and a client certificate, its key plain and encrypted (openssl)."""
    from pipelines.kafka_local_security import make_certificates

    folder = tmp_path_factory.mktemp("tls")
    make_certificates(folder, "127.0.0.1")
    return folder


def test_the_client_certificate_and_key_are_loaded_at_start(client_tls):
    """An encrypted key with its password from a file loads, and the password is masked; a wrong password, a
    missing one and another certificate's key are config errors naming ssl_keyfile (OpenSSL never prompts)."""
    from pipelines.kafka_local_security import CLIENT_KEY_PASSWORD

    d = client_tls
    sec = {"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p",
           "ssl_certfile": str(d / "client.crt")}
    encrypted = {"ssl_keyfile": str(d / "client-encrypted.key")}
    with_file = encrypted | {"ssl_key_password_file": str(d / "client-key.password")}
    cfg = Config.from_dict({"kafka": {"security": sec | with_file}})
    assert cfg.kafka.security.ssl_key_password == CLIENT_KEY_PASSWORD
    assert cfg.kafka.security.client_settings()["ssl_key_password"] == CLIENT_KEY_PASSWORD
    assert cfg.redacted_dict()["kafka"]["security"]["ssl_key_password"] == "***"
    assert CLIENT_KEY_PASSWORD not in repr(cfg)
    assert Config.from_dict({"kafka": {"security": sec | {"ssl_keyfile": str(d / "client.key")}}})  # unencrypted
    for extra, text in ((encrypted | {"ssl_key_password": "pw-7f3k"}, "a wrong ssl_key_password"),
                        (encrypted, "the key is encrypted: set ssl_key_password"),
                        ({"ssl_keyfile": str(d / "ca.pem")}, "both must be PEM: the certificate, and its key"),
                        ({"ssl_keyfile": str(d / "broker.key")}, "the key does not belong to the certificate")):
        line = one_error({"kafka": {"security": sec | extra}}, "kafka.security.ssl_keyfile")
        assert text in line and "cannot load" in line and "pw-7f3k" not in line, line
    line = one_error({"kafka": {"security": {"ssl_key_password": "x"}}}, "kafka.security.ssl_key_password")
    assert "set ssl_keyfile" in line


# ---------------------------------------------------------------------------------------------- environment, more


def test_a_file_value_that_is_not_a_mapping_is_not_dropped_by_a_variable_below_it(tmp_path):
    """`sinks: {alertmanager: true}` and ANOMALYD_SINKS__ALERTMANAGER__URL made a valid config, the sink off."""
    path = tmp_path / "anomalyd.yaml"
    path.write_text("sinks: {alertmanager: true}\nkafka: [a]\n")
    env = {"ANOMALYD_SINKS__ALERTMANAGER__URL": "http://am:9093", "ANOMALYD_KAFKA__GROUP_ID": "g"}
    assert sorted(errors_of(path=path, env=env)) == [
        f"{path}: kafka: expected a mapping, got list ['a'] (ANOMALYD_KAFKA__GROUP_ID sets a key below it)",
        f"{path}: sinks.alertmanager: expected a mapping, got bool True (ANOMALYD_SINKS__ALERTMANAGER__URL sets a "
        "key below it)"]
    env = {"ANOMALYD_SINKS__ALERTMANAGER": "on", "ANOMALYD_SINKS__ALERTMANAGER__ENABLED": "true"}
    assert errors_of(env=env) == [
        "environment variable ANOMALYD_SINKS__ALERTMANAGER: sinks.alertmanager: expected a mapping, got bool True "
        "(ANOMALYD_SINKS__ALERTMANAGER__ENABLED sets a key below it)"]
    path.write_text("sinks:\n  alertmanager:\n")  # empty: the defaults, then the variable
    assert load_config(path, env={"ANOMALYD_SINKS__ALERTMANAGER__ENABLED": "true"}).sinks.alertmanager.enabled


@pytest.mark.parametrize("var", ["ANOMALYD___ALERTS", "ANOMALYD_ALERTS__", "ANOMALYD_ALERTS____K"])
def test_a_variable_with_an_empty_key_name_is_named(var):
    """ANOMALYD___ALERTS was blamed on the file: '(top level): unknown key'."""
    assert errors_of(path=EXAMPLE, env={var: "x"}) == [
        f"environment variable {var}: an empty key name (a leading, trailing or tripled underscore: "
        "ANOMALYD_<SECTION>__<KEY>)"]
