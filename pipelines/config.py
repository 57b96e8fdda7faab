"""anomalyd configuration: frozen dataclasses mirroring ``deploy/config.example.yaml``, loader and validator.

:func:`load_config` reads the YAML file, applies environment overrides ``ANOMALYD_<SECTION>__<KEY>[__<SUBKEY>]``
(names case-insensitive, values parsed as YAML, e.g. ``ANOMALYD_KAFKA__TOPICS='[a, b]'``, except for string keys,
which take the text as it is, ``ANOMALYD_KAFKA__GROUP_ID='grp #1'``; lists are replaced whole,
``ANOMALYD_MODELS__SERVED='[{name: m, version: "3"}]'``; names without ``__`` are overrides only when they name a
top-level key such as ``ANOMALYD_DEFAULT_MODELS``, so ``ANOMALYD_CONFIG`` and the like are left alone), then
validates everything. All problems are collected into one :class:`ConfigError`, one line each:
``<file or environment variable>: <dotted.key>: <message>``. Defaults equal the example file's values.
The generic validation machinery lives in :mod:`pipelines._config_schema`, the cross-key checks in
:mod:`pipelines._config_checks`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ._config_checks import (
    check_alertmanager,
    check_alerts,
    check_config,
    check_kafka,
    check_models,
    check_route,
)
from ._config_schema import (
    Check,
    ConfigError,
    Ctx,
    apply_env,
    build,
    load_yaml,
    rule_field,
    where,
    yaml_problem,
)
from ._config_security import SecurityConfig, check_security
from .alertmanager_http import redacted
from .kafka_security import PASSWORD_KEYS
from .positions import MAX_METADATA_BYTES, MAX_REBUILD_RECORDS
from .source import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES

ENV_PREFIX = "ANOMALYD_"
META_FILE = "model.json"
SECRET_MASK = "***"
MAX_SECONDS = 1e9  # the most any *_s key takes (31 years): more overflows the int and timeout conversions it feeds


@dataclass(frozen=True)
class KafkaConfig:
    """``kafka``: consumer/producer settings. Exactly one of ``topics`` (non-empty) and ``topic_pattern``."""

    bootstrap_servers: str = rule_field("127.0.0.1:9092", nonempty=True)
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    group_id: str = rule_field("anomalyd", nonempty=True)
    topics: list[str] = rule_field(["sensors"])
    topic_pattern: str | None = None
    dead_letter_topic: str = rule_field("anomalyd-dead-letter", nonempty=True)
    max_message_bytes: int = rule_field(65536, ge=1)
    poll_max_records: int = rule_field(5000, ge=1, le=1_000_000)  # confluent's consume() takes at most 1,000,000
    # a poll waits at most this long: the liveness check (/healthz) and a stop wait for it on a quiet topic
    poll_timeout_ms: int = rule_field(100, ge=0, le=10_000)
    poll_ahead: bool = True  # confluent: after a full poll, the next one on a second thread (pipelines/poll_ahead.py)
    # commit at most this often while busy (0: every flush); one commit in flight at a time (pipelines/commits.py)
    commit_interval_ms: int = rule_field(1000, ge=0)
    # the upper bounds are librdkafka's: it refuses more (the fetch wait is bounded per client by check_kafka). The
    # session timeout's is librdkafka's too: it refuses one over its max.poll.interval.ms (300,000 by default, which
    # the daemon leaves); kafka-python takes more, but the one limit holds for both so a config works with either
    fetch_min_bytes: int = rule_field(FETCH_MIN_BYTES, ge=1, le=100_000_000)  # Kafka's fetch.min.bytes ...
    fetch_max_wait_ms: int = rule_field(FETCH_MAX_WAIT_MS, ge=0, le=300_000)  # ... and fetch.max.wait.ms
    session_timeout_ms: int = rule_field(10000, ge=1, le=300_000)
    heartbeat_interval_ms: int = rule_field(3000, ge=1, le=3_600_000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_rebuild_records: int = rule_field(MAX_REBUILD_RECORDS, ge=0)  # per partition, replayed to rebuild windows
    # a commit's metadata at most (the floor, and open incidents handed over; the brokers' offset.metadata.max.bytes
    # is 4,096 by default, and a commit over it is refused): lower it with theirs; below about 450, no incident fits
    commit_metadata_max_bytes: int = rule_field(MAX_METADATA_BYTES, ge=64)
    security: SecurityConfig = field(default_factory=SecurityConfig)


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``models.served``: a model name and a pinned version (None = newest)."""

    name: str = rule_field(dataclasses.MISSING, nonempty=True)
    version: str | None = None


