"""anomalyd configuration: frozen dataclasses mirroring ``deploy/config.example.yaml``, loader and validator.

:func:`load_config` reads the YAML file, applies environment overrides ``ANOMALYD_<SECTION>__<KEY>[__<SUBKEY>]``
(names case-insensitive, values parsed as YAML, e.g. ``ANOMALYD_KAFKA__TOPICS='[a, b]'``; lists are replaced
whole, ``ANOMALYD_MODELS__SERVED='[{name: m, version: "3"}]'``; names without ``__`` are overrides only when
they name a top-level key such as ``ANOMALYD_DEFAULT_MODELS``, so ``ANOMALYD_CONFIG`` and the like are left
alone), then validates everything. All problems are collected into one :class:`ConfigError`, one line each:
``<file or environment variable>: <dotted.key>: <message>``. Defaults equal the example file's values.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import operator
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

ENV_PREFIX = "ANOMALYD_"
META_FILE = "model.json"
SECRET_MASK = "***"
_BAD = object()  # a value that failed validation


class ConfigError(ValueError):
    """Invalid configuration. ``errors`` holds one line per problem: ``<source>: <dotted.key>: <message>``."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(f"invalid configuration ({n} error{'s' * (n != 1)}):\n" + "\n".join(self.errors))


def _f(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules (ge, gt, le, nonempty) in its metadata."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class SecurityConfig:
    """``kafka.security``: transport and authentication; ``sasl_password`` is the effective password (read from
    ``sasl_password_file`` at load time when that is set). Hand :meth:`client_settings` to the Kafka client."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None

    def client_settings(self) -> dict[str, str]:
        """protocol, sasl_mechanism, sasl_username, sasl_password (effective), ssl_cafile; unset ones dropped."""
        keys = ("protocol", "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass(frozen=True)
class KafkaConfig:
    """``kafka``: consumer/producer settings. Exactly one of ``topics`` (non-empty) and ``topic_pattern``."""

    bootstrap_servers: str = _f("127.0.0.1:9092", nonempty=True)
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    group_id: str = _f("anomalyd", nonempty=True)
    topics: list[str] = _f(["sensors"])
    topic_pattern: str | None = None
    dead_letter_topic: str = _f("anomalyd-dead-letter", nonempty=True)
    max_message_bytes: int = _f(65536, ge=1)
    poll_max_records: int = _f(5000, ge=1)
    poll_timeout_ms: int = _f(100, ge=0)
    session_timeout_ms: int = _f(10000, ge=1)
    heartbeat_interval_ms: int = _f(3000, ge=1)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security: SecurityConfig = field(default_factory=SecurityConfig)


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``models.served``: a model name and a pinned version (None = newest)."""

    name: str = _f(dataclasses.MISSING, nonempty=True)
    version: str | None = None


@dataclass(frozen=True)
class ModelsConfig:
    """``models``: where model directories live (``<dir>/<name>/<version>/``) and how they are served."""

    dir: str = _f("/var/lib/anomalyd/models", nonempty=True)
    served: list[ServedModel] = field(
        default_factory=lambda: [ServedModel("sensors-gru"), ServedModel("sensors-lstm")], metadata={"nonempty": True}
    )
    device: str = "auto"
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    watch_interval_s: float = _f(30.0, gt=0)


@dataclass(frozen=True, kw_only=True)
class Route:
    """One entry of ``routes``: streams matching the glob ``match`` or the regex ``regex`` (exactly one) are
    scored by ``models``, whose normalised scores are combined by ``combine``."""

    match: str | None = None
    regex: str | None = None
    models: list[str] = _f(dataclasses.MISSING, nonempty=True)
    combine: Literal["max", "mean"] = "max"

    def matches(self, stream: str) -> bool:
        """Whether ``stream`` matches: case-sensitive glob (whole id) or ``re.search`` of the regex."""
        if self.match is not None:
            return fnmatch.fnmatchcase(stream, self.match)
        return re.search(self.regex or "", stream) is not None


@dataclass(frozen=True)
class ProcessingConfig:
    """``processing``: scoring stride and micro-batch flush limits."""

    stride: int = _f(1, ge=1)
    max_batch_windows: int = _f(4096, ge=1)
    max_delay_ms: int = _f(50, ge=0)


@dataclass(frozen=True)
class AlertsConfig:
    """``alerts``: open after k of the last n windows are over threshold (k <= n <= 64), resolve after m normal."""

    k: int = _f(3, ge=1)
    n: int = _f(5, ge=1, le=64)
    m: int = _f(10, ge=1)
    cooldown_s: float = _f(60.0, ge=0)
    top_features: int = _f(3, ge=0)


@dataclass(frozen=True)
class KafkaSinkConfig:
    """``sinks.kafka``: alerts as JSON messages on a topic."""

    enabled: bool = True
    topic: str = _f("anomalyd-alerts", nonempty=True)


@dataclass(frozen=True)
class AlertmanagerSinkConfig:
    """``sinks.alertmanager``: alerts posted to Alertmanager's v2 API."""

    enabled: bool = False
    url: str = "http://alertmanager:9093"
    timeout_s: float = _f(5.0, gt=0)
    max_retries: int = _f(5, ge=0)
    labels: dict[str, str] = _f({})


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

    bind: str = _f("0.0.0.0", nonempty=True)
    port: int = _f(9308, ge=0, le=65535)


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics``: opt-in per-stream gauge of the K most anomalous streams (0 = off)."""

    top_k_streams: int = _f(0, ge=0, le=1000)


@dataclass(frozen=True)
class ShutdownConfig:
    """``shutdown``: how long to drain in-flight work on SIGTERM."""

    grace_period_s: float = _f(20.0, ge=0)


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``source`` (file path, "<defaults>" or "<string>") is not compared."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    routes: list[Route] = field(default_factory=lambda: [Route(match="pump-*", models=["sensors-gru", "sensors-lstm"])])
    default_models: list[str] = _f([])
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "<string>") -> Config:
        """Validate a parsed YAML document (no environment overrides); raises :class:`ConfigError`."""
        return _validate(d, _Ctx(source))

    def redacted_dict(self) -> dict[str, Any]:
        """Plain nested dict for printing/logging, with the SASL password and URL passwords masked."""
        d = dataclasses.asdict(self)
        del d["source"]
        if d["kafka"]["security"]["sasl_password"] is not None:
            d["kafka"]["security"]["sasl_password"] = SECRET_MASK
        am = d["sinks"]["alertmanager"]
        am["url"] = re.sub(r"(://[^/@:]*:)[^/@]*@", rf"\g<1>{SECRET_MASK}@", am["url"])
        return d


def load_config(path: str | Path | None, env: Mapping[str, str] = os.environ) -> Config:
    """Read the YAML file at ``path`` (None = defaults only), apply ``env`` overrides, validate.

    Raises :class:`ConfigError` listing every problem. The SASL password file is read here."""
    raw: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read config file: {exc.strerror or exc}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{source}: invalid YAML{_yaml_problem(exc)}"]) from None
    ctx = _Ctx(source)
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        _apply_env(raw, env, ctx)
    return _validate(raw, ctx)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """' at line L, column C: <problem>' of a YAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"{where}: {' '.join(text.split())}"


def check_model_files(cfg: Config) -> None:
    """Raise :class:`ConfigError` unless ``models.dir`` exists and every served model has ``model.json`` in its
    pinned version directory, or (version null = newest) in at least one version directory."""
    root = Path(cfg.models.dir)
    if not root.is_dir():
        raise ConfigError([f"{cfg.source}: models.dir: model directory {root} does not exist"])
    errors = []
    for i, m in enumerate(cfg.models.served):
        where = f"{cfg.source}: models.served[{i}]"
        if m.version is not None:
            meta = root / m.name / m.version / META_FILE
            if not meta.is_file():
                errors.append(f"{where}: model {m.name!r} version {m.version!r}: {meta} not found")
        elif not any((v / META_FILE).is_file() for v in _version_dirs(root / m.name)):
            errors.append(f"{where}: model {m.name!r}: no version directory with a {META_FILE} under {root / m.name}")
    if errors:
        raise ConfigError(errors)


def _version_dirs(model_dir: Path) -> list[Path]:
    """Non-hidden subdirectories of a model directory (empty if it does not exist)."""
    return [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if model_dir.is_dir() else []


# ---------------------------------------------------------------------------------------------- machinery


class _Ctx:
    """Validation state: the file source, which dotted keys came from which environment variable, errors."""

    def __init__(self, source: str):
        self.source = source
        self.env_keys: dict[str, str] = {}  # dotted key -> env var name
        self.env_raw: dict[str, str] = {}  # dotted key -> unparsed env value
        self.errors: list[str] = []
        self.bad: set[str] = set()

    def where(self, key: str) -> str:
        k = key
        while k:
            if k in self.env_keys:
                return f"environment variable {self.env_keys[k]}"
            k = k[: max(k.rfind("."), k.rfind("["), 0)]
        return self.source

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.where(key)}: {key or '(top level)'}: {msg}")
        self.bad.add(key)

    def is_bad(self, *keys: str) -> bool:
        return any(b == k or b.startswith((k + ".", k + "[")) for b in self.bad for k in keys)


def _join(key: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


def _describe(v: Any, key: str = "") -> str:
    """Type and (unless ``key`` is a password) shortened repr of a value, for error messages."""
    text = "(hidden)" if key.endswith("password") else repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _parse_env_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_env(raw: dict, env: Mapping[str, str], ctx: _Ctx) -> None:
    """Write ``ANOMALYD_*`` overrides into ``raw`` (shallow names first), recording their dotted keys."""
    top = {f.name for f in dataclasses.fields(Config)} - {"source"}
    items = []
    for name, text in env.items():
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if name.upper().startswith(ENV_PREFIX) and (len(parts) > 1 or parts[0] in top):
            items.append((len(parts), name, parts, text))  # not ANOMALYD_CONFIG, ANOMALYD_CACHE, ...
    for _, name, parts, text in sorted(items):
        node, key = raw, ""
        for part in parts[:-1]:
            key = _join(key, part)
            if not isinstance(node.get(part), dict):
                node[part], ctx.env_keys[key] = {}, name
            node = node[part]
        key = _join(key, parts[-1])
        node[parts[-1]] = _parse_env_value(text)
        ctx.env_keys[key], ctx.env_raw[key] = name, text


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _build(cls: type, data: Any, key: str, ctx: _Ctx) -> Any:
    """Instance of dataclass ``cls`` from mapping ``data``; bad optional values fall back to defaults (error
    recorded); returns _BAD only when a required key is missing or bad."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        ctx.err(key, f"expected a mapping, got {_describe(data)}")
        return _BAD if any(map(_required, dataclasses.fields(cls))) else cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            ctx.err(_join(key, str(k)), f"unknown key ({hint})")
    kwargs: dict[str, Any] = {}
    complete = True
    for name, f in fields.items():
        sub = _join(key, name)
        if name in data:
            value = _convert(hints[name], data[name], sub, ctx)
            if value is not _BAD and (ctx.is_bad(sub) or _check_rules(value, f.metadata, sub, ctx)):
                kwargs[name] = value
                continue
        elif _required(f):
            ctx.err(sub, "missing required key")
        complete = complete and not _required(f)
    if not complete:
        return _BAD
    obj = cls(**kwargs)
    check = _CHECKS.get(cls)
    return check(obj, data, key, ctx) if check else obj


def _convert(tp: Any, v: Any, key: str, ctx: _Ctx) -> Any:
    """``v`` checked against type ``tp`` (recursively); records an error and returns _BAD on mismatch."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, key, ctx)
    if origin is Literal:
        if isinstance(v, str) and v in args:
            return v
        ctx.err(key, f"must be one of {', '.join(map(str, args))}; got {_describe(v)}")
        return _BAD
    if origin is list:
        if not isinstance(v, list):
            ctx.err(key, f"expected a list, got {_describe(v)}")
            return _BAD
        items = [_convert(args[0], x, _join(key, i), ctx) for i, x in enumerate(v)]
        return [x for x in items if x is not _BAD]  # bad elements are dropped (and reported)
    if origin is dict:
        if not isinstance(v, dict):
            ctx.err(key, f"expected a mapping, got {_describe(v)}")
            return _BAD
        for k in v:
            if not isinstance(k, str):
                ctx.err(_join(key, str(k)), f"key must be a string, got {_describe(k)}")
        out = {k: _convert(str, x, _join(key, k), ctx) for k, x in v.items() if isinstance(k, str)}
        return {k: x for k, x in out.items() if x is not _BAD}
    if tp is str and not isinstance(v, str) and key in ctx.env_raw and isinstance(v, int | float | bool):
        return ctx.env_raw[key]  # ANOMALYD_KAFKA__GROUP_ID=123 means the string "123"
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if type(v) is not tp or (tp is float and not math.isfinite(v)):
        hint = " (quote it)" if tp is str and isinstance(v, int | float | bool) else ""
        ctx.err(key, f"expected {'a finite ' if tp is float else ''}{tp.__name__}, got {_describe(v, key)}{hint}")
        return _BAD
    return v


_RULES = {"ge": (operator.ge, "must be >= {}"), "gt": (operator.gt, "must be > {}"),
          "le": (operator.le, "must be <= {}"), "nonempty": (lambda v, _: len(v) > 0, "must not be empty")}


def _check_rules(v: Any, rules: Mapping[str, Any], key: str, ctx: _Ctx) -> bool:
    """Check the field's metadata rules (see :func:`_f`); record the first failure."""
    for rule, bound in rules.items():
        test, what = _RULES[rule]
        if not test(v, bound):
            ctx.err(key, f"{what.format(bound)}, got {v!r}")
            return False
    return True


def _check_regex(pattern: str | None, key: str, ctx: _Ctx) -> None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            ctx.err(key, f"invalid regex {pattern!r}: {exc}")


def _check_kafka(c: KafkaConfig, data: Mapping, key: str, ctx: _Ctx) -> KafkaConfig:
    _check_regex(c.topic_pattern, _join(key, "topic_pattern"), ctx)
    if c.topic_pattern is not None and "topics" not in data:
        c = dataclasses.replace(c, topics=[])  # a pattern replaces the default topic list
    if c.topic_pattern is not None and c.topics:
        ctx.err(_join(key, "topic_pattern"), "set kafka.topics or kafka.topic_pattern, not both (topics: [])")
    elif not c.topics and c.topic_pattern is None and not ctx.is_bad(_join(key, "topics")):
        ctx.err(_join(key, "topics"), "no topics to consume: set kafka.topics or kafka.topic_pattern")
    for i, t in enumerate(c.topics):
        if not t:
            ctx.err(_join(_join(key, "topics"), i), "topic name must not be empty")
    if c.heartbeat_interval_ms >= c.session_timeout_ms and not ctx.is_bad(_join(key, "heartbeat_interval_ms")):
        ctx.err(_join(key, "heartbeat_interval_ms"), f"must be < kafka.session_timeout_ms ({c.session_timeout_ms}),"
                f" got {c.heartbeat_interval_ms}")
    return c


def _check_security(s: SecurityConfig, data: Mapping, key: str, ctx: _Ctx) -> SecurityConfig:
    sasl = s.protocol.startswith("SASL_")
    mech_key = _join(key, "sasl_mechanism")
    if sasl and s.sasl_mechanism is None and not ctx.is_bad(mech_key):
        ctx.err(mech_key, f"protocol {s.protocol} needs a sasl_mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)")
    if s.sasl_mechanism is not None:
        if not sasl and not ctx.is_bad(_join(key, "protocol")):
            ctx.err(mech_key, f"{s.sasl_mechanism} needs protocol SASL_PLAINTEXT or SASL_SSL, got {s.protocol}")
        if not s.sasl_username:
            ctx.err(mech_key, f"{s.sasl_mechanism} needs kafka.security.sasl_username")
        if s.sasl_password is None and s.sasl_password_file is None:
            ctx.err(mech_key, f"{s.sasl_mechanism} needs kafka.security.sasl_password or sasl_password_file")
    if s.ssl_cafile is not None and not Path(s.ssl_cafile).is_file():
        ctx.err(_join(key, "ssl_cafile"), f"file {s.ssl_cafile} not found")
    if s.sasl_password_file is None:
        return s
    file_key = _join(key, "sasl_password_file")
    if s.sasl_password is not None:
        ctx.err(file_key, "set sasl_password or sasl_password_file, not both")
        return s
    try:
        password = Path(s.sasl_password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        ctx.err(file_key, f"cannot read password file {s.sasl_password_file}: {getattr(exc, 'strerror', None) or exc}")
        return s
    if not password:
        ctx.err(file_key, f"password file {s.sasl_password_file} is empty")
    return dataclasses.replace(s, sasl_password=password)


def _check_models(c: ModelsConfig, data: Mapping, key: str, ctx: _Ctx) -> ModelsConfig:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c.device):
        ctx.err(_join(key, "device"), f"must be auto, cpu, cuda, cuda:<index> or mps; got {c.device!r}")
    seen: set[str] = set()
    for i, m in enumerate(c.served):
        sub = _join(_join(key, "served"), i)
        for what, part in (("name", m.name), ("version", m.version)):
            if part is not None and (part in (".", "..") or "/" in part or "\\" in part):
                ctx.err(_join(sub, what), f"must be a plain directory name, got {part!r}")
        if m.name in seen:
            ctx.err(_join(sub, "name"), f"model {m.name!r} is served twice")
        seen.add(m.name)
    return c


def _check_route(r: Route, data: Mapping, key: str, ctx: _Ctx) -> Route:
    if (r.match is None) == (r.regex is None) and not ctx.is_bad(_join(key, "match"), _join(key, "regex")):
        ctx.err(key, "set exactly one of match (glob) and regex")
    _check_regex(r.regex, _join(key, "regex"), ctx)
    if len(set(r.models)) != len(r.models):
        ctx.err(_join(key, "models"), f"lists a model twice: {r.models}")
    return r


def _check_alerts(a: AlertsConfig, data: Mapping, key: str, ctx: _Ctx) -> AlertsConfig:
    if a.k > a.n and not ctx.is_bad(_join(key, "k"), _join(key, "n")):
        ctx.err(_join(key, "k"), f"must be <= alerts.n ({a.n}), got {a.k}")
    return a


def _check_alertmanager(c: AlertmanagerSinkConfig, data: Mapping, key: str, ctx: _Ctx) -> AlertmanagerSinkConfig:
    if not re.match(r"https?://[^/\s]+", c.url):
        ctx.err(_join(key, "url"), f"must be an http:// or https:// URL, got {c.url!r}")
    for name in c.labels:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            ctx.err(_join(_join(key, "labels"), name), "invalid Prometheus label name")
    return c


def _check_config(c: Config, data: Mapping, key: str, ctx: _Ctx) -> Config:
    if ctx.is_bad("models.served"):
        return c  # a served model was dropped; references to it would be reported twice
    served = {m.name for m in c.models.served}
    refs = [(_join(_join(f"routes[{i}]", "models"), j), name) for i, r in enumerate(c.routes)
            for j, name in enumerate(r.models)]
    refs += [(_join("default_models", j), name) for j, name in enumerate(c.default_models)]
    for ref_key, name in refs:
        if name not in served:
            ctx.err(ref_key, f"model {name!r} is not in models.served ({', '.join(sorted(served))})")
    return c


_CHECKS: dict[type, Callable[[Any, Mapping, str, _Ctx], Any]] = {
    KafkaConfig: _check_kafka, SecurityConfig: _check_security, ModelsConfig: _check_models, Route: _check_route,
    AlertsConfig: _check_alerts, AlertmanagerSinkConfig: _check_alertmanager, Config: _check_config,
}


def _validate(raw: Any, ctx: _Ctx) -> Config:
    cfg = _build(Config, raw, "", ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return dataclasses.replace(cfg, source=ctx.source)
