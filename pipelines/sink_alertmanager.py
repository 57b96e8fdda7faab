"""Alerts to Alertmanager's v2 API (:class:`AlertmanagerSink`), one of the sinks of :mod:`pipelines.sinks`."""

from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.error
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.alert_message import FIRING, RESOLVED, Alert
from pipelines.alertmanager_http import AlertmanagerHTTP, RedirectRefused
from pipelines.sink_base import Sink, SinkBackingOff, SinkError, without_firing_of

__all__ = ["ALERTNAME", "MAX_ALERTS_PER_POST", "MAX_FLUSH_BACKOFF_S", "AlertmanagerSink"]

ALERTNAME = "AnomalyDetected"
MAX_FLUSH_BACKOFF_S = 30.0  # the longest wait between flushes that failed (a 401 was re-posted every 20 ms)
MAX_ALERTS_PER_POST = 500  # a request of about 0.3 MB; a backlog goes in several
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABELS = ("alertname", "stream", "model")

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
        bad = [k for k in labels if not _LABEL_NAME.match(k) or k in _RESERVED_LABELS or k == "severity"]
        if bad:
            raise ValueError(f"sinks.alertmanager.labels: invalid or reserved label names {bad} (the severity "
                             "label is sinks.alertmanager.severity)")
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
        self._pending = without_firing_of(self._pending, revoked)
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