@dataclass(frozen=True)
class ModelsConfig:
    """``models``: where model directories live (``<dir>/<name>/<version>/``) and how they are served."""

    dir: str = rule_field("/var/lib/anomalyd/models", nonempty=True)
    served: list[ServedModel] = field(
        default_factory=lambda: [ServedModel("sensors-gru"), ServedModel("sensors-lstm")], metadata={"nonempty": True}
    )
    device: str = "auto"
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    watch_interval_s: float = rule_field(30.0, gt=0, le=MAX_SECONDS)
    # at start; 0: a served model without a version is exit 2
    wait_for_models_s: float = rule_field(0.0, ge=0, le=MAX_SECONDS)


@dataclass(frozen=True, kw_only=True)
class Route:
    """One entry of ``routes``: streams matching the glob ``match`` or the regex ``regex`` (exactly one) are
    scored by ``models``, whose normalised scores are combined by ``combine``."""

    match: str | None = None
    regex: str | None = None
    models: list[str] = rule_field(dataclasses.MISSING, nonempty=True)
    combine: Literal["max", "mean"] = "max"

    def matches(self, stream: str) -> bool:
        """Whether ``stream`` matches: case-sensitive glob (whole id) or ``re.search`` of the regex."""
        if self.match is not None:
            return fnmatch.fnmatchcase(stream, self.match)
        return re.search(self.regex or "", stream) is not None


@dataclass(frozen=True)
class ProcessingConfig:
    """``processing``: scoring stride and micro-batch flush limits."""

    stride: int = rule_field(1, ge=1)
    max_batch_windows: int = rule_field(4096, ge=1)
    max_delay_ms: int = rule_field(20, ge=0)
    score_in_background: bool = True  # score micro-batch k on a second thread while batch k+1 is polled
    model_threads: int = rule_field(0, ge=0)  # CPU inference threads; 0: adaptive, up to the container's CPUs
    # forget a stream silent this long (0: never)
    stream_idle_timeout_s: float = rule_field(86400.0, ge=0, le=MAX_SECONDS)
    # dead-letter the events of a new stream while this many are tracked (0: no limit): ids are memory (a window
    # each), and a producer with a bug or an attacker sending ever new ids would grow it until the container dies
    max_streams: int = rule_field(1_000_000, ge=0)
    # dead-letter an event whose ts is further ahead of its record's broker timestamp (0: never): one garbage time (µs,
    # a corrupt field) made every later event of its stream late, dropped, until the stream was forgotten
    max_event_time_ahead_s: float = rule_field(86400.0, ge=0, le=MAX_SECONDS)


@dataclass(frozen=True)
class AlertsConfig:
    """``alerts``: open after k of the last n windows are over threshold (k <= n <= 64), resolve after m normal."""

    k: int = rule_field(3, ge=1)
    n: int = rule_field(5, ge=1, le=64)
    m: int = rule_field(10, ge=1)
    cooldown_s: float = rule_field(60.0, ge=0, le=MAX_SECONDS)
    top_features: int = rule_field(3, ge=0)


@dataclass(frozen=True)
class KafkaSinkConfig:
    """``sinks.kafka``: alerts as JSON messages on a topic."""

    enabled: bool = True
    topic: str = rule_field("anomalyd-alerts", nonempty=True)


@dataclass(frozen=True)
class AlertmanagerSinkConfig:
    """``sinks.alertmanager``: alerts posted to Alertmanager's v2 API."""

    enabled: bool = False
    url: str = "http://alertmanager:9093"
    timeout_s: float = rule_field(5.0, gt=0, le=MAX_SECONDS)
    max_retries: int = rule_field(5, ge=0)
    labels: dict[str, str] = rule_field({})
    severity: str = rule_field("warning", nonempty=True)  # the alerts' severity label
    # a firing alert is re-posted this often (endsAt: 4x ahead)
    resend_interval_s: float = rule_field(60.0, gt=0, le=MAX_SECONDS)
    generator_url: str | None = None  # the alerts' generatorURL (a link back, e.g. to the Grafana dashboard)


@dataclass(frozen=True)
class LogSinkConfig:
    """``sinks.log``: alerts written to the daemon's log."""

    enabled: bool = True


@dataclass(frozen=True)
class SinksConfig:
    """``sinks``: where alerts go."""

    kafka: KafkaSinkConfig = field(default_factory=KafkaSinkConfig)
    alertmanager: AlertmanagerSinkConfig = field(default_factory=AlertmanagerSinkConfig)
    log: LogSinkConfig = field(default_factory=LogSinkConfig)


