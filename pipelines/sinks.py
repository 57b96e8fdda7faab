"""Alert sinks: Kafka alerts topic, Alertmanager v2 API, structured log lines, and a fan-out over several.

Every sink buffers with :meth:`Sink.add` and delivers with :meth:`Sink.flush`, which returns only once
the alerts are acknowledged (producer flush, HTTP 2xx) and raises :class:`SinkError` otherwise.  The
daemon commits a batch's offsets only after ``flush`` returned, so an alert may be delivered twice
(same id) but never lost; alerts that failed stay buffered and are retried by the next ``flush``.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import sys
import time
import urllib.error
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pipelines.alert_message import FIRING, RESOLVED, Alert
from pipelines.alertmanager_http import AlertmanagerHTTP, RedirectRefused
from pipelines.kafka_io import KafkaDeliveryError, KafkaDeliveryPending, Producer

ALERTNAME = "AnomalyDetected"
MAX_FLUSH_BACKOFF_S = 30.0  # the longest wait between flushes that failed (a 401 was re-posted every 20 ms)
MAX_ALERTS_PER_POST = 500  # a request of about 0.3 MB; a backlog goes in several
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABELS = ("alertname", "stream", "model")


class SinkError(RuntimeError):
    """Alerts could not be delivered (after retries); the caller must not commit their offsets."""


class SinkBackingOff(SinkError):
    """A flush refused without a request: a backoff after a failed one has not passed (not a failure of its own)."""


class Sink(ABC):
    """Somewhere alerts go; ``name`` identifies it in errors."""

    name = "sink"
    background_delivery = False  # its messages travel in the background (a producer's queue), not only in flush

    @abstractmethod
    def add(self, alerts: Sequence[Alert]) -> None:
        """Queue alerts for delivery (never raises for delivery problems; flush reports them)."""

    @abstractmethod
    def flush(self, timeout_s: float) -> int:
        """Deliver everything queued within ``timeout_s`` seconds or raise :class:`SinkError`; returns how many
        alerts it delivered (0: it had nothing to do)."""

    def forget_streams(self, streams: Iterable[str],  # noqa: B027 - optional hook
                       revoked: Collection[tuple[str, int]] = ()) -> None:
        """The daemon no longer tracks these streams: idle (their incidents resolved), or gone with the ``revoked``
        partitions (topic, partition) to another owner; drop any per-stream sink state."""

    def adopt(self, alerts: Sequence[Alert]) -> None:  # noqa: B027 - optional hook
        """These ``firing`` alerts were delivered by the previous owner of their partitions, and their incidents
        continue here: a sink that re-sends active alerts takes them on (nothing is sent again otherwise)."""

    def flush_due(self, now: float) -> bool:
        """Whether a :meth:`flush` has work of the sink's own at monotonic time ``now`` (a re-post), even with
        nothing new added: the daemon flushes a quiet topic's sinks for it."""
        return False

    def retry_now(self) -> None:  # noqa: B027 - optional hook
        """The next flush tries at once, whatever backoff a failure started (the shutdown's last flush)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (does not flush)."""


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
        self._unacked = _without_firing_of(self._unacked, revoked)

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


def _without_firing_of(alerts: list[Alert], revoked: Collection[tuple[str, int]]) -> list[Alert]:
    """``alerts`` less the firing ones whose records lie on a ``revoked`` (topic, partition)."""
    if not revoked:
        return alerts
    gone = set(revoked)
    return [a for a in alerts if a.status != FIRING or (a.source.get("topic"), a.source.get("partition")) not in gone]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339_MS = (-62_135_596_800_000, 253_402_300_799_999)  # years 1 to 9999, what a datetime holds


