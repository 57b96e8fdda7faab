"""Intake: one poll batch -> decode -> the routes' window buffers; bad records -> the dead-letter topic.

The first stage of the daemon loop (``pipelines.daemon``). Records below a partition's committed offset after a
seek-back only rebuild windows (replay: not scored, never dead-lettered again); the rest are live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from . import native_decode
from .dead_letters import dead_letter_copy, dead_letter_headers
from .decode import DecodedBatch, FeatureSpec, SpecCache, decode_batch
from .kafka_io import Producer
from .metrics import Metrics
from .positions import Positions
from .routes import RouteState
from .routing import Router
from .source import UNREADABLE, RecordBatch

__all__ = ["TOO_MANY_STREAMS", "Intake", "reject_far_ahead"]

log = logging.getLogger("anomalyd")

# event times outside these epoch milliseconds (1973-03-03 .. 5138-11-16) are in another unit: seconds (1.7e9),
# microseconds (1.7e15) or nanoseconds (1.7e18)
_MS_LOW, _MS_HIGH = 100_000_000_000, 100_000_000_000_000
UNIT_WARNING_EVERY_S = 600.0
TOO_MANY_STREAMS = "too_many_streams"
"""The dead-letter reason of an event of a new stream while ``processing.max_streams`` streams are tracked."""
LIMIT_WARNING_EVERY_S = 60.0
SPEC_CACHE_MIN = 500_000  # streams whose routing the intake keeps (more with a higher processing.max_streams)


class _RouteFeatures(FeatureSpec):
    """A route's feature names, as a key equal only to itself: :func:`decode_batch` then groups a poll's messages
    per route (two routes with the same features stay apart), and the intake's :class:`SpecCache` is the one
    per-stream cache of the routing decision."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def reject_far_ahead(decoded: DecodedBatch, broker_ts: np.ndarray, max_ahead_ms: int) -> None:
    """Events whose ts is more than ``max_ahead_ms`` (processing.max_event_time_ahead_s) ahead of their record's
    broker timestamp (this host's clock where a record has none) become rejections (reason bad_timestamp), in input
    order with the others. The broker's time, not the clock: a record read again to rebuild windows gets the answer
    it got when first read (counted as replayed then), whenever that is. Training from a topic applies it too."""
    now = int(time.time() * 1000)
    added = False
    for spec, group in list(decoded.groups.items()):
        ref = broker_ts[group.ok_index]  # (N,)
        ref = np.where(ref > 0, ref, now)  # no broker timestamp (-1): the clock
        # without wrapping: ts - ref overflows int64 for a ts near its minimum (dead-lettered as "ahead")
        far = group.ts > np.minimum(ref, np.iinfo(np.int64).max - max_ahead_ms) + max_ahead_ms
        if not far.any():
            continue
        for i in np.flatnonzero(far).tolist():
            ahead_s = (int(group.ts[i]) - int(ref[i])) / 1000
            unit = " (microseconds or nanoseconds? ts is epoch milliseconds)" if group.ts[i] >= _MS_HIGH else ""
            decoded.rejected.append((int(group.ok_index[i]), "bad_timestamp",
                                     f"ts {int(group.ts[i])} is {ahead_s:.0f} s ahead of its record's broker "
                                     f"timestamp, more than processing.max_event_time_ahead_s "
                                     f"({max_ahead_ms / 1000:g})" + unit))
        added = True
        keep = np.flatnonzero(~far)
        if len(keep):
            decoded.groups[spec] = group.take(keep)
        else:
            del decoded.groups[spec]
    if added:
        decoded.rejected.sort(key=lambda r: r[0])