@dataclass(frozen=True)
class HttpConfig:
    """``http``: the /metrics, /healthz, /readyz server."""

    bind: str = rule_field("0.0.0.0", nonempty=True)
    port: int = rule_field(9308, ge=0, le=65535)


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics``: opt-in per-stream gauge of the K most anomalous streams (0 = off)."""

    top_k_streams: int = rule_field(0, ge=0, le=1000)


@dataclass(frozen=True)
class ShutdownConfig:
    """``shutdown``: how long to drain in-flight work on SIGTERM."""

    grace_period_s: float = rule_field(20.0, ge=0, le=MAX_SECONDS)


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``source`` (file path, "<defaults>" or "<string>") and ``env_keys`` (dotted key ->
    the environment variable that set it) are not compared; :meth:`where` names the one that set a key."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    routes: list[Route] = field(default_factory=lambda: [Route(match="pump-*", models=["sensors-gru", "sensors-lstm"])])
    default_models: list[str] = rule_field([])
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)
    env_keys: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False, metadata={"internal": True})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "<string>") -> Config:
        """Validate a parsed YAML document (no environment overrides); raises :class:`ConfigError`."""
        return _validate(d, Ctx(source, _CHECKS))

    def where(self, key: str) -> str:
        """What set the dotted ``key``, for error lines: ``environment variable NAME`` when it (or a section above
        it) came from the environment, else the file, naming also the variables that set keys below it."""
        found = where(key, self.env_keys, self.source)
        below = sorted({v for k, v in self.env_keys.items() if k.startswith((key + ".", key + "["))})
        if found != self.source or not below:
            return found
        return f"{self.source} and environment variable{'s' * (len(below) > 1)} {', '.join(below)}"

    def redacted_dict(self) -> dict[str, Any]:
        """Plain nested dict for printing/logging, with the SASL password and URL passwords masked."""
        d = dataclasses.asdict(self)
        del d["source"], d["env_keys"]
        for secret in PASSWORD_KEYS:
            if d["kafka"]["security"][secret] is not None:
                d["kafka"]["security"][secret] = SECRET_MASK
        am = d["sinks"]["alertmanager"]
        am["url"] = redacted(am["url"])  # as the sink parses the credentials (up to the last @)
        return d


def load_config(path: str | Path | None, env: Mapping[str, str] = os.environ) -> Config:
    """Read the YAML file at ``path`` (None = defaults only), apply ``env`` overrides, validate.

    Raises :class:`ConfigError` listing every problem. The SASL password file is read here."""
    raw: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = load_yaml(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read config file: {exc.strerror or exc}"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{source}: cannot read config file: not UTF-8 (byte 0x{exc.object[exc.start]:02x} "
                               f"at position {exc.start})"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{source}: invalid YAML{yaml_problem(exc)}"]) from None
    ctx = Ctx(source, _CHECKS)
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        apply_env(raw, env, ENV_PREFIX, Config, ctx)
    return _validate(raw, ctx)


def check_model_files(cfg: Config) -> None:
    """Raise :class:`ConfigError` unless ``models.dir`` exists and every served model has ``model.json`` in its
    pinned version directory, or (version null = newest) in at least one version directory."""
    root = Path(cfg.models.dir)
    if not root.is_dir():
        why = "is not a directory" if root.exists() else "does not exist"
        raise ConfigError([f"{cfg.where('models.dir')}: models.dir: model directory {root} {why}"])
    errors = []
    for i, m in enumerate(cfg.models.served):
        key = f"models.served[{i}]"
        here = f"{cfg.where(key)}: {key}"
        if m.version is not None:
            meta = root / m.name / m.version / META_FILE
            if not meta.is_file():
                errors.append(f"{here}: model {m.name!r} version {m.version!r}: {meta} not found")
        elif not any((v / META_FILE).is_file() for v in _version_dirs(root / m.name)):
            errors.append(f"{here}: model {m.name!r}: no version directory with a {META_FILE} under {root / m.name}")
    if errors:
        raise ConfigError(errors)


def _version_dirs(model_dir: Path) -> list[Path]:
    """Non-hidden subdirectories of a model directory (empty if it does not exist)."""
    return [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if model_dir.is_dir() else []


_CHECKS: dict[type, Check] = {  # the cross-key checks (pipelines._config_checks), by section type
    KafkaConfig: check_kafka, SecurityConfig: check_security, ModelsConfig: check_models, Route: check_route,
    AlertsConfig: check_alerts, AlertmanagerSinkConfig: check_alertmanager, Config: check_config,
}


def _validate(raw: Any, ctx: Ctx) -> Config:
    """Build the whole Config from a parsed document (overrides already applied); raise ConfigError on problems."""
    cfg = build(Config, raw, "", ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return dataclasses.replace(cfg, source=ctx.source, env_keys=dict(ctx.env_keys))
