"""The daemon's two custom Prometheus collectors: a histogram fed whole numpy arrays per call, and the bounded
top-K streams gauge. Registered on the registry they are given (never the global one)."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["BulkHistogram", "TopStreams"]


class BulkHistogram(Collector):
    """A histogram that buckets whole arrays of observations per call (numpy), for per-window values.

    Exposes the usual ``<name>_bucket``/``_count``/``_sum`` samples. Non-finite values are ignored.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)  # (K,) upper bounds; +Inf is implicit
        self._counts: dict[tuple[str, ...], np.ndarray] = {}  # labels -> (K+1,) per-bucket counts
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray | Sequence[float], *labelvalues: str) -> None:
        """Add every finite value of ``values`` (any shape) to the series with these label values."""
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labelvalues!r}")
        v = np.asarray(values, dtype=np.float64).ravel()  # (N,)
        v = v[np.isfinite(v)]
        bucket = np.searchsorted(self._bounds, v, side="left")  # (N,) index of each value's bucket
        per_bucket = np.bincount(bucket, minlength=len(self._bounds) + 1)  # (K+1,)
        key = tuple(str(x) for x in labelvalues)
        with self._lock:
            if key not in self._counts:
                self._counts[key] = np.zeros(len(self._bounds) + 1, dtype=np.int64)
                self._sums[key] = 0.0
            self._counts[key] += per_bucket
            self._sums[key] += float(v.sum())

    def observe(self, value: float, *labelvalues: str) -> None:
        """Add one value."""
        self.observe_many([value], *labelvalues)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(k, np.cumsum(c), self._sums[k]) for k, c in self._counts.items()]
        bounds = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # as prometheus_client writes le
        for key, cumulative, total in series:
            family.add_metric(list(key), list(zip(bounds, cumulative.tolist(), strict=True)), total)
        return [family]


class TopStreams(Collector):
    """Bounded tracker of the K streams with the highest latest normalised score, exposed as
    ``anomalyd_top_stream_score{rank, stream}``.

    It holds at most K streams. Per batch, each stream's latest score in it replaces the one tracked for it, and
    the K highest of the tracked and the batch's streams are kept. A stream that falls out re-enters on its next
    high score, so the gauge approximates the top K of current scores with O(K) memory, without a Python step per
    window on the scoring thread (``python -m benchmarks.intake --score-overhead --top-k 10``).
    """

    def __init__(self, k: int, registry: CollectorRegistry) -> None:
        if k <= 0:
            raise ValueError(f"top-K streams needs k > 0, got {k}")
        self.k = k
        self._scores: dict[str, float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, streams: Sequence[str], scores: np.ndarray | Sequence[float]) -> None:
        """Record the latest score of each stream; ``scores`` is (N,) aligned with ``streams``."""
        s = np.asarray(scores, dtype=np.float64).ravel()  # (N,)
        if len(streams) != len(s):
            raise ValueError(f"{len(streams)} streams but {len(s)} scores")
        known = ~np.isnan(s)
        if not known.all():
            keep = np.flatnonzero(known)
            streams, s = [streams[i] for i in keep.tolist()], s[keep]
        latest = dict(zip(streams, s.tolist(), strict=True))  # a stream's last score in the batch wins
        with self._lock:
            pool = self._scores | latest
            if len(pool) > self.k:
                pool = dict(heapq.nlargest(self.k, pool.items(), key=lambda kv: kv[1]))
            self._scores = pool

    def forget(self, stream: str) -> None:
        """Drop a stream (e.g. its partition was revoked)."""
        with self._lock:
            self._scores.pop(stream, None)

    def top(self) -> list[tuple[str, float]]:
        """(stream, score) pairs, highest score first."""
        with self._lock:
            return heapq.nlargest(self.k, self._scores.items(), key=lambda kv: kv[1])

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "anomalyd_top_stream_score",
            "Latest normalised anomaly score of the K most anomalous streams (rank 1 = highest).",
            labels=["rank", "stream"],
        )
        for rank, (stream, score) in enumerate(self.top(), start=1):
            family.add_metric([str(rank), stream], score)
        return [family]
