"""Alert sinks: Kafka alerts topic, Alertmanager v2 API (:mod:`pipelines.sink_alertmanager`), structured log lines,
and a fan-out over several, behind the contract of :mod:`pipelines.sink_base`: every sink buffers with
:meth:`Sink.add` and delivers with :meth:`Sink.flush`, which returns only once the alerts are acknowledged and raises
:class:`SinkError` otherwise, so an alert may be delivered twice (same id) but never lost.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TextIO

from pipelines.alert_message import Alert
from pipelines.kafka_io import KafkaDeliveryError, KafkaDeliveryPending, Producer
from pipelines.sink_alertmanager import ALERTNAME, MAX_ALERTS_PER_POST, MAX_FLUSH_BACKOFF_S, AlertmanagerSink
from pipelines.sink_base import Sink, SinkBackingOff, SinkError, without_firing_of

__all__ = ["ALERTNAME", "MAX_ALERTS_PER_POST", "MAX_FLUSH_BACKOFF_S", "AlertmanagerSink", "FanoutSink",
           "KafkaAlertSink", "LogSink", "Sink", "SinkBackingOff", "SinkError", "build_sinks"]


class KafkaAlertSink(Sink):
    """Alerts as JSON to a Kafka topic: key = stream id, headers ``alert-id`` and ``alert-status``."""

    name = "kafka"
    background_delivery = True

    def __init__(self, producer: Producer, topic: str):
        self.producer, self.topic = producer, topic
        self._unacked: list[Alert] = []
        self._resend = False  # a produce or flush failed: produce all unacked again on the next flush

    def _produce(self, alert: Alert) -> None:
        headers = [("alert-id", alert.id.encode()), ("alert-status", alert.status.encode())]
        value = alert.to_json()  # outside the try: an alert that cannot be serialised is a bug, not a retry
        try:
            self.producer.produce(self.topic, value, key=alert.stream.encode(), headers=headers)
        except Exception:  # a producer that raises instead of reporting on flush
            self._resend = True

    def add(self, alerts: Sequence[Alert]) -> None:
        self._unacked.extend(alerts)
        if not self._resend:
            for alert in alerts:
                self._produce(alert)

    def forget_streams(self, streams: Iterable[str], revoked: Collection[tuple[str, int]] = ()) -> None:
        """Firing alerts not acknowledged yet whose records lie on a ``revoked`` partition are not produced again
        (as :meth:`AlertmanagerSink.forget_streams`): the next owner repeats those records and may resolve the
        incident before a late copy from here would re-open it on the topic. Those in the producer's queue go."""
        self._unacked = without_firing_of(self._unacked, revoked)

    def flush(self, timeout_s: float) -> int:
        if not self._unacked:
            return 0
        if self._resend:
            self._resend = False
            for alert in self._unacked:
                self._produce(alert)
        try:
            if self._resend:
                raise KafkaDeliveryError("producer refused the messages")
            self.producer.flush(timeout_s)
        except KafkaDeliveryPending as exc:  # still in flight, not failed: the next flush waits for them, no copy
            raise SinkError(f"kafka topic {self.topic}: {len(self._unacked)} alerts not acknowledged yet: {exc}") \
                from exc
        except KafkaDeliveryError as exc:
            self._resend = True
            raise SinkError(f"kafka topic {self.topic}: {len(self._unacked)} alerts not delivered: {exc}") from exc
        delivered = len(self._unacked)
        self._unacked.clear()
        return delivered



