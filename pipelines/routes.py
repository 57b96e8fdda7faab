"""Per-route processing state: stream ids, window buffer, pending micro-batch, alert tracker.

A route is one set of models (e.g. a GRU and an LSTM side by side) sharing window length and features.
Events of a route go into its :class:`~detector.windows.WindowBuffer`; due windows wait in the pending
micro-batch until the daemon flushes, when every model of the route scores them in one forward each.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from detector.engine import InferenceEngine
from detector.windows import WindowBatch, WindowBuffer, accepted_events

from .alert_message import Alert
from .alerts import AlertTracker
from .model_store import LoadedModel
from .positions import WindowOffsets
from .routing import RouteSpec

log = logging.getLogger(__name__)

__all__ = ["RouteState", "ScoredBatch"]


@dataclass
class ScoredBatch:
    """What one route's flush produced (for metrics)."""

    label: str
    n: int
    per_model_normalised: dict[str, np.ndarray]
    combined: np.ndarray  # (M,)
    ts: np.ndarray  # (M,) event timestamps, ms
    stream_idx: np.ndarray  # (M,) the route's stream ids
    stream_names: Sequence[str]  # the route's stream names, by id
    alerts: list[Alert] = field(default_factory=list)

    def streams(self) -> list[str]:
        """(M,) the windows' stream names, built when asked (about 0.1 us per window)."""
        names = self.stream_names
        return [names[i] for i in self.stream_idx.tolist()]


