"""``anomalyd check``: everything ``anomalyd run`` checks at start, without running; optionally Kafka too.

Offline it validates the config (file and ``ANOMALYD_*`` overrides), loads every served model and builds the
routes, exactly as the daemon's constructor does; a newest version that does not load (``run`` would serve an
older one) is a problem here. ``--connect`` then logs in to Kafka with the configured client
and security settings, looks up the topics, and asks an enabled Alertmanager sink for its status. Exit codes as
``run``: 0 ok, 2 a config problem (a bad key, a model, refused credentials, an untrusted broker), 1 a problem
that may go away (Kafka unreachable, an input topic missing or a topic_pattern matching none, an output topic
missing where the brokers do not create topics, Alertmanager not answering). Meant for a CI step,
a Helm test or an init container before a rollout.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from .config import Config, ConfigError, load_config
from .kafka_io import LIBRDKAFKA_LOG
from .kafka_security import (
    KafkaAuthenticationError,
    KafkaBootstrapError,
    client_security_config,
    confluent_refusal,
    describe_credentials,
    kafka_python_bootstrap,
)

__all__ = ["brokers_create_topics", "check_command", "fast_paths", "topic_partitions"]

_TIMEOUT_S = 15.0


def topic_partitions(client: str, bootstrap_servers: str, security: Mapping[str, Any] | None,
                     timeout_s: float = _TIMEOUT_S) -> dict[str, int]:
    """Every topic the brokers show to these credentials, with its partition count, fetched with ``client``.
    Raises :class:`KafkaAuthenticationError` or :class:`KafkaBootstrapError` as the daemon's start would."""
    if client == "kafka-python":
        from kafka import KafkaConsumer

        with kafka_python_bootstrap(bootstrap_servers, security):
            consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                     bootstrap_timeout_ms=int(timeout_s * 1000),
                                     **client_security_config("kafka-python", security))
        try:
            return {t: len(consumer.partitions_for_topic(t) or ()) for t in consumer.topics()}
        finally:
            consumer.close()
    from confluent_kafka import Consumer, KafkaException

    refused: list[Exception] = []

    def on_error(err: Any) -> None:
        refusal = confluent_refusal(err, bootstrap_servers, security)
        if refusal is not None:
            refused.append(refusal)

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "anomalyd-check", "error_cb": on_error,
                         "logger": LIBRDKAFKA_LOG, **client_security_config("confluent", security)})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            consumer.poll(0.1)  # serves the error callback, which list_topics does not
            if refused:
                raise refused[-1]
            try:
                metadata = consumer.list_topics(timeout=1.0)
                break
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise KafkaBootstrapError(f"cannot connect to Kafka at {bootstrap_servers} "
                                              f"({describe_credentials(security)}): {exc}") from exc
    finally:
        consumer.close()
    return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}


def _check_kafka(cfg: Config) -> tuple[list[str], list[str]]:
    """(lines to print, problems) for the configured topics as the configured credentials see them."""
    k = cfg.kafka
    topics = topic_partitions(k.client, k.bootstrap_servers, k.security.client_settings())
    lines = [f"kafka {k.bootstrap_servers} ({k.client}; {describe_credentials(k.security.client_settings())}): "
             f"logged in, {len(topics)} topics visible"]
    problems = []
    if k.topic_pattern:
        matched = sorted(t for t in topics if re.match(k.topic_pattern.lstrip("^"), t) and not t.startswith("__"))
        lines.append(f"  topic_pattern {k.topic_pattern!r}: {len(matched)} topics {matched[:10]}")
        if not matched:  # as a missing input topic: `run` would be assigned nothing and consume nothing
            problems.append(f"kafka.topic_pattern: {k.topic_pattern!r} matches no topic at {k.bootstrap_servers}")
    for topic in k.topics if not k.topic_pattern else []:
        if topic in topics:
            lines.append(f"  input topic {topic}: {topics[topic]} partitions")
        else:
            problems.append(f"kafka.topics: topic {topic!r} not found at {k.bootstrap_servers}")
    outputs = [("kafka.dead_letter_topic", k.dead_letter_topic)]
    if cfg.sinks.kafka.enabled:
        outputs.append(("sinks.kafka.topic", cfg.sinks.kafka.topic))
    creates = None  # whether the brokers create a topic on its first write, asked once one is missing
    for key, topic in outputs:
        if topic in topics:
            lines.append(f"  {key} {topic}: {topics[topic]} partitions")
            continue
        creates = brokers_create_topics(k.bootstrap_servers, k.security.client_settings()) if creates is None \
            else creates
        if creates is False:  # a dead letter the brokers refuse stops the daemon, again on every restart
            problems.append(f"{key}: topic {topic!r} not found at {k.bootstrap_servers}, and the brokers do not "
                            "create topics (auto.create.topics.enable=false): create it")
        else:
            why = "the brokers create it on its first write" if creates is True else \
                f"created on its first write only if the brokers create topics ({creates})"
            lines.append(f"  {key} {topic}: not found: {why}")
    return lines, problems