class LogSink(Sink):
    """One JSON line per alert (``{"event": "alert", ...alert fields}``) to a text stream or a logger."""

    name = "log"

    def __init__(self, stream: TextIO | logging.Logger | None = None, level: int = logging.WARNING):
        self.stream, self.level = stream, level  # None = sys.stderr at write time

    def add(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            line = json.dumps({"event": "alert", **alert.to_dict()}, separators=(",", ":"))
            if isinstance(self.stream, logging.Logger):
                self.stream.log(self.level, line)
            else:
                (self.stream or sys.stderr).write(line + "\n")

    def flush(self, timeout_s: float) -> int:
        if not isinstance(self.stream, logging.Logger):
            (self.stream or sys.stderr).flush()
        return 0  # written by add


class FanoutSink(Sink):
    """Several sinks at once: add to all, flush all; fails if any fails, naming which."""

    name = "fanout"

    def __init__(self, sinks: Sequence[Sink]):
        self.sinks = list(sinks)
        self._add_errors: list[str] = []

    def add(self, alerts: Sequence[Alert]) -> None:
        for sink in self.sinks:
            try:
                sink.add(alerts)
            except Exception as exc:
                self._add_errors.append(f"{sink.name}: add failed: {type(exc).__name__}: {exc}")

    def flush(self, timeout_s: float, observe: Callable[[str, float, bool], None] | None = None) -> int:
        """Flush every sink within ``timeout_s``; ``observe(sink name, seconds, ok)`` is told about each flush that
        delivered alerts or failed (the many with nothing to do would hide the real ones' time in its histogram; a
        refusal in a backoff, at each of the loop's turns, would count turns, not failures, and hide the failed
        requests' time).
        Returns the alerts delivered, summed over the sinks. Those that deliver only in their flush (Alertmanager's
        post) go first: a Kafka producer's flush waits for acknowledgements while its messages travel anyway, and
        when the alerts topic stalled it took the whole deadline, so that a healthy Alertmanager was never posted
        to (and was counted as failing)."""
        deadline = time.monotonic() + timeout_s
        errors, self._add_errors = self._add_errors, []
        total = 0
        for sink in sorted(self.sinks, key=lambda s: s.background_delivery):  # stable: the given order otherwise
            t0 = time.perf_counter()
            delivered, ok, tried = 0, False, True
            try:
                delivered, ok = sink.flush(max(0.0, deadline - time.monotonic())), True
            except SinkError as exc:
                errors.append(f"{sink.name}: {exc}")
                tried = not isinstance(exc, SinkBackingOff)
            except Exception as exc:
                errors.append(f"{sink.name}: {type(exc).__name__}: {exc}")
            total += delivered or 0
            if observe is not None and tried and (delivered or not ok):
                observe(sink.name, time.perf_counter() - t0, ok)
        if errors:
            raise SinkError("alert sinks failed: " + "; ".join(errors))
        return total

    def forget_streams(self, streams: Iterable[str], revoked: Collection[tuple[str, int]] = ()) -> None:
        streams = list(streams)
        for sink in self.sinks:
            sink.forget_streams(streams, revoked)

    def adopt(self, alerts: Sequence[Alert]) -> None:
        for sink in self.sinks:
            sink.adopt(alerts)

    def flush_due(self, now: float) -> bool:
        return any(sink.flush_due(now) for sink in self.sinks)

    def retry_now(self) -> None:
        for sink in self.sinks:
            sink.retry_now()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


_DEFAULTS: dict[str, dict[str, Any]] = {
    "kafka": {"enabled": True, "topic": "anomalyd-alerts"},
    "alertmanager": {"enabled": False, "url": "http://alertmanager:9093"},
    "log": {"enabled": True},
}
_AM_OPTIONS = ("url", "timeout_s", "max_retries", "labels", "backoff_s", "generator_url", "severity",
               "resend_interval_s")  # fmt: skip


def build_sinks(config: Mapping[str, Any], producer: Producer | None = None) -> FanoutSink:
    """The enabled sinks of the ``sinks`` config section (or of a whole config that contains one)."""
    section = config.get("sinks", config) if isinstance(config.get("sinks"), Mapping) else config
    unknown = sorted(set(section) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sinks {unknown}; known: {sorted(_DEFAULTS)}")
    opts = {name: {**default, **(section.get(name) or {})} for name, default in _DEFAULTS.items()}
    allowed = {"kafka": ("enabled", "topic"), "alertmanager": ("enabled", *_AM_OPTIONS), "log": ("enabled",)}
    for name, keys in allowed.items():
        extra = sorted(set(opts[name]) - set(keys))
        if extra:
            raise ValueError(f"unknown keys {extra} in sinks.{name}; known: {sorted(keys)}")
    sinks: list[Sink] = []
    if opts["kafka"]["enabled"]:
        if producer is None:
            raise ValueError("sinks.kafka is enabled but no Kafka producer was given")
        sinks.append(KafkaAlertSink(producer, str(opts["kafka"]["topic"])))
    if opts["alertmanager"]["enabled"]:
        am = {k: v for k, v in opts["alertmanager"].items() if k != "enabled" and v is not None}
        sinks.append(AlertmanagerSink(**am))
    if opts["log"]["enabled"]:
        sinks.append(LogSink(logging.getLogger("anomalyd.alerts")))
    return FanoutSink(sinks)