class RouteState:
    def __init__(self, spec: RouteSpec, models: list[LoadedModel], stride: int, alert_cfg: dict) -> None:
        self.spec = spec
        self.tracker = AlertTracker(**alert_cfg)
        self.stride = stride
        self.stream_index: dict[str, int] = {}  # the streams held, by name
        self.stream_names: list[str] = []  # by id; "" for a free id (a stream forgotten, its id to be reused)
        self.stream_tp = np.full(1024, -1, dtype=np.int32)  # (S,) topic-partition id of each stream
        self.last_seen = np.full(1024, np.nan)  # (S,) monotonic time of each stream's latest event (NaN: none)
        self._rebuilt = np.zeros(1024, dtype=bool)  # (S,) records read again since its last live one (stride > 1)
        self._free: list[int] = []  # ids of forgotten streams
        self._moved_count, self._moved_names = 0, set()  # arrivals on another partition than before (_moved)
        self._moved_logged_at = -math.inf
        self._pending: list[tuple] = []
        self.pending_windows = 0
        self.set_models(models)

    # -- models ----------------------------------------------------------------------------------------
    @staticmethod
    def check_models(models: list[LoadedModel], label: str, stride: int = 1) -> None:
        """Models of one route must share window and features, and the window must not be shorter than the stride
        (ValueError naming the route)."""
        first = models[0].detector
        if problem := RouteState.stride_problem(models, label, stride):
            raise ValueError(problem)
        for m in models[1:]:
            d = m.detector
            if d.window != first.window:
                raise ValueError(f"route {label!r}: models must share window and features; {m.name} has window "
                                 f"{d.window}, {models[0].name} {first.window} (train both with the same --window)")
            if list(d.feature_names) != list(first.feature_names):
                raise ValueError(f"route {label!r}: models must share window and features; {m.name} has features "
                                 f"{list(d.feature_names)}, {models[0].name} {list(first.feature_names)} (the same "
                                 "names in the same order: CSV columns, or the first message's keys)")

    @staticmethod
    def stride_problem(models: list[LoadedModel], label: str, stride: int) -> str | None:
        """Why ``stride`` cannot serve the route's models, None when it can: longer than their window, it leaves
        the events between two scored windows in none."""
        window = models[0].detector.window
        if stride > window:
            return (f"processing.stride: {stride} is larger than the window ({window}) of route {label!r}: the "
                    "events between two scored windows would be in none; use at most the window")
        for m in models:  # a score covers the window's last score_last_k steps only
            k = m.detector.score_last_k
            if k is not None and stride > k:
                return (f"processing.stride: {stride} is larger than the {k} last steps of each window that model "
                        f"{m.name} scores (trained with --last-k {k}) in route {label!r}: the events between those "
                        f"steps would be scored by none; use at most {k}")
        return None

    def set_models(self, models: list[LoadedModel]) -> None:
        """Install (new versions of) the route's models; the buffer is kept when the shape is unchanged."""
        self.check_models(models, self.spec.label, self.stride)
        first = models[0].detector
        self.models = models
        same_columns = getattr(self, "feature_names", None) == list(first.feature_names)
        self.feature_names = list(first.feature_names)
        shape = (first.window, first.n_features)
        if (getattr(self, "buffer", None) is None or (self.buffer.window, self.buffer.n_features) != shape
                or not same_columns):  # windows held in other columns would mix the two orders
            self.buffer = WindowBuffer(first.window, first.n_features, stride=self.stride, keep_timestamps=False)
            self.offsets = WindowOffsets(first.window)
            self._pending, self.pending_windows = [], 0
        centers = [c for m in models if (c := getattr(getattr(m.detector, "scaler", None), "center", None)) is not None]
        if centers:  # a stream's first missing values: the models' centre of the data (their mean, for several)
            self.buffer.set_fill(np.mean(np.stack(centers), axis=0))

    @property
    def version(self) -> str:
        return "+".join(m.version for m in self.models)

    # -- events ----------------------------------------------------------------------------------------
    def stream_ids(self, streams: list[str]) -> np.ndarray:
        """(N,) int64 the streams' ids in this route; a new stream gets the next id."""
        idx = self.stream_index
        try:
            return np.fromiter(map(idx.__getitem__, streams), np.int64, len(streams))  # every stream known
        except KeyError:
            pass
        out = np.empty(len(streams), dtype=np.int64)
        for i, s in enumerate(streams):
            j = idx.get(s)
            if j is None:
                if self._free:
                    j = idx[s] = self._free.pop()
                    self.stream_names[j] = s
                else:
                    j = idx[s] = len(self.stream_names)
                    self.stream_names.append(s)
            out[i] = j
        n = len(self.stream_names)
        if n > len(self.stream_tp):
            grow = max(n, 2 * len(self.stream_tp)) - len(self.stream_tp)
            self.stream_tp = np.concatenate([self.stream_tp, np.full(grow, -1, np.int32)])
            self.last_seen = np.concatenate([self.last_seen, np.full(grow, np.nan)])
            self._rebuilt = np.concatenate([self._rebuilt, np.zeros(grow, dtype=bool)])
        return out

    def _moved(self, streams: np.ndarray) -> None:
        """Streams whose events now come from another partition than before: the topic's partitions were added to
        (the key's partition changed), or producers key a stream's messages by something else than its id. Events
        still unread on the old partition fall behind the new ones and are dropped as late; say so, at most once a
        minute, with the number of such arrivals and a few of the streams (named now: an id may be reused)."""
        self._moved_count += len(streams)
        for i in streams[:3].tolist():
            if len(self._moved_names) < 3:
                self._moved_names.add(self.stream_names[i])
        now = time.monotonic()
        if now - self._moved_logged_at >= 60.0:
            log.warning("route %s: %d events of streams that now arrive on another partition than before (e.g. %s): "
                        "their events still unread on the old one are dropped as late; add partitions only with the "
                        "consumer lag near 0, and key each message by its stream id", self.spec.label,
                        self._moved_count, ", ".join(sorted(self._moved_names)))
            self._moved_logged_at, self._moved_count, self._moved_names = now, 0, set()

    def add(self, stream: np.ndarray, ts: np.ndarray, values: np.ndarray, tp_id: np.ndarray, offset: np.ndarray,
            topic: list[str], partition: np.ndarray, score: np.ndarray) -> tuple[int, int]:
        """Feed events (N,) in order; due windows of events with ``score`` True join the pending batch.

        Returns (late events dropped, windows queued).
        """
        late0 = self.buffer.n_late
        prev = self.stream_tp[stream]
        moved = (prev >= 0) & (prev != tp_id)
        if moved.any():
            self._moved(stream[moved])
        self.stream_tp[stream] = tp_id
        prior = self.buffer.largest_ts(stream)  # (N,)
        if self.stride > 1:  # a rebuilt stream's first live event closes a window: none read before is left out
            live = stream[score]
            if live.size and (rebuilt := live[self._rebuilt[live]]).size:
                rebuilt = np.unique(rebuilt)
                self.buffer.align_next(rebuilt)
                self._rebuilt[rebuilt] = False
        wb = self.buffer.add(stream, ts, values)
        if self.stride > 1 and not score.all():
            self._rebuilt[stream[~score]] = True
        ok = None if self.buffer.n_late == late0 else accepted_events(stream, ts, prior)  # None: every event
        # A stream is seen by its accepted events: one whose clock stepped back (every event late, none scored)
        # goes silent, and is forgotten (its incident resolved) after stream_idle_timeout_s, then starts afresh.
        if ok is None and score.all():
            self.last_seen[stream] = time.monotonic()
        else:  # records read again to rebuild windows: not news of a stream already held (adopted, say)
            seen = score | np.isnan(self.last_seen[stream])
            self.last_seen[stream[seen if ok is None else seen & ok]] = time.monotonic()
        if ok is not None:  # the rebuild offsets count accepted events only: windows hold no late one
            self.offsets.add(stream[ok], offset[ok])
        else:
            self.offsets.add(stream, offset)
        keep = score[wb.event_index]
        n_keep = int(np.count_nonzero(keep))
        if n_keep:
            e = wb.event_index
            if n_keep < len(wb):  # some windows are not to be scored (replayed events): copy out the others
                wb = WindowBatch(wb.stream[keep], wb.windows[keep], wb.ts[keep], e[keep])
                e = wb.event_index
            self._pending.append((wb.stream, wb.windows, wb.ts, list(map(topic.__getitem__, e.tolist())), partition[e],
                                  offset[e]))
            self.pending_windows += n_keep
        return self.buffer.n_late - late0, n_keep

    def rebuild_floor(self, n_tp: int) -> np.ndarray:
        """(n_tp,) per topic-partition id, an offset at or below every event still in a window there (-1 none)."""
        n = len(self.stream_names)
        mins = self.offsets.floor(n)
        mins = np.where(mins >= 0, mins, np.iinfo(np.int64).max)
        out = np.full(n_tp, np.iinfo(np.int64).max, dtype=np.int64)
        tp = self.stream_tp[:n]
        ok = (tp >= 0) & (tp < n_tp) & (mins < np.iinfo(np.int64).max)
        np.minimum.at(out, tp[ok], mins[ok])
        return np.where(out == np.iinfo(np.int64).max, -1, out)

    def forget_partitions(self, tp_ids: list[int]) -> list[str]:
        """Forget the streams of these partitions (window, alert state, name); returns their names."""
        n = len(self.stream_names)
        return self._forget(np.flatnonzero(np.isin(self.stream_tp[:n], tp_ids)))

    def forget_idle(self, idle_s: float, now: float | None = None) -> tuple[list[str], list[Alert]]:
        """Forget the streams without an event for ``idle_s`` seconds: (their names, the ``resolved`` alerts of
        their open incidents, ended at each stream's last event). Their ids are reused, so stream churn does not
        grow memory, and an incident whose stream went silent does not stay open for ever."""
        n = len(self.stream_names)
        now = time.monotonic() if now is None else now
        idle = np.flatnonzero((self.last_seen[:n] < now - idle_s) & (self.stream_tp[:n] >= 0))
        if self._pending and idle.size:  # windows not scored yet (their offsets are to be committed): kept
            idle = idle[~np.isin(idle, np.concatenate([part[0] for part in self._pending]))]
        alerts = self.tracker.resolve_streams(idle, self.buffer.largest_ts(idle)) if idle.size else []
        return self._forget(idle), alerts

    def handover(self) -> dict[int, list[dict]]:
        """The open incidents' states by topic-partition id, for the partitions' next owner (:meth:`adopt`), each
        with ``idle_s``, how long its stream has been silent (its next owner counts its silence on from there: the
        time between the handover and the adoption is not counted)."""
        out: dict[int, list[dict]] = {}
        now = time.monotonic()
        for st, state in self.tracker.handover():
            tp = int(self.stream_tp[st])
            if tp >= 0:
                idle = now - self.last_seen[st]
                state["idle_s"] = round(float(idle), 1) if idle > 0 else 0.0
                out.setdefault(tp, []).append(state)
        return out

    def adopt(self, state: dict, tp_id: int) -> tuple[Alert | None, list[Alert]]:
        """Continue an open incident handed over with partition ``tp_id`` (:meth:`handover`). Its stream is held from
        now, as silent as it was at the handover (forgotten when it stays so, which resolves the incident), even
        before its first event. Returns (its ``firing`` alert, None when it is not continued; ``resolved`` alerts):
        a stream with an open incident already (one handed over with another partition: its key moved) keeps the
        one that started later, and the other resolves now. Raises for a malformed state (KeyError, TypeError,
        ValueError, OverflowError), and nothing changes."""
        stream = state["stream"]
        if not isinstance(stream, str) or not stream:
            raise TypeError(f"stream {stream!r} is not a stream id")
        idle_s = float(state.get("idle_s", 0.0))
        idle_s = min(idle_s, 1e9) if idle_s > 0 else 0.0  # NaN: 0
        j = self.stream_index.get(stream)
        resolved = []
        if j is not None and (held := self.tracker.incident_of(j)) is not None:
            incoming = self.tracker.resolved(state, self.feature_names)  # raises for a malformed state
            if incoming.id == held.id:  # the same incident, in two partitions' metadata
                return None, []
            if incoming.started_at <= held.started_at:
                return None, [incoming]
            resolved = self.tracker.resolve_streams(np.array([j]), np.array([held.last_ts]))
        new = j is None
        (j,) = self.stream_ids([stream]).tolist()
        try:
            alert = self.tracker.adopt(j, state, self.feature_names)
        except (KeyError, TypeError, ValueError, OverflowError):
            if new:
                self._forget(np.array([j]))
            raise
        if new or resolved:  # held from now, on the incident's partition (where the key moved, for two)
            self.stream_tp[j] = tp_id
            self.last_seen[j] = np.fmax(self.last_seen[j], time.monotonic() - idle_s)
        return alert, resolved

    def _forget(self, gone: np.ndarray) -> list[str]:
        names = [self.stream_names[i] for i in gone.tolist()]
        if gone.size:
            self.buffer.reset_streams(gone)
            self.tracker.reset_streams(gone)
            self.offsets.reset(gone)
            self.stream_tp[gone] = -1
            self.last_seen[gone] = np.nan
            self._rebuilt[gone] = False
            self._drop_pending(gone)
            for i, name in zip(gone.tolist(), names, strict=True):
                del self.stream_index[name]
                self.stream_names[i] = ""
            self._free.extend(gone.tolist()[::-1])  # the lowest id is reused first
        return names

    def _drop_pending(self, streams: np.ndarray) -> None:
        """Drop these streams' windows still waiting to be scored (a revoke whose flush failed): the partition's
        next owner scores them; here they would meet the reset alert state, or be scored twice if it came back."""
        kept = []
        for part in self._pending:
            keep = ~np.isin(part[0], streams)
            if keep.all():
                kept.append(part)
            elif keep.any():
                i = np.flatnonzero(keep)
                stream, windows, ts, topic, partition, offset = part
                kept.append((stream[i], windows[i], ts[i], [topic[j] for j in i.tolist()], partition[i], offset[i]))
        self._pending, self.pending_windows = kept, sum(len(p[0]) for p in kept)

    # -- scoring ---------------------------------------------------------------------------------------
    def flush(self, engine: InferenceEngine, timings: dict[str, float]) -> ScoredBatch | None:
        """Score every pending window with each of the route's models, combine, update alert state."""
        return self.score(self.take_pending(), engine, timings)

    def take_pending(self) -> list[tuple]:
        """Hand over the pending micro-batch (the loop thread; scoring may then run on another thread)."""
        parts, self._pending, self.pending_windows = self._pending, [], 0
        return parts

    def score(self, parts: list[tuple], engine: InferenceEngine, timings: dict[str, float]) -> ScoredBatch | None:
        """Score windows taken with :meth:`take_pending`, combine the models, update alert state."""
        if not parts:
            return None
        if len(parts) == 1:  # one poll's windows: no copy
            stream, windows, ts, topic, partition, offset = parts[0]
        else:
            stream = np.concatenate([p[0] for p in parts])
            windows = np.concatenate([p[1] for p in parts])  # (M, W, F)
            ts = np.concatenate([p[2] for p in parts])
            topic = [t for p in parts for t in p[3]]
            partition = np.concatenate([p[4] for p in parts])
            offset = np.concatenate([p[5] for p in parts])
        per_model: dict[str, np.ndarray] = {}
        contribs = []
        for m in self.models:
            t0 = time.perf_counter()
            res = engine.score({m.name: windows})[m.name]
            timings[m.name] = time.perf_counter() - t0
            per_model[m.name] = res.normalised
            contribs.append(res.raw.contributions)
        norm = np.stack(list(per_model.values()))  # (K, M)
        combined = norm.max(axis=0) if self.spec.combine == "max" else norm.mean(axis=0)
        over = combined > 1.0
        best = norm.argmax(axis=0)  # the model that scored highest explains the window
        contributions = np.stack(contribs)[best, np.arange(len(best))]  # (M, F)
        names = list(per_model)
        models_over = None
        if len(names) > 1:  # for the windows over threshold only (the tracker reads no others): ~3 us per window
            models_over = {j: [names[k] for k in np.flatnonzero(norm[:, j] > 1.0)]
                           for j in np.flatnonzero(over).tolist()}
        # the raw threshold in force: the model's own, raised by the engine's margin for reduced precision
        threshold = float(self.models[0].detector.threshold.threshold) * (1.0 + engine.margin) \
            if len(self.models) == 1 else 1.0
        alerts = self.tracker.observe(
            stream, combined, over, ts, topic, partition, offset, contributions=contributions,
            feature_names=self.feature_names, model=self.spec.label, model_version=self.version,
            models_over=models_over, stream_names=self.stream_names, threshold=threshold,
        )
        return ScoredBatch(self.spec.label, len(stream), per_model, combined, ts, stream, self.stream_names, alerts)
