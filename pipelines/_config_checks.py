"""Checks of the daemon's config (:mod:`pipelines.config`) across keys: one per section type, run by the schema
(:mod:`pipelines._config_schema`) once a section is built; each reports a problem with ``ctx.err(key, message)``."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._config_schema import Ctx, join_key
from .alertmanager_http import redacted

if TYPE_CHECKING:
    from .config import AlertmanagerSinkConfig, AlertsConfig, Config, KafkaConfig, ModelsConfig, Route

__all__ = ["RESERVED_ALERT_LABELS", "bootstrap_servers_problem", "check_alertmanager", "check_alerts", "check_config",
           "check_kafka", "check_models", "check_route", "check_topic_name", "is_plain_name"]

RESERVED_ALERT_LABELS = ("alertname", "stream", "model")  # set on every alert by pipelines.sinks.AlertmanagerSink
_FETCH_WAIT_MOST = {  # the most kafka.fetch_max_wait_ms may be, per client
    "kafka-python": (29999, "below its request_timeout_ms, 30000: it refuses more"),
    "confluent": (59000, "librdkafka's socket.timeout.ms, 60000, less a second: it warns of more, and a longer wait "
                         "times out its fetches"),
}


def _check_regex(pattern: str | None, key: str, ctx: Ctx) -> None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            ctx.err(key, f"invalid regex {pattern!r}: {exc}")


def check_kafka(c: KafkaConfig, data: Mapping, key: str, ctx: Ctx) -> KafkaConfig:
    _check_regex(c.topic_pattern, join_key(key, "topic_pattern"), ctx)
    if c.topic_pattern is not None and "topics" not in data:
        c = dataclasses.replace(c, topics=[])  # a pattern replaces the default topic list
    if c.topic_pattern is not None and c.topics:
        ctx.err(join_key(key, "topic_pattern"), "set kafka.topics or kafka.topic_pattern, not both (topics: [])",
                because=join_key(key, "topics"))
    elif not c.topics and c.topic_pattern is None and not ctx.is_bad(join_key(key, "topics")):
        ctx.err(join_key(key, "topics"), "no topics to consume: set kafka.topics or kafka.topic_pattern")
    for i, t in enumerate(c.topics):
        check_topic_name(t, join_key(join_key(key, "topics"), i), ctx)
    check_topic_name(c.dead_letter_topic, join_key(key, "dead_letter_topic"), ctx)
    if c.client == "confluent":
        _check_confluent_installed(join_key(key, "client"), ctx)
    most, why = _FETCH_WAIT_MOST[c.client]  # a bad client stood in for by the default: its limit says nothing
    if c.fetch_max_wait_ms > most and not ctx.is_bad(join_key(key, "fetch_max_wait_ms"), join_key(key, "client")):
        ctx.err(join_key(key, "fetch_max_wait_ms"), f"must be <= {most} with kafka.client {c.client} ({why}), "
                f"got {c.fetch_max_wait_ms}", because=join_key(key, "client"))
    if not ctx.is_bad(join_key(key, "bootstrap_servers")):
        if problem := bootstrap_servers_problem(c.bootstrap_servers):
            ctx.err(join_key(key, "bootstrap_servers"), problem)
    if c.heartbeat_interval_ms >= c.session_timeout_ms and not ctx.is_bad(join_key(key, "heartbeat_interval_ms")):
        ctx.err(join_key(key, "heartbeat_interval_ms"), f"must be < kafka.session_timeout_ms ({c.session_timeout_ms}),"
                f" got {c.heartbeat_interval_ms}", because=join_key(key, "session_timeout_ms"))
    return c


def bootstrap_servers_problem(servers: str) -> str | None:
    """Why a bootstrap servers list is not one (no broker in it, or one that is not host:port), or None."""
    from .kafka_security import host_port  # as kafka-python reads it (librdkafka differs in corners only)

    hint = "a comma-separated list of host:port, [IPv6]:port or host; ports 1-65535"
    if not any(map(str.strip, servers.split(","))):
        return f"no broker in {servers!r} ({hint})"
    for server in filter(str.strip, servers.split(",")):
        try:
            if not 0 < host_port(server)[1] < 65536:
                raise ValueError(server)
        except ValueError:
            return f"cannot read {server.strip()!r} as host:port ({hint})"
    return None


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(topic: str, key: str, ctx: Ctx) -> None:
    """Kafka's rule for a topic name: 1 to 249 of ASCII letters, digits, '.', '_', '-'; not '.' or '..'."""
    if not topic:
        ctx.err(key, "topic name must not be empty")
    elif not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        ctx.err(key, f"not a legal Kafka topic name: {topic!r} (1 to 249 of the letters a-z and A-Z, the digits, "
                "'.', '_' and '-'; not '.' or '..')")