def brokers_create_topics(bootstrap_servers: str, security: Mapping[str, Any] | None,
                          timeout_s: float = _TIMEOUT_S) -> bool | str:
    """Whether the brokers create a topic on its first write (``auto.create.topics.enable`` of one of them); when
    that cannot be read (no DescribeConfigs permission, say), why, as a string."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    try:
        with kafka_python_bootstrap(bootstrap_servers, security):
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, bootstrap_timeout_ms=int(timeout_s * 1000),
                                     request_timeout_ms=int(timeout_s * 500),  # two requests within timeout_s
                                     **client_security_config("kafka-python", security))
        try:
            broker = str(admin.describe_cluster()["brokers"][0]["broker_id"])
            got = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, broker,
                                                         configs=["auto.create.topics.enable"])], config_filter="all")
        finally:
            admin.close()
        entry = got.get("broker", {}).get(broker, {}).get("auto.create.topics.enable")
        if entry is None:  # kafka-python drops the error code of a refused DescribeConfigs: an empty answer
            return "no DescribeConfigs permission on the cluster, or no answer"
        return str(entry["value"]).lower() == "true"
    except Exception as exc:  # noqa: BLE001 - an answer we cannot use is said, not a failed check
        return f"not readable here: {type(exc).__name__}: {exc}"[:200]


def _check_alertmanager(cfg: Config) -> tuple[list[str], list[str]]:
    """(lines, problems) for ``sinks.alertmanager`` when enabled: its status API answers with a cluster status."""
    import json

    from .alertmanager_http import AlertmanagerHTTP

    am = cfg.sinks.alertmanager
    if not am.enabled:
        return [], []
    shown = cfg.redacted_dict()["sinks"]["alertmanager"]["url"]
    try:  # as the sink asks: credentials as Basic auth, a redirect refused (the sink's POST would not survive it)
        status = json.loads(AlertmanagerHTTP(am.url).open("/api/v2/status", am.timeout_s))
    except (OSError, ValueError) as exc:  # URLError, HTTPError, redirect, refused, timeout, not JSON
        return [], [f"sinks.alertmanager.url: {shown}: no Alertmanager status: {type(exc).__name__}: {exc}"]
    if not isinstance(status, dict):  # a proxy's or another service's JSON at that URL
        return [], [f"sinks.alertmanager.url: {shown}: no Alertmanager status: /api/v2/status answered "
                    f"{type(status).__name__} JSON, not an object"]

    def part(name: str, key: str) -> str:
        value = status.get(name)
        return str(value.get(key, "?")) if isinstance(value, dict) else "?"

    version, cluster = part("versionInfo", "version"), part("cluster", "status")
    return [f"alertmanager {shown}: version {version}, cluster {cluster}"], []


def fast_paths(daemon) -> str:
    """One line: the device and which of anomalyd's fast paths this daemon uses (each falls back by itself)."""
    from . import native_decode

    engine = daemon.engine

    def state(on: bool, switch: str) -> str:
        return "on" if on else f"off ({switch})"

    precision = engine.precision
    if engine.device.type == "cpu" and precision != "float32":  # the CPU has no autocast: see InferenceEngine
        precision = ("float32 with bfloat16 matrix products" if engine.bf16_products else
                     f"float32 ({precision} on the CPU: bfloat16 products only, fused kernels and AVX512_BF16)")
    parts = [f"models on {engine.device} in {precision}"]
    if engine.device.type == "cpu":
        parts.append(f"fused CPU kernels {state(engine.fused, 'ANOMALYD_FUSED_RNN, or no build')}")
    else:
        parts.append(f"CUDA graphs {state(engine.cuda_graphs, 'ANOMALYD_CUDA_GRAPHS')}")
    decoder = native_decode.load() is not None
    parts.append(f"native JSON decoder {state(decoder, 'ANOMALYD_NATIVE_DECODE, or no build')}")
    windows = all(route.buffer.native for route in daemon.routes)
    parts.append(f"native window kernel {state(windows, 'ANOMALYD_NATIVE_WINDOWS, or no build')}")
    return "fast paths: " + "; ".join(parts)