class Intake:
    """``Intake(router, positions, metrics, dead_letter_topic, max_message_bytes)``; ``set_routes`` after every
    model (re)load, then ``add(batch, producer)`` per poll batch."""

    def __init__(self, router: Router, positions: Positions, metrics: Metrics, dead_letter_topic: str,
                 max_message_bytes: int, max_ahead_s: float = 0.0, max_streams: int = 0) -> None:
        native_decode.load()  # built or found now, not in the first poll; ANOMALYD_NATIVE_DECODE=on: raises here
        self.router, self.positions, self.metrics = router, positions, metrics
        self.dead_letter_topic, self.max_message_bytes = dead_letter_topic, max_message_bytes
        # 0: event times ahead of the clock are taken as they come; at most 2**62 ms (146 million years), so that
        # a broker time plus it stays an int64
        self.max_ahead_ms = int(min(max_ahead_s * 1000, 2**62))
        self.max_streams = max_streams  # 0: no limit
        self._refused = (0, set[str]())  # events and a few streams refused since the last warning
        self._limit_warned_at = -LIMIT_WARNING_EVERY_S
        self.routes: Sequence[RouteState] = []
        self._features: list[_RouteFeatures] = []  # per route
        self._route: dict[_RouteFeatures, RouteState] = {}
        self._spec_of = self._spec_cache()
        self._unit_warned_at = -UNIT_WARNING_EVERY_S

    def set_routes(self, routes: Sequence[RouteState]) -> None:
        self.routes = routes
        self._features = [_RouteFeatures(tuple(r.feature_names)) for r in routes]
        self._route = dict(zip(self._features, routes, strict=True))
        self._spec_of = self._spec_cache()  # the routes' features may have changed

    def _spec_cache(self) -> SpecCache:
        """Room for the streams the daemon may hold and a quarter more (ids refused or unrouted are kept too): with
        more streams in use than the cache holds, it started afresh every few polls and nearly every event was
        routed again (its default, 500,000, was half the default processing.max_streams)."""
        return SpecCache(self._features_of, limit=max(SPEC_CACHE_MIN, self.max_streams * 5 // 4))

    def add(self, batch: RecordBatch, producer: Producer) -> None:
        """Decode ``batch``, route its events into window buffers (queueing due windows), dead-letter the bad,
        and mark its records processed (committable once their windows are scored and alerts delivered)."""
        tp_idx = self.positions.batch_ids(batch)
        replay = self.positions.replay_mask(tp_idx, batch.offset)
        decoded = decode_batch(batch.value, batch.key, batch.timestamp, self._spec_of, self.max_message_bytes)
        if batch.unreadable:  # empty values, rejected as such: the client's reason instead
            decoded.rejected = [(pos, UNREADABLE, batch.unreadable[pos]) if pos in batch.unreadable else r
                                for r in decoded.rejected for pos in (r[0],)]
        if self.max_ahead_ms:
            reject_far_ahead(decoded, batch.timestamp, self.max_ahead_ms)
        if self.max_streams:
            self._refuse_new_streams(decoded, replay)
        self.metrics.decoded.labels(decoder="native").inc(decoded.n_native)
        self.metrics.decoded.labels(decoder="python").inc(len(batch) - decoded.n_native)
        topic0 = batch.topic
        for pos, reason, detail in decoded.rejected:
            if replay[pos]:  # dead-lettered when it was first read
                self.metrics.event(topic0[pos], "replayed")
                continue
            headers = dead_letter_headers(reason, detail, topic0[pos], int(batch.partition[pos]),
                                          int(batch.offset[pos]), int(batch.timestamp[pos]))
            producer.produce(self.dead_letter_topic,
                             *dead_letter_copy(batch.value[pos], batch.key[pos], batch.headers(pos), headers))
            self.metrics.dead_letter(topic0[pos], reason)  # also counts events_total{outcome="dead_lettered"}
        for pos, _stream in decoded.unrouted:
            self.metrics.event(topic0[pos], "replayed" if replay[pos] else "unrouted")
        for features, group in decoded.groups.items():  # one group per route
            self._add_to_route(self._route[features], group, batch, tp_idx, replay)
        self.positions.advance(tp_idx, batch.offset)

    def _refuse_new_streams(self, decoded: DecodedBatch, replay: np.ndarray) -> None:
        """The events of streams beyond processing.max_streams (counted over every route, the streams already held
        first, then new ones route by route, each route's in poll order) become rejections (reason
        too_many_streams), in input order with the others: dead-lettered, so nothing is lost, and said at most once
        a minute. A stream is taken once there is room again (streams forgotten after
        processing.stream_idle_timeout_s, or on a revoke)."""
        room = self.max_streams - sum(len(r.stream_index) for r in self.routes)
        if room >= sum(len(g) for g in decoded.groups.values()):  # fewer events than free places: nothing to check
            return
        taken: set[str] = set()
        refused: set[str] = set()
        n_refused = 0
        detail = (f"{self.max_streams} streams are tracked (processing.max_streams): a new stream is taken once one is "
                  "forgotten (processing.stream_idle_timeout_s) or the limit is raised")
        for spec, group in list(decoded.groups.items()):
            held = self._route[spec].stream_index
            keep = np.ones(len(group), dtype=bool)
            for i, stream in enumerate(group.stream):
                if stream in held or stream in taken:
                    continue
                if stream not in refused and room > 0:
                    taken.add(stream)
                    room -= 1
                    continue
                refused.add(stream)
                keep[i] = False
                pos = int(group.ok_index[i])
                n_refused += not replay[pos]  # a replayed record is not dead-lettered again
                decoded.rejected.append((pos, TOO_MANY_STREAMS, detail))
            if keep.all():
                continue
            if keep.any():
                decoded.groups[spec] = group.take(np.flatnonzero(keep))
            else:
                del decoded.groups[spec]
        if refused:
            decoded.rejected.sort(key=lambda r: r[0])
            if n_refused:
                self._warn_limit(n_refused, refused)

    def _warn_limit(self, n_events: int, streams: set[str]) -> None:
        """Count refused events; say so, with the count since the last warning and a few streams, once a minute."""
        n, names = self._refused
        names.update(sorted(streams)[:max(0, 3 - len(names))])
        self._refused = (n + n_events, names)
        now = time.monotonic()
        if now - self._limit_warned_at < LIMIT_WARNING_EVERY_S:
            return
        n, names = self._refused
        log.warning("processing.max_streams (%d) streams are tracked: %d events of new streams (e.g. %s) went to the "
                    "dead-letter topic (reason too_many_streams). Raise the limit (with the memory it needs: a window "
                    "per stream), or forget silent streams sooner (processing.stream_idle_timeout_s); a producer "
                    "sending ever new stream ids would grow it without end", self.max_streams, n,
                    ", ".join(sorted(names)))
        self._refused, self._limit_warned_at = (0, set()), now

    def _features_of(self, stream: str) -> _RouteFeatures | None:
        """The stream's route (its features), None when no route takes it; asked once per stream."""
        r = self.router.route_of(stream)
        return None if r < 0 else self._features[r]

    def _add_to_route(self, route: RouteState, group, batch: RecordBatch, tp_idx: np.ndarray,
                      replay: np.ndarray) -> None:
        """Replayed records (window rebuild) go in first, unscored; a stream's records are all on one partition,
        where replayed offsets precede live ones, so each stream keeps its order."""
        sel = np.arange(len(group.stream))
        rep = replay[group.ok_index]
        for part, live in ((sel[rep], False), (sel[~rep], True)):
            if not len(part):
                continue
            p = group.ok_index[part]  # ascending positions: the whole group / poll exactly when as many
            topics = batch.topic if len(p) == len(batch.topic) else list(map(batch.topic.__getitem__, p.tolist()))
            if len(set(topics)) == 1:
                self._add_part(route, group, batch, tp_idx, part, p, topics, live)
                continue
            # several topics: each one's outcomes under its own label (a stream lives on one partition of one topic,
            # so splitting by topic keeps every stream's order)
            names = np.asarray(topics, dtype=object)
            for name in dict.fromkeys(topics):
                mine = names == name
                self._add_part(route, group, batch, tp_idx, part[mine], p[mine], [name] * int(mine.sum()), live)

    def _add_part(self, route: RouteState, group, batch: RecordBatch, tp_idx: np.ndarray, part: np.ndarray,
                  p: np.ndarray, topics: list[str], live: bool) -> None:
        """Events ``part`` of ``group`` (poll positions ``p``), all of topic ``topics[0]``, into ``route``."""
        ids = route.stream_ids(group.stream if len(part) == len(group.stream)
                               else list(map(group.stream.__getitem__, part.tolist())))
        warm0, missing0 = route.buffer.n_warming, route.buffer.n_missing
        late, _ = route.add(ids, group.ts[part], group.values[part], tp_idx[p], batch.offset[p], topics,
                            batch.partition[p], np.full(len(p), live))
        warming = route.buffer.n_warming - warm0
        topic = topics[0]
        if not live:  # read again to rebuild windows: its outcome was counted when it was first read
            self.metrics.event(topic, "replayed", len(p))
            return
        self._check_time_unit(topic, group.stream, part, group.ts[part])
        if late:
            self.metrics.event(topic, "late", late)
        if warming:
            self.metrics.event(topic, "warming", warming)
        if missing := route.buffer.n_missing - missing0:
            self.metrics.missing_values.labels(topic=topic).inc(missing)
        if len(p) - late - warming > 0:
            self.metrics.event(topic, "scored", len(p) - late - warming)

    def _check_time_unit(self, topic: str, streams: list[str], part: np.ndarray, ts: np.ndarray) -> None:
        """Say (every 10 minutes at most) when live event times are not epoch milliseconds: seconds were taken
        for January 1970 without a word, which dates alerts wrong and makes every event->score latency huge."""
        lo, hi = int(ts.min()), int(ts.max())
        if _MS_LOW <= lo and hi < _MS_HIGH:
            return
        now = time.monotonic()
        if now - self._unit_warned_at < UNIT_WARNING_EVERY_S:
            return
        self._unit_warned_at = now
        i = int(np.argmin(ts)) if lo < _MS_LOW else int(np.argmax(ts))
        value = int(ts[i])
        unit = ("seconds since the epoch" if 0 < value < _MS_LOW else "microseconds or nanoseconds since the "
                "epoch" if value >= _MS_HIGH else "no time at all (zero or negative)")
        try:
            as_ms = datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d")
        except (OverflowError, OSError, ValueError):
            as_ms = "beyond any calendar"
        log.warning("topic %s: event times look like %s (stream %s: ts %d, which as epoch "
                    "milliseconds is %s). anomalyd reads \"ts\" as epoch milliseconds (or an ISO 8601 string): alert "
                    "times and the event->score latency are wrong until the producers send milliseconds", topic, unit,
                    streams[int(part[i])], value, as_ms)
