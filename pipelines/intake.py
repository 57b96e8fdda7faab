"""Intake: one poll batch -> decode -> the routes' window buffers; bad records -> the dead-letter topic.

The first stage of the daemon loop (``pipelines.daemon``). Records below a partition's committed offset after a
seek-back only rebuild windows (replay: not scored, never dead-lettered again); the rest are live.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import native_decode
from .decode import FeatureSpec, SpecCache, dead_letter_headers, decode_batch
from .kafka_io import Producer
from .metrics import Metrics
from .positions import Positions
from .routes import RouteState
from .routing import Router
from .source import RecordBatch

__all__ = ["Intake"]


class Intake:
    """``Intake(router, positions, metrics, dead_letter_topic, max_message_bytes)``; ``set_routes`` after every
    model (re)load, then ``add(batch, producer)`` per poll batch."""

    def __init__(self, router: Router, positions: Positions, metrics: Metrics, dead_letter_topic: str,
                 max_message_bytes: int) -> None:
        native_decode.load()  # built or found now, not in the first poll; ANOMALYD_NATIVE_DECODE=on: raises here
        self.router, self.positions, self.metrics = router, positions, metrics
        self.dead_letter_topic, self.max_message_bytes = dead_letter_topic, max_message_bytes
        self.routes: Sequence[RouteState] = []
        self._specs: list[FeatureSpec] = []
        self._only_route: dict[FeatureSpec, int] = {}
        self._spec_of = SpecCache(self._feature_spec)

    def set_routes(self, routes: Sequence[RouteState]) -> None:
        self.routes = routes
        self._specs = [FeatureSpec(tuple(r.feature_names)) for r in routes]
        owners: dict[FeatureSpec, list[int]] = {}
        for i, spec in enumerate(self._specs):
            owners.setdefault(spec, []).append(i)
        self._only_route = {spec: idx[0] for spec, idx in owners.items() if len(idx) == 1}
        self._spec_of = SpecCache(self._feature_spec)  # the routes' features may have changed

    def add(self, batch: RecordBatch, producer: Producer) -> None:
        """Decode ``batch``, route its events into window buffers (queueing due windows), dead-letter the bad,
        and mark its records processed (committable once their windows are scored and alerts delivered)."""
        tp_idx = self.positions.batch_ids(batch)
        replay = self.positions.replay_mask(tp_idx, batch.offset)
        decoded = decode_batch(batch.value, batch.key, batch.timestamp, self._spec_of, self.max_message_bytes)
        self.metrics.decoded.labels(decoder="native").inc(decoded.n_native)
        self.metrics.decoded.labels(decoder="python").inc(len(batch) - decoded.n_native)
        topic0 = batch.topic
        for pos, reason, detail in decoded.rejected:
            if replay[pos]:
                continue
            producer.produce(self.dead_letter_topic, batch.value[pos], batch.key[pos],
                             dead_letter_headers(reason, detail, topic0[pos], int(batch.partition[pos]),
                                                 int(batch.offset[pos])))
            self.metrics.dead_letter(topic0[pos], reason)  # also counts events_total{outcome="dead_lettered"}
        for pos, _stream in decoded.unrouted:
            self.metrics.event(topic0[pos], "unrouted")
        for spec, group in decoded.groups.items():
            only = self._only_route.get(spec)  # the one route with these features: every stream of the group
            if only is not None:
                self._add_to_route(self.routes[only], group, np.arange(len(group.stream)), batch, tp_idx, replay)
                continue
            route_of = np.fromiter((self.router.route_of(s) for s in group.stream), np.int64, len(group.stream))
            for r in np.unique(route_of).tolist():
                sel = np.flatnonzero(route_of == r)
                self._add_to_route(self.routes[r], group, sel, batch, tp_idx, replay)
        self.positions.advance(tp_idx, batch.offset)

    def _feature_spec(self, stream: str) -> FeatureSpec | None:
        r = self.router.route_of(stream)
        return None if r < 0 else self._specs[r]

    def _add_to_route(self, route: RouteState, group, sel: np.ndarray, batch: RecordBatch, tp_idx: np.ndarray,
                      replay: np.ndarray) -> None:
        """Replayed records (window rebuild) go in first, unscored; a stream's records are all on one partition,
        where replayed offsets precede live ones, so each stream keeps its order."""
        pos = group.ok_index[sel]  # positions in the poll batch
        rep = replay[pos]
        for part, live in ((sel[rep], False), (sel[~rep], True)):
            if not len(part):
                continue
            p = group.ok_index[part]  # ascending positions: the whole group / poll exactly when as many
            ids = route.stream_ids(group.stream if len(part) == len(group.stream)
                                   else list(map(group.stream.__getitem__, part.tolist())))
            topics = batch.topic if len(p) == len(batch.topic) else list(map(batch.topic.__getitem__, p.tolist()))
            warm0 = route.buffer.n_warming
            late, _ = route.add(ids, group.ts[part], group.values[part], tp_idx[p], batch.offset[p], topics,
                                batch.partition[p], np.full(len(p), live))
            warming = route.buffer.n_warming - warm0
            topic = topics[0]
            if late:
                self.metrics.event(topic, "late", late)
            if not live:
                self.metrics.event(topic, "warming", len(p) - late)
                continue
            if warming:
                self.metrics.event(topic, "warming", warming)
            if len(p) - late - warming > 0:
                self.metrics.event(topic, "scored", len(p) - late - warming)