def _check_bind(cfg: Config) -> None:
    """``http.bind`` is an address of this host, as ``run`` finds when it listens: its HTTP server started and
    stopped here on a free port, not ``http.port``, which the daemon being checked may hold."""
    from prometheus_client import CollectorRegistry

    from .httpserver import BindError, HealthServer

    try:
        HealthServer(CollectorRegistry(), cfg.http.bind, 0).start().stop()
    except BindError as exc:
        cause = exc.__cause__  # the socket's error (HealthServer.start raises BindError from it)
        raise ConfigError([f"{cfg.where('http.bind')}: http.bind: cannot listen on {cfg.http.bind!r}: "
                           f"{cause.strerror or cause}"]) from None


def _check_newest_versions(cfg: Config, daemon: Any) -> None:
    """``run`` starts on an older version when the newest does not load (logged); a check before a rollout is
    there to catch exactly that, so it is a problem here (ConfigError, exit 2)."""
    errors, behind = [], daemon.models.behind()
    for i, served in enumerate(cfg.models.served):
        if served.name in behind:
            newest, loaded = behind[served.name]
            key = f"models.served[{i}]"
            errors.append(f"{cfg.where(key)}: {key}: model {served.name!r}: the newest version {newest} does not load "
                          f"(the error is logged above); `run` would serve version {loaded}: replace or remove "
                          f"{daemon.models.store.root / served.name / newest}, or pin a version")
    if errors:
        raise ConfigError(errors)


def check_command(config_path: str, connect: bool) -> int:
    """Print what was checked; the exit code as described in the module docstring."""
    from .daemon import Daemon

    cfg = load_config(config_path)  # ConfigError -> exit 2 in the CLI
    daemon = Daemon(cfg)  # checks the model files, loads every served model, builds the routes
    _check_newest_versions(cfg, daemon)
    _check_bind(cfg)
    print(f"config {cfg.source}: valid")
    for i, route in enumerate(daemon.routes):  # cfg.routes in order, then default_models' (the router's match "*")
        models = ", ".join(f"{m.name} {m.version} ({m.detector.kind}, window {m.detector.window}, "
                           f"{m.detector.n_features} features)" for m in route.models)
        name = (route.spec.match or route.spec.regex) if i < len(cfg.routes) else "(default_models)"
        print(f"  route {name}: {models}")
    print(f"  {fast_paths(daemon)}")
    if not connect:
        return 0
    try:
        lines, problems = _check_kafka(cfg)
    except KafkaAuthenticationError as exc:
        raise ConfigError([f"{cfg.where('kafka.security')}: kafka.security: {exc}"]) from exc
    am_lines, am_problems = _check_alertmanager(cfg)
    lines, problems = lines + am_lines, problems + am_problems
    print("\n".join(lines))
    for problem in problems:  # "<dotted.key>: <message>"
        print(f"anomalyd: problem: {cfg.where(problem.split(':', 1)[0])}: {problem}")
    return 1 if problems else 0