def _rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339, clamped to years 1-9999: an event time beyond them must not make an alert
    impossible to post (it stayed queued and failed every later flush, so no alert went out and nothing was
    committed)."""
    ms = min(max(int(ms), _RFC3339_MS[0]), _RFC3339_MS[1])
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AlertmanagerSink(Sink):
    """Alerts to Alertmanager's v2 API (``POST /api/v2/alerts``), firing and resolved.

    Labels: ``alertname=AnomalyDetected``, ``stream``, ``model`` (the route's model label), ``severity``
    and the extra ``labels``; they are the same for firing and resolved, so both hit one fingerprint.
    A firing alert carries ``endsAt = now + 4 * resend_interval_s`` and is re-posted by ``flush``
    every ``resend_interval_s`` until it resolves, so Alertmanager neither times out long incidents
    nor keeps alerts of a daemon that stopped.  5xx, 408, 429 and connection errors are retried with
    exponential backoff (``backoff_s * 2**i``, at most ``max_retries`` times, within flush's deadline);
    other 4xx and redirects raise :class:`SinkError` at once with the response body.  After a failed flush,
    the next ones fail at once, without a request, until a backoff has passed (``backoff_s`` doubled per
    failed flush, at most MAX_FLUSH_BACKOFF_S): Alertmanager is not hammered while the loop keeps flushing.
    ``user:password@`` in ``url`` is sent as HTTP Basic auth and masked in messages.
    """

    name = "alertmanager"

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        max_retries: int = 5,
        labels: Mapping[str, str] | None = None,
        backoff_s: float = 0.2,
        generator_url: str | None = None,
        severity: str = "warning",
        resend_interval_s: float = 60.0,
    ):
        self.http = AlertmanagerHTTP(url)
        self.endpoint = self.http.shown + "/api/v2/alerts"  # for messages: the password masked
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.generator_url, self.resend_interval_s = generator_url, float(resend_interval_s)
        labels = {str(k): str(v) for k, v in (labels or {}).items()}
        bad = [k for k in labels if not _LABEL_NAME.match(k) or k in _RESERVED_LABELS]
        if bad:
            raise ValueError(f"sinks.alertmanager.labels: invalid or reserved label names {bad}")
        self.labels = {"severity": severity, **labels}
        self._pending: list[Alert] = []
        self._active: dict[str, tuple[Alert, float]] = {}  # firing id -> (alert, monotonic time last posted)
        self._firing: dict[tuple[str, str], set[str]] = {}  # (stream, model) -> ids in _active: one label set
        self._post_once: set[str] = set()  # firing ids of streams forgotten before their post: not re-posted
        self._last_flush = time.monotonic()  # of the last flush that posted, or found nothing to post
        self._failed_flushes = 0  # in a row
        self._retry_at = 0.0  # monotonic time before which a flush fails without a request
        self._last_error = ""

    def labels_of(self, alert: Alert) -> dict[str, str]:
        """The Alertmanager label set of an alert (identical for its firing and resolved states)."""
        return {**self.labels, "alertname": ALERTNAME, "stream": alert.stream, "model": alert.model}

    def postable(self, alert: Alert, now_ms: int) -> dict[str, Any]:
        """The ``postableAlert`` JSON object for ``alert`` posted at wall-clock ``now_ms``."""
        src = alert.source
        top = ", ".join(f"{f}={s:.2f}" for f, s in alert.top_features)
        annotations = {
            "summary": f"Anomaly on stream {alert.stream} ({alert.model})",
            "description": (
                f"Peak score {alert.peak_score:.3g}x threshold (threshold {alert.threshold:.6g}); "
                f"models over threshold: {', '.join(alert.models_over) or '-'}; source "
                f"{src.get('topic')}/{src.get('partition')} offsets {src.get('first_offset')}"
                f"-{src.get('last_offset')}"
            ),
            "top_features": top,
            "score": f"{alert.peak_score:.4g}",
            "alert_id": alert.id,
            "model_version": alert.model_version,
        }
        # Event time ahead of this host's clock (a producer's clock, or local time sent as UTC) starts no later than
        # now: a resolve must end at or before now, or Alertmanager keeps the firing alert's later endsAt.
        starts = min(alert.started_at, now_ms - 1)
        if alert.status == RESOLVED:  # Alertmanager requires endsAt > startsAt; clamp to now
            ends = max(min(alert.ended_at if alert.ended_at is not None else now_ms, now_ms), starts + 1)
        else:
            ends = now_ms + int(4000 * self.resend_interval_s)
        out = {
            "labels": self.labels_of(alert),
            "annotations": annotations,
            "startsAt": _rfc3339(starts),
            "endsAt": _rfc3339(ends),
        }
        if self.generator_url:
            out["generatorURL"] = self.generator_url
        return out

    def add(self, alerts: Sequence[Alert]) -> None:
        self._pending.extend(alerts)

    def forget_streams(self, streams: Iterable[str], revoked: Collection[tuple[str, int]] = ()) -> None:
        """Stop re-posting their firing alerts. Firing alerts not posted yet (Alertmanager down at a revoke) whose
        records lie on a ``revoked`` partition are dropped too: those records were not committed (a commit waits
        for delivery), so the partition's next owner repeats them, and a late post from here would re-open what it
        resolves. ``resolved`` alerts still go (the next owner may not know the incident), as does everything of
        a partition kept (a stream whose key moved) and of a stream forgotten as idle."""
        gone = set(streams)
        self._active = {i: v for i, v in self._active.items() if v[0].stream not in gone}
        self._firing = {k: ids for k, ids in self._firing.items() if k[0] not in gone}
        self._pending = _without_firing_of(self._pending, revoked)
        # those still to post are posted once, not kept active: nothing here resolves them any more
        self._post_once.update(a.id for a in self._pending if a.status == FIRING and a.stream in gone)

    def adopt(self, alerts: Sequence[Alert]) -> None:
        """Re-post them at the next flush (the previous owner's last post ends within 4 re-post intervals), then
        every ``resend_interval_s`` until they resolve."""
        self._post_once.difference_update(a.id for a in alerts)  # ours again
        self._delivered(alerts, -math.inf)
        if alerts:
            self._last_flush = -math.inf

    def flush_due(self, now: float) -> bool:
        """Firing alerts are due for their re-post (else Alertmanager resolves them at endsAt while the incident
        is open: a quiet topic brought no flush), or alerts wait for a retry whose backoff has passed."""
        if now < self._retry_at:
            return False
        return bool(self._pending) or (bool(self._active) and now - self._last_flush >= self.resend_interval_s)

    def retry_now(self) -> None:
        self._retry_at = 0.0

    def _shadowed(self, batch: list[Alert]) -> set[str]:
        """Ids of ``resolved`` alerts not to post: another incident of the same stream and model is firing at that
        point of the batch (one handed over with each of two partitions), and both have one label set, so the
        resolve would end it. A resolve followed by a new incident of the stream is posted (the new one pages)."""
        firing: dict[tuple[str, str], set[str]] = {}  # the keys the batch touches, as of each alert in turn
        shadowed = set()
        for a in batch:
            key = (a.stream, a.model)
            ids = firing.get(key)
            if ids is None:
                ids = firing[key] = set(self._firing.get(key, ()))
            if a.status == FIRING:
                ids.add(a.id)
            else:
                ids.discard(a.id)
                if ids:
                    shadowed.add(a.id)
        return shadowed

    def flush(self, timeout_s: float) -> int:
        now = time.monotonic()
        queued = {a.id for a in self._pending}
        due = [a for a, sent in self._active.values() if now - sent >= self.resend_interval_s and a.id not in queued]
        batch = self._pending + due  # the pending alerts, then the firing ones due for a re-post
        if not batch:
            self._last_flush = now
            return 0
        if now < self._retry_at:
            raise SinkBackingOff(f"alertmanager {self.endpoint}: {len(batch)} alerts waiting, next attempt in "
                                 f"{self._retry_at - now:.1f} s; last error: {self._last_error}")
        now_ms, shadowed = int(time.time() * 1000), self._shadowed(batch)
        posted = 0
        try:  # in parts: a backlog after an outage is not one request of many megabytes
            for i in range(0, len(batch), MAX_ALERTS_PER_POST):
                part = batch[i : i + MAX_ALERTS_PER_POST]
                payload = [self.postable(a, now_ms) for a in part if a.id not in shadowed]
                if payload:
                    self._post(payload, now + timeout_s)
                self._delivered(part, now)
                posted += len(part)
        except SinkError as exc:
            self._failed_flushes += 1
            wait = min(MAX_FLUSH_BACKOFF_S, self.backoff_s * 2 ** min(self._failed_flushes - 1, 30))
            self._retry_at, self._last_error = time.monotonic() + wait, str(exc)
            raise
        finally:
            del self._pending[: min(posted, len(self._pending))]  # the batch starts with the pending alerts
        self._failed_flushes, self._retry_at, self._last_flush = 0, 0.0, now
        return posted

    def _delivered(self, alerts: Sequence[Alert], now: float) -> None:
        for alert in alerts:
            key = (alert.stream, alert.model)
            if alert.status == FIRING and alert.id in self._post_once:
                self._post_once.discard(alert.id)
            elif alert.status == FIRING:
                self._active[alert.id] = (alert, now)
                self._firing.setdefault(key, set()).add(alert.id)
            elif self._active.pop(alert.id, None) is not None and (ids := self._firing.get(key)) is not None:
                ids.discard(alert.id)
                if not ids:
                    del self._firing[key]

    def _post(self, payload: list[dict[str, Any]], deadline: float) -> None:
        body = json.dumps(payload).encode()
        attempt = 0
        while True:
            timeout = max(0.05, min(self.timeout_s, deadline - time.monotonic()))
            try:
                self.http.open("/api/v2/alerts", timeout, body)
                return
            except RedirectRefused as exc:
                raise SinkError(f"alertmanager {self.endpoint}: {len(payload)} alerts not delivered: {exc}") from exc
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:1000].decode(errors="replace").strip()
                last = f"HTTP {exc.code}: {detail}"
                if 300 <= exc.code < 500 and exc.code not in (408, 429):  # a 3xx urllib did not follow either
                    raise SinkError(f"alertmanager {self.endpoint} rejected {len(payload)} alerts: {last}") from exc
            except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeout
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            attempt += 1
            delay = self.backoff_s * 2 ** (attempt - 1)
            if attempt > self.max_retries or time.monotonic() + delay >= deadline:
                raise SinkError(
                    f"alertmanager {self.endpoint}: {len(payload)} alerts not delivered after "
                    f"{attempt} attempts: {last}"
                )
            time.sleep(delay)


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
