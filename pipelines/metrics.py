"""Prometheus metrics of the anomalyd daemon.

All metrics live on the ``CollectorRegistry`` passed to :class:`Metrics` (never the global one), so tests and
several daemons in one process stay independent. Base units (seconds, bytes), ``_total`` counters, and
bounded label values only (topics, partitions, models, devices, sinks, fixed vocabularies); no per-stream
labels except on the opt-in, K-bounded ``anomalyd_top_stream_score``. Outcomes: scored, warming
(buffered, window not yet full), dead_lettered, late, unrouted.

| Metric | Type | Labels | Meaning |
|---|---|---|---|
| `anomalyd_events_total` | counter | topic, outcome | events consumed, by outcome (`OUTCOMES`) |
| `anomalyd_dead_letters_total` | counter | topic, reason | events sent to the dead-letter topic, by reason |
| `anomalyd_missing_values_total` | counter | topic | feature values missing (null, absent), carried forward |
| `anomalyd_decoded_messages_total` | counter | decoder | messages decoded natively (the fast shapes) or in Python |
| `anomalyd_windows_scored_total` | counter | model | windows scored by a model |
| `anomalyd_inference_batch_size` | histogram | model, device | windows per micro-batch (buckets 2^0..2^16) |
| `anomalyd_inference_seconds` | histogram | model, device | forward-pass latency of one micro-batch |
| `anomalyd_event_to_score_seconds` | histogram | - | event timestamp to its window's score |
| `anomalyd_event_to_alert_seconds` | histogram | - | event timestamp to the alert it triggered |
| `anomalyd_alerts_total` | counter | model, status | alerts emitted, by route (`model`: its model, `a+b` for several) |
| `anomalyd_open_incidents` | gauge | - | incidents currently open |
| `anomalyd_anomaly_score` | histogram | model | normalised scores (1.0 = threshold): per model; a route's `a+b` |
| `anomalyd_threshold` | gauge | model | current alert threshold on the normalised score scale |
| `anomalyd_consumer_lag` | gauge | topic, partition | end offset minus position of each assigned partition |
| `anomalyd_assigned_partitions` | gauge | - | partitions currently assigned to this consumer |
| `anomalyd_rebalances_total` | counter | - | consumer-group rebalances (assignments) seen |
| `anomalyd_model_reload_failures_total` | counter | - | new model versions that failed to load (old ones kept) |
| `anomalyd_model_versions_refused` | gauge | - | served models not on their newest version (not loaded, or refused) |
| `anomalyd_inference_threads` | gauge | - | intra-op threads of CPU inference (adaptive unless fixed) |
| `anomalyd_sink_flush_seconds` | histogram | sink | latency of one sink flush that had alerts to deliver (or failed) |
| `anomalyd_sink_failures_total` | counter | sink | failed sink flushes (not a backoff's refusals) |
| `anomalyd_commit_seconds` | histogram | - | latency of one offset commit, from sending it to its answer |
| `anomalyd_commit_failures_total` | counter | - | failed offset commits |
| `anomalyd_model_info` | gauge | model, version, kind, device | 1 for each served model version |
| `anomalyd_build_info` | gauge | version, python, torch | 1; versions of the daemon, Python and PyTorch |
| `anomalyd_streams_tracked` | gauge | - | streams with a window buffer |
| `anomalyd_streams_max` | gauge | - | streams tracked at most (`processing.max_streams`; 0: no limit) |
| `anomalyd_window_buffer_bytes` | gauge | - | memory held by the window buffers |
| `anomalyd_gpu_memory_bytes` | gauge | device | CUDA memory allocated by tensors (read at scrape time) |
| `anomalyd_top_stream_score` | gauge | rank, stream | latest score of the K top streams (K > 0) |
| `anomalyd_up` | gauge | - | 1 while the daemon runs |
| `anomalyd_ready` | gauge | - | 1 while the daemon is ready (models loaded, consumer group joined) |
| `anomalyd_kafka_reachable` | gauge | - | 0 once the brokers have not answered two probes in a row (not ready then) |
| `process_*`, `python_*` | - | - | standard process, platform and GC metrics of prometheus-client |
Per-window values (scores, event-to-score latencies) are :class:`BulkHistogram` s: one numpy call per batch.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from .collectors import BulkHistogram, TopStreams

if TYPE_CHECKING:
    from .routes import ScoredBatch

OUTCOMES = ("scored", "warming", "dead_lettered", "late", "unrouted", "replayed")  # replayed: a window rebuild
"""Values of the ``outcome`` label of ``anomalyd_events_total``."""
ALERT_STATUSES = ("firing", "resolved")
"""Values of the ``status`` label of ``anomalyd_alerts_total``."""
MAX_DEAD_LETTER_REASONS = 32
"""Distinct dead-letter reasons kept as label values; further ones are counted as ``other``."""

BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(17))  # 1 .. 65536
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
IO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """Every metric of the daemon, registered on ``registry``; see the module docstring for the list.

    The metric objects are public attributes (``metrics.events.labels(topic=..., outcome=...).inc()``);
    the helper methods cover the multi-metric updates and keep label sets bounded and current.
    """

    def __init__(self, registry: CollectorRegistry, top_k_streams: int = 0, *, process_metrics: bool = True,
                 version: str | None = None) -> None:
        r = self.registry = registry
        self.events = Counter("anomalyd_events_total", "Events consumed, by topic and outcome.",
                              ["topic", "outcome"], registry=r)
        self.dead_letters = Counter("anomalyd_dead_letters_total", "Events dead-lettered, by reason.",
                                    ["topic", "reason"], registry=r)
        self.missing_values = Counter("anomalyd_missing_values_total", "Feature values missing (null or absent) in "
                                      "events taken into windows; the stream's last value is carried forward.",
                                      ["topic"], registry=r)
        self.decoded = Counter("anomalyd_decoded_messages_total", "Messages decoded, by decoder (native or python).",
                               ["decoder"], registry=r)
        for decoder in ("native", "python"):
            self.decoded.labels(decoder=decoder)  # both series from the start
        self.windows_scored = Counter("anomalyd_windows_scored_total", "Windows scored.", ["model"], registry=r)
        self.inference_batch_size = Histogram(
            "anomalyd_inference_batch_size", "Windows per inference micro-batch.", ["model", "device"],
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "anomalyd_inference_seconds", "Inference latency of one micro-batch.", ["model", "device"],
            buckets=INFERENCE_BUCKETS, registry=r)
        self.event_to_score_seconds = BulkHistogram(
            "anomalyd_event_to_score_seconds", "Latency from an event's timestamp to its window's score.",
            [], LATENCY_BUCKETS, r)
        self.event_to_alert_seconds = Histogram(
            "anomalyd_event_to_alert_seconds", "Latency from an event's timestamp to the alert it triggered.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.alerts = Counter("anomalyd_alerts_total", "Alerts emitted, by model and status.",
                              ["model", "status"], registry=r)
        self.open_incidents = Gauge("anomalyd_open_incidents", "Incidents currently open.", registry=r)
        self.anomaly_score = BulkHistogram(
            "anomalyd_anomaly_score", "Normalised anomaly scores (1.0 = calibrated threshold).", ["model"],
            SCORE_BUCKETS, r)
        self.threshold = Gauge("anomalyd_threshold", "Alert threshold (normalised scale).", ["model"], registry=r)
        self.consumer_lag = Gauge("anomalyd_consumer_lag", "End offset minus position, per partition.",
                                  ["topic", "partition"], registry=r)
        self.assigned_partitions = Gauge("anomalyd_assigned_partitions", "Partitions currently assigned.", registry=r)
        self.rebalances = Counter("anomalyd_rebalances_total", "Consumer-group rebalances seen.", registry=r)
        self.model_reload_failures = Counter("anomalyd_model_reload_failures_total",
                                             "Model versions that could not be loaded; the old ones are kept.",
                                             registry=r)
        self.model_versions_refused = Gauge("anomalyd_model_versions_refused",
                                            "Served models not on their newest version, which does not load.",
                                            registry=r)
        self.sink_flush_seconds = Histogram("anomalyd_sink_flush_seconds",
                                            "Latency of one sink flush with alerts to deliver.", ["sink"],
                                            buckets=IO_BUCKETS, registry=r)
        self.sink_failures = Counter("anomalyd_sink_failures_total", "Failed sink flushes.", ["sink"], registry=r)
        self.commit_seconds = Histogram("anomalyd_commit_seconds",
                                        "Latency of one offset commit, from sending it to its answer.",
                                        buckets=IO_BUCKETS, registry=r)
        self.commit_failures = Counter("anomalyd_commit_failures_total", "Failed offset commits.", registry=r)
        self.model_info = Gauge("anomalyd_model_info", "1 for each served model version.",
                                ["model", "version", "kind", "device"], registry=r)
        self.build_info = Gauge("anomalyd_build_info", "Versions of anomalyd, Python and PyTorch.",
                                ["version", "python", "torch"], registry=r)
        self.streams_tracked = Gauge("anomalyd_streams_tracked", "Streams with a window buffer.", registry=r)
        self.streams_max = Gauge("anomalyd_streams_max",
                                 "Streams tracked at most (processing.max_streams; 0: no limit).", registry=r)
        self.window_buffer_bytes = Gauge("anomalyd_window_buffer_bytes", "Memory held by the window buffers.",
                                         registry=r)
        self.inference_threads = Gauge("anomalyd_inference_threads", "Intra-op threads of CPU inference.",
                                       registry=r)
        self.gpu_memory_bytes = Gauge("anomalyd_gpu_memory_bytes", "CUDA memory allocated by tensors.",
                                      ["device"], registry=r)
        self.up = Gauge("anomalyd_up", "1 while the daemon runs.", registry=r)
        self.ready = Gauge("anomalyd_ready", "1 while the daemon is ready to score.", registry=r)
        self.kafka_reachable = Gauge("anomalyd_kafka_reachable", "0 while the leader of an assigned partition does "
                                     "not answer (asked while the topic is quiet).", registry=r)
        self.top_streams = TopStreams(top_k_streams, r) if top_k_streams > 0 else None
        self._reasons: set[str] = set()
        self._lag_series: set[tuple[str, str]] = set()  # (topic, partition) label values of consumer_lag
        self._model_series: dict[str, tuple[str, str, str, str]] = {}  # model -> model_info label values
        self._lock = threading.Lock()
        self.build_info.labels(version=version or _dist_version("anomalyd"), python=platform.python_version(),
                               torch=_dist_version("torch")).set(1)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # -- consumption -------------------------------------------------------------------------------------
    def init_topics(self, topics: Iterable[str], dead_letter_reasons: Iterable[str] = ()) -> None:
        """Create every ``events`` series of these topics at 0, so rates exist before the first event, and their
        ``dead_letters`` series of these reasons (an alert on ``increase()`` misses a series' first count)."""
        reasons = list(dead_letter_reasons)
        with self._lock:
            self._reasons.update(reasons)
        for topic in topics:
            self.missing_values.labels(topic=topic)
            for outcome in OUTCOMES:
                self.events.labels(topic=topic, outcome=outcome)
            for reason in reasons:
                self.dead_letters.labels(topic=topic, reason=reason)

    def event(self, topic: str, outcome: str, n: int = 1) -> None:
        """Count ``n`` events of ``topic`` with ``outcome`` (one of :data:`OUTCOMES`; use :meth:`dead_letter`
        for dead-lettered events)."""
        if outcome == "dead_lettered":
            raise ValueError("count dead-lettered events with Metrics.dead_letter(topic, reason), which also "
                             "increments anomalyd_events_total{outcome='dead_lettered'}")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown event outcome {outcome!r}; expected one of {OUTCOMES}")
        self.events.labels(topic=topic, outcome=outcome).inc(n)

    def dead_letter(self, topic: str, reason: str, n: int = 1) -> None:
        """Count ``n`` dead-lettered events: ``events{outcome="dead_lettered"}`` and ``dead_letters{reason}``.
        Beyond :data:`MAX_DEAD_LETTER_REASONS` distinct reasons, new ones are counted as ``other``."""
        with self._lock:
            if reason not in self._reasons:
                if len(self._reasons) >= MAX_DEAD_LETTER_REASONS:
                    reason = "other"
                self._reasons.add(reason)
        self.events.labels(topic=topic, outcome="dead_lettered").inc(n)
        self.dead_letters.labels(topic=topic, reason=reason).inc(n)

    def set_consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace the lags with ``{(topic, partition): lag}`` of the current assignment (revoked partitions
        disappear). ``assigned_partitions`` is the daemon's to set: a partition not fetched from yet has no lag."""
        current = {(t, str(p)): lag for (t, p), lag in lags.items()}
        with self._lock:
            for labels in self._lag_series - current.keys():
                self.consumer_lag.remove(*labels)
            for (topic, partition), lag in current.items():
                self.consumer_lag.labels(topic=topic, partition=partition).set(max(0, lag))
            self._lag_series = set(current)

    def observe_commit(self, seconds: float, ok: bool = True) -> None:
        """Record one offset commit."""
        self.commit_seconds.observe(seconds)
        if not ok:
            self.commit_failures.inc()

    @contextmanager
    def time_commit(self) -> Iterator[None]:
        """Time the enclosed commit; an exception counts as a failure and propagates."""
        with _timed(self.observe_commit):
            yield

    # -- models and scoring ------------------------------------------------------------------------------
    def set_model_info(self, model: str, version: str, kind: str, device: str) -> None:
        """Mark ``model`` as served at ``version`` (replacing any previous version's series) and create its
        per-model counters at 0."""
        self.remove_model_info(model)
        with self._lock:
            self._model_series[model] = (model, version, kind, device)
        self.model_info.labels(model=model, version=version, kind=kind, device=device).set(1)
        self.windows_scored.labels(model=model)

    def init_route(self, label: str) -> None:
        """Create a route's alert counters at 0 (``label``: its model, or ``a+b`` for a route of several)."""
        for status in ALERT_STATUSES:
            self.alerts.labels(model=label, status=status)

    def remove_model_info(self, model: str) -> None:
        """Drop the ``model_info`` series of a model that is no longer served."""
        with self._lock:
            labels = self._model_series.pop(model, None)
        if labels is not None:
            self.model_info.remove(*labels)

    def observe_batch(self, model: str, device: str, size: int, seconds: float) -> None:
        """Record one inference micro-batch of ``size`` windows that took ``seconds``."""
        self.inference_batch_size.labels(model=model, device=device).observe(size)
        self.inference_seconds.labels(model=model, device=device).observe(seconds)
        self.windows_scored.labels(model=model).inc(size)

    def observe_scores(self, model: str, scores: np.ndarray | Sequence[float],
                       event_to_score_seconds: np.ndarray | Sequence[float] | None = None,
                       streams: Sequence[str] | None = None) -> None:
        """Record a batch's (N,) normalised scores of ``model``, optionally the (N,) event-to-score latencies
        (negative ones, from clock skew, count as 0) and the (N,) stream names for the top-K gauge."""
        self.anomaly_score.observe_many(scores, model)
        if event_to_score_seconds is not None:
            self.event_to_score_seconds.observe_many(np.maximum(np.asarray(event_to_score_seconds), 0.0))
        if streams is not None and self.top_streams is not None:
            self.top_streams.observe(streams, scores)

    def observe_scored(self, out: ScoredBatch, timings: Mapping[str, float], device: str) -> None:
        """Record one route's scored micro-batch: per model its size and forward ``timings`` (seconds); the
        combined scores under the route's label, with their event-to-score latency and the top-K streams; each
        alert with its latency from its stream's newest event in the batch. A route of several models also
        records each model's own scores; a one-model route's combined scores are that model's, recorded once."""
        now_ms = time.time() * 1000  # scores and alerts exist from now on
        several = len(out.per_model_normalised) > 1
        for name, seconds in timings.items():
            self.observe_batch(name, device, out.n, seconds)
            if several:
                self.observe_scores(name, out.per_model_normalised[name])
        top_k = self.top_streams is not None
        streams = out.streams() if top_k or out.alerts else None  # names only where they are read
        self.observe_scores(out.label, out.combined, (now_ms - out.ts) / 1000.0, streams if top_k else None)
        last_ts = dict(zip(streams, out.ts.tolist(), strict=True)) if out.alerts else {}  # stream -> newest ts
        for a in out.alerts:
            self.alert(out.label, a.status, (now_ms - last_ts.get(a.stream, a.started_at)) / 1000.0)

    def forget_partitions(self, tps: Iterable[tuple[str, int]]) -> None:
        """Revoked partitions: their lag series go now, not at the next lag update."""
        with self._lock:
            for topic, partition in tps:
                key = (topic, str(partition))
                if key in self._lag_series:
                    self.consumer_lag.remove(*key)
                    self._lag_series.discard(key)

    def forget_streams(self, streams: Sequence[str]) -> None:
        """Streams no longer this daemon's (revoked, or silent): out of the top-K gauge."""
        if self.top_streams is not None:
            for stream in streams:
                self.top_streams.forget(stream)

    def set_threshold(self, model: str, threshold: float) -> None:
        self.threshold.labels(model=model).set(threshold)

    def alert(self, model: str, status: str, event_to_alert_seconds: float | None = None) -> None:
        """Count one emitted alert (status in :data:`ALERT_STATUSES`) and its event-to-alert latency."""
        if status not in ALERT_STATUSES:
            raise ValueError(f"unknown alert status {status!r}; expected one of {ALERT_STATUSES}")
        self.alerts.labels(model=model, status=status).inc()
        if event_to_alert_seconds is not None:
            self.event_to_alert_seconds.observe(max(0.0, event_to_alert_seconds))

    # -- sinks, state, resources ---------------------------------------------------------------------------
    def init_sinks(self, sinks: Sequence[str]) -> None:
        """The sinks' flush series exist from the start, at 0 (a first failure is then an increase)."""
        for sink in sinks:
            self.sink_flush_seconds.labels(sink=sink)
            self.sink_failures.labels(sink=sink)

    def observe_sink_flush(self, sink: str, seconds: float, ok: bool = True) -> None:
        """Record one flush of ``sink``."""
        self.sink_flush_seconds.labels(sink=sink).observe(seconds)
        if not ok:
            self.sink_failures.labels(sink=sink).inc()
        else:
            self.sink_failures.labels(sink=sink)  # the series exists at 0

    @contextmanager
    def time_sink_flush(self, sink: str) -> Iterator[None]:
        """Time the enclosed flush of ``sink``; an exception counts as a failure and propagates."""
        with _timed(lambda s, ok: self.observe_sink_flush(sink, s, ok)):
            yield

    def set_buffers(self, streams: int, nbytes: int) -> None:
        """Set the number of tracked streams and the bytes their window buffers hold."""
        self.streams_tracked.set(streams)
        self.window_buffer_bytes.set(nbytes)

    def track_gpu_memory(self, device: str) -> None:
        """Report ``torch.cuda.memory_allocated(device)`` at every scrape for a ``cuda[:i]`` device."""
        import torch  # only when a CUDA device is in use

        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"GPU memory is tracked for CUDA devices only, got {device!r}")
        self.gpu_memory_bytes.labels(device=str(dev)).set_function(lambda: torch.cuda.memory_allocated(dev))

    def set_state(self, up: bool, ready: bool) -> None:
        self.up.set(int(up))
        self.ready.set(int(ready))


@contextmanager
def _timed(record: Callable[[float, bool], None]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        record(time.perf_counter() - start, False)
        raise
    record(time.perf_counter() - start, True)


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"