def _check_confluent_installed(key: str, ctx: Ctx) -> None:
    """``kafka.client: confluent`` needs confluent_kafka: a config error now, not a traceback when `run` starts."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        missing = exc.name == "confluent_kafka"
        ctx.err(key, "confluent needs the confluent-kafka package (pip install 'anomalyd[fast]')" if missing else
                f"confluent: the confluent-kafka package cannot be loaded: {exc}")


def is_plain_name(part: str) -> bool:
    """Whether a model name or version is one directory below models.dir (no separator, not . or ..)."""
    return part not in (".", "..") and "/" not in part and "\\" not in part


def check_models(c: ModelsConfig, data: Mapping, key: str, ctx: Ctx) -> ModelsConfig:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c.device):
        ctx.err(join_key(key, "device"), f"must be auto, cpu, cuda, cuda:<index> or mps; got {c.device!r}")
    seen: set[str] = set()
    for i, m in enumerate(c.served):
        sub = join_key(join_key(key, "served"), i)
        for what, part in (("name", m.name), ("version", m.version)):
            if part is not None and not is_plain_name(part):
                ctx.err(join_key(sub, what), f"must be a plain directory name, got {part!r}")
        if m.name in seen:
            ctx.err(join_key(sub, "name"), f"model {m.name!r} is served twice")
        seen.add(m.name)
    return c


def check_route(r: Route, data: Mapping, key: str, ctx: Ctx) -> Route:
    if (r.match is None) == (r.regex is None) and not ctx.is_bad(join_key(key, "match"), join_key(key, "regex")):
        ctx.err(key, "set exactly one of match (glob) and regex")
    _check_regex(r.regex, join_key(key, "regex"), ctx)
    if len(set(r.models)) != len(r.models):
        ctx.err(join_key(key, "models"), f"lists a model twice: {r.models}")
    return r


def check_alerts(a: AlertsConfig, data: Mapping, key: str, ctx: Ctx) -> AlertsConfig:
    if a.k > a.n and not ctx.is_bad(join_key(key, "k"), join_key(key, "n")):
        ctx.err(join_key(key, "k"), f"must be <= alerts.n ({a.n}), got {a.k}", because=join_key(key, "n"))
    return a


def check_alertmanager(c: AlertmanagerSinkConfig, data: Mapping, key: str, ctx: Ctx) -> AlertmanagerSinkConfig:
    if not re.match(r"https?://[^/\s]+", c.url):
        ctx.err(join_key(key, "url"), f"must be an http:// or https:// URL, got {redacted(c.url)!r}")
    else:
        try:
            urllib.parse.urlsplit(c.url).port  # noqa: B018 - raises on a bad port or IPv6 address
        except ValueError:  # its text may quote a piece of the password
            ctx.err(join_key(key, "url"), f"{redacted(c.url)!r} is not a URL urllib can take apart (a bad port or "
                    "IPv6 address; percent-encode a '/', '?', '#' or '@' in the password: %2F, %3F, %23, %40)")
    for name in c.labels:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            ctx.err(join_key(join_key(key, "labels"), name), "invalid Prometheus label name")
        elif name in RESERVED_ALERT_LABELS:
            ctx.err(join_key(join_key(key, "labels"), name), f"reserved label name: anomalyd sets "
                    f"{', '.join(RESERVED_ALERT_LABELS)} on every alert")
        elif name == "severity":  # it overrode the key of its own, silently
            ctx.err(join_key(join_key(key, "labels"), name), f"set {join_key(key, 'severity')} instead (the "
                    f"severity label of every alert, {c.severity!r} now)")
    if c.generator_url and (problem := _request_uri_problem(c.generator_url)):
        # Alertmanager refuses the whole post of alerts whose generatorURL it cannot parse: none would go out
        ctx.err(join_key(key, "generator_url"), f"Alertmanager would refuse it ({problem}): use an absolute URL "
                f"such as https://grafana.example.com/d/anomalyd, got {c.generator_url!r}")
    return c


_HOST_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=<>\"\u0080-\U0010ffff]*")  # what Go's net/url takes in a host


def _request_uri_problem(url: str) -> str | None:
    """Why Go's ``url.ParseRequestURI`` (Alertmanager's check of a ``uri``) refuses ``url``, or None."""
    if re.search(r"[\x00-\x1f\x7f]", url):
        return "a control character"
    if url == "*":
        return None
    if url.startswith(":"):
        return "no scheme before ':'"
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    rest = url[scheme.end():] if scheme else url
    if not rest.startswith("/"):
        return None if scheme else "neither an absolute URL nor a path from /"  # scheme:opaque is taken as it is
    rest = rest.split("?", 1)[0]  # the query is not checked
    authority = ""
    if scheme and rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        rest = "/" + path
    if re.search(r"%(?![0-9A-Fa-f]{2})", rest):
        return "a '%' not followed by two hex digits"
    userinfo, at, host = authority.rpartition("@")
    if at and not re.fullmatch(r"[A-Za-z0-9\-._:~!$&'()*+,;=%@]*", userinfo):
        return "a character not allowed before '@'"
    if host.startswith("["):
        return None if re.fullmatch(r"\[[0-9A-Fa-f:.%A-Za-z]+\](:[0-9]*)?", host) else "a bad [IPv6] host"
    name, colon, port = host.rpartition(":")
    name = name if colon else port
    port = port if colon else ""
    if port and not re.fullmatch(r"[0-9]+", port):
        return f"a port that is not a number: {port!r}"
    if not _HOST_CHARS.fullmatch(re.sub(r"%(25|[89A-Fa-f][0-9A-Fa-f])", "", name)):  # other escapes: refused
        return f"a character not allowed in a host name: {name!r}"
    return None


def check_config(c: Config, data: Mapping, key: str, ctx: Ctx) -> Config:
    if ctx.is_bad("models.served"):
        return c  # a served model was dropped; references to it would be reported twice
    served = {m.name for m in c.models.served}
    refs = [(join_key(join_key(f"routes[{i}]", "models"), j), name) for i, r in enumerate(c.routes)
            for j, name in enumerate(r.models)]
    refs += [(join_key("default_models", j), name) for j, name in enumerate(c.default_models)]
    if len(set(c.default_models)) != len(c.default_models):  # as for a route's models
        ctx.err("default_models", f"lists a model twice: {c.default_models}")
    if "routes" in ctx.bad:  # routes itself was bad (not a list): the default route stood in, its refs say nothing
        refs = [(k, name) for k, name in refs if not k.startswith("routes")]
    default_route = "" if "routes" in (data or {}) else " (routes is not set: this is the default route, of the " \
        "example config; set routes, or routes: [] with default_models)"
    for ref_key, name in refs:
        if name not in served:
            hint = default_route if ref_key.startswith("routes") else ""
            ctx.err(ref_key, f"model {name!r} is not in models.served ({', '.join(sorted(served))}){hint}")
    check_topic_name(c.sinks.kafka.topic, "sinks.kafka.topic", ctx)
    _check_output_topics(c, ctx)
    return c


def _check_output_topics(c: Config, ctx: Ctx) -> None:
    """The topics the daemon writes must not be among those it reads: a dead letter read back is dead-lettered
    again, for ever, and alerts read back are dead letters (not sensor readings)."""
    outputs = [("kafka.dead_letter_topic", c.kafka.dead_letter_topic)]
    if c.sinks.kafka.enabled:
        outputs.append(("sinks.kafka.topic", c.sinks.kafka.topic))
    pattern = c.kafka.topic_pattern
    for key, topic in outputs:
        if ctx.is_bad(key):
            continue
        if topic in c.kafka.topics:
            ctx.err(key, f"{topic!r} is also an input topic (kafka.topics): what the daemon writes there it would "
                    f"read back", because="kafka.topics")
        elif pattern is not None and not ctx.is_bad("kafka.topic_pattern") and re.match(pattern.lstrip("^"), topic):
            ctx.err(key, f"{topic!r} matches the input kafka.topic_pattern {pattern!r}: what the daemon writes "
                    f"there it would read back (rename it, or narrow the pattern)", because="kafka.topic_pattern")
