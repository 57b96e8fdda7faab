"""Per-stream alert state: k-of-n opening, m-consecutive-normal resolving, cooldown, deterministic ids.

An *incident* of a stream opens when at least ``k`` of its last ``n`` scored windows were over
threshold (and the stream is not in cooldown), stays open until ``m`` consecutive windows are normal,
and then resolves; a new incident on that stream may open only ``cooldown_s`` seconds of event time
after the previous one resolved.  Each incident produces exactly two :class:`Alert` records:
``firing`` when it opens and ``resolved`` when it ends.  Resolving clears the stream's last-n bits,
so the next incident needs k fresh over-threshold windows.

The incident id is a hash of (stream, model label, topic/partition/offset of the incident's first
anomalous window, i.e. the oldest over-threshold window among the last ``n`` when it opened), so
replaying the same input produces the same ids and duplicates can be recognised downstream. Open incidents can be
handed to the next owner of their partition (:meth:`AlertTracker.handover`, :meth:`AlertTracker.adopt`), which
continues them under the same id.

:class:`AlertTracker` sits on the hot path: :meth:`AlertTracker.observe` takes a whole micro-batch
as arrays.  Idle streams (not open, no over-threshold bit among their last ``n`` results, nothing
over threshold in the batch) cost no Python at all; closed streams whose over-threshold bits are only
decaying are shifted with numpy; only windows of streams that are over threshold in this batch, have
an open incident or wait for their cooldown to end (k of n over) are stepped in Python.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .alert_message import FIRING, RESOLVED, Alert, alert_id

_NEVER = np.iinfo(np.int64).min


@dataclass(slots=True)
class _Hit:
    """An over-threshold window not yet part of an incident (kept while it is among the stream's last n)."""

    ts: int
    topic: str
    partition: int
    offset: int
    score: float
    shares: np.ndarray | None  # (F,) contribution shares, or None
    models_over: tuple[str, ...]


@dataclass(slots=True)
class _Incident:
    """Mutable state of an open incident."""

    id: str
    stream: str
    model: str
    model_version: str
    threshold: float
    feature_names: tuple[str, ...]
    started_at: int
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    last_ts: int = 0  # event time of its latest window
    peak: float = float("-inf")
    share_sum: np.ndarray | None = None  # (F,)
    n_shares: int = 0
    models_over: dict[str, None] = field(default_factory=dict)  # ordered set
    normal_run: int = 0

    def add_hit(self, score: float, shares: np.ndarray | None, models_over: Sequence[str]) -> None:
        self.peak = max(self.peak, score)
        if shares is not None:
            self.share_sum = shares.copy() if self.share_sum is None else self.share_sum + shares
            self.n_shares += 1
        for name in models_over:
            self.models_over.setdefault(name)

    def state(self, top_k: int) -> dict:
        """The incident as a JSON-able dict for the next owner of its partition (:meth:`AlertTracker.adopt`); the
        per-feature shares of the ``top_k`` features only."""
        return {"id": self.id, "stream": self.stream, "route": self.model, "version": self.model_version,
                "threshold": self.threshold, "started": self.started_at, "topic": self.topic,
                "partition": self.partition, "first": self.first_offset, "last": self.last_offset,
                "last_ts": self.last_ts, "peak": self.peak,
                "normal": self.normal_run, "over": list(self.models_over),
                "shares": {f: round(v, 4) for f, v in self.top_features(top_k)},
                "n": self.n_shares}

    @classmethod
    def from_state(cls, state: Mapping, feature_names: tuple[str, ...]) -> _Incident:
        """The incident :meth:`state` described, its shares on ``feature_names`` (KeyError, TypeError,
        ValueError or OverflowError for a malformed state)."""
        inc = cls(id=str(state["id"]), stream=str(state["stream"]), model=str(state["route"]),
                  model_version=str(state["version"]), threshold=float(state["threshold"]),
                  feature_names=feature_names, started_at=int(state["started"]), topic=str(state["topic"]),
                  partition=int(state["partition"]), first_offset=int(state["first"]), last_offset=int(state["last"]),
                  peak=float(state["peak"]), normal_run=int(state["normal"]))
        inc.last_ts = max(int(state.get("last_ts", inc.started_at)), inc.started_at)
        for name in state["over"]:
            inc.models_over.setdefault(str(name))
        n, shares = int(state["n"]), dict(state["shares"])
        if n > 0 and feature_names:
            inc.share_sum = np.array([float(shares.get(f, 0.0)) * n for f in feature_names])  # (F,)
            inc.n_shares = n
        return inc

    def top_features(self, k: int) -> list[tuple[str, float]]:
        if self.share_sum is None or self.n_shares == 0 or k <= 0:
            return []
        mean = self.share_sum / self.n_shares  # (F,)
        order = np.argsort(-mean, kind="stable")[:k]
        return [(self.feature_names[j], float(mean[j])) for j in order.tolist()]


class AlertTracker:
    """Alert state of all streams, indexed by an integer stream index (arrays grow geometrically).

    One tracker serves every route; a stream is expected to keep its route (model label) between batches.
    """

    def __init__(self, k: int = 3, n: int = 5, m: int = 10, cooldown_s: float = 60.0, top_features: int = 3):
        if not 1 <= n <= 64:
            raise ValueError(f"alerts.n must be in 1..64, got {n}")
        if not 1 <= k <= n:
            raise ValueError(f"alerts.k must be in 1..n={n}, got {k}")
        if m < 1:
            raise ValueError(f"alerts.m must be >= 1, got {m}")
        if cooldown_s < 0:
            raise ValueError(f"alerts.cooldown_s must be >= 0, got {cooldown_s}")
        self.k, self.n, self.m = int(k), int(n), int(m)
        self.cooldown_ms = int(round(cooldown_s * 1000))
        self.top_features = int(top_features)
        self._mask = (1 << self.n) - 1
        self._bits = np.zeros(0, dtype=np.uint64)  # (S,) last-n over bits, bit 0 = newest
        self._open = np.zeros(0, dtype=bool)  # (S,)
        self._blocked = np.zeros(0, dtype=bool)  # (S,) closed, >= k over bits, waiting for cooldown
        self._cooldown_until = np.zeros(0, dtype=np.int64)  # (S,) event-time ms
        self._scratch = np.zeros(0, dtype=bool)  # (S,) all False between calls
        self._pending: dict[int, deque[_Hit]] = {}
        self._incidents: dict[int, _Incident] = {}

    @property
    def open_incidents(self) -> int:
        """Number of streams with an open incident."""
        return len(self._incidents)

    def resolve_streams(self, stream_idx: np.ndarray, ended_at: np.ndarray) -> list[Alert]:
        """Close the open incidents of these streams (N,) at event times ``ended_at`` (N,) ms (none earlier than
        the incident's start), e.g. streams gone silent: their ``resolved`` alerts. As a resolve by m normal
        windows: the last-n bits are cleared and the cooldown starts."""
        out = []
        for st, end in zip(stream_idx.tolist(), ended_at.tolist(), strict=True):
            inc = self._incidents.pop(st, None)
            if inc is not None:
                end = max(int(end), inc.last_ts, inc.started_at)  # an end not known (INT64_MIN): its last window
                self._open[st] = False
                self._bits[st] = 0
                self._pending.pop(st, None)
                self._cooldown_until[st] = end + self.cooldown_ms
                out.append(self._alert(inc, RESOLVED, end))
        return out

    def handover(self) -> list[tuple[int, dict]]:
        """``(stream index, state)`` of every open incident, for the next owner of its partition: the last commit
        before a revoke or the shutdown carries them (:mod:`pipelines.positions`)."""
        k = max(self.top_features, 3)
        return [(st, inc.state(k)) for st, inc in self._incidents.items()]

    def incident_of(self, st: int) -> _Incident | None:
        """Stream ``st``'s open incident, None when it has none."""
        return self._incidents.get(st)

    def resolved(self, state: Mapping, feature_names: Sequence[str]) -> Alert:
        """The ``resolved`` alert of a handed-over incident that is not continued (ended at its latest window)."""
        inc = _Incident.from_state(state, tuple(feature_names))
        return self._alert(inc, RESOLVED, inc.last_ts)

    def adopt(self, st: int, state: Mapping, feature_names: Sequence[str]) -> Alert:
        """Continue an incident the partition's previous owner handed over (:meth:`handover`) as stream ``st``'s
        open incident: it resolves after ``m`` normal windows, with its own id. Returns its ``firing`` alert (for
        sinks that re-send active alerts; it was delivered by the previous owner). KeyError, TypeError, ValueError or
        OverflowError for a malformed state, and nothing changes."""
        inc = _Incident.from_state(state, tuple(feature_names))
        self._grow(st + 1)
        self._incidents[st] = inc
        self._open[st], self._blocked[st], self._bits[st] = True, False, 0
        self._pending.pop(st, None)
        return self._alert(inc, FIRING, None)

    def reset_streams(self, stream_idx: Sequence[int] | np.ndarray) -> None:
        """Forget all state of these streams (e.g. their partition was revoked); emits nothing."""
        idx = np.asarray(stream_idx, dtype=np.int64).ravel()
        idx = idx[(idx >= 0) & (idx < self._bits.shape[0])]
        self._bits[idx] = 0
        self._open[idx] = False
        self._blocked[idx] = False
        self._cooldown_until[idx] = _NEVER
        for st in idx.tolist():
            self._pending.pop(st, None)
            self._incidents.pop(st, None)

    def observe(
        self,
        stream_idx: np.ndarray,
        score: np.ndarray,
        over: np.ndarray,
        ts_ms: np.ndarray,
        topic: Sequence[str] | np.ndarray | str,
        partition: np.ndarray,
        offset: np.ndarray,
        contributions: np.ndarray | None = None,
        feature_names: Sequence[str] = (),
        model: str = "",
        model_version: str = "",
        models_over: Sequence[Sequence[str]] | Mapping[int, Sequence[str]] | None = None,
        stream_names: Sequence[str] = (),
        threshold: float = 1.0,
    ) -> list[Alert]:
        """Feed one micro-batch of M scored windows (in event order; a stream may occur several times).

        ``stream_idx`` (M,) int, ``score`` (M,) normalised, ``over`` (M,) bool, ``ts_ms``/``partition``/
        ``offset`` (M,) int, ``topic`` (M,) str or one str for all, ``contributions`` (M, F) per-feature
        contributions (e.g. reconstruction error) named by ``feature_names``, ``models_over`` per window
        the models over threshold (None = ``[model]``; a mapping by window index needs only the windows that are
        ``over``), ``stream_names[stream_idx]`` the stream id, ``threshold`` the raw threshold reported in alerts.
        Returns the alerts in event order.
        """
        s = np.asarray(stream_idx, dtype=np.int64).ravel()  # (M,)
        over_a = np.asarray(over, dtype=bool).ravel()  # (M,)
        if s.shape != over_a.shape:
            raise ValueError(f"stream_idx {s.shape} and over {over_a.shape} differ in shape")
        if s.size == 0:
            return []
        if int(s.min()) < 0:
            raise ValueError("stream_idx must be >= 0")
        if contributions is not None and np.shape(contributions) != (s.size, len(feature_names)):
            raise ValueError(
                f"contributions shape {np.shape(contributions)} != (windows, features) = "
                f"({s.size}, {len(feature_names)})"
            )
        self._grow(int(s.max()) + 1)
        slow = self._open[s] | self._blocked[s]  # (M,)
        over_streams = s[over_a]
        if over_streams.size:
            self._scratch[over_streams] = True
            slow |= self._scratch[s]
            self._scratch[over_streams] = False
        decaying = ~slow & (self._bits[s] != 0)  # (M,)
        if decaying.any():
            self._decay(s[decaying])
        slow_idx = np.flatnonzero(slow)
        if slow_idx.size == 0:
            return []
        return self._step_slow(
            slow_idx, s, over_a, score, ts_ms, topic, partition, offset, contributions, tuple(feature_names),
            model, model_version, models_over, stream_names, float(threshold),
        )  # fmt: skip

    # -- internals ------------------------------------------------------------------------------------

    def _grow(self, size: int) -> None:
        cap = self._bits.shape[0]
        if size <= cap:
            return
        new = max(size, 2 * cap, 1024)
        self._bits = np.concatenate([self._bits, np.zeros(new - cap, dtype=np.uint64)])
        self._open = np.concatenate([self._open, np.zeros(new - cap, dtype=bool)])
        self._blocked = np.concatenate([self._blocked, np.zeros(new - cap, dtype=bool)])
        never = np.full(new - cap, _NEVER, dtype=np.int64)
        self._cooldown_until = np.concatenate([self._cooldown_until, never])
        self._scratch = np.concatenate([self._scratch, np.zeros(new - cap, dtype=bool)])

    def _decay(self, ds: np.ndarray) -> None:
        """Shift in one normal result per window (closed streams, nothing over threshold in the batch)."""
        uniq, cnt = np.unique(ds, return_counts=True)  # (U,), (U,)
        old = self._bits[uniq]
        shift = np.minimum(cnt, self.n).astype(np.uint64)
        new = np.where(cnt >= self.n, np.uint64(0), (old << shift) & np.uint64(self._mask))
        self._bits[uniq] = new
        for st in uniq[new == 0].tolist():
            self._pending.pop(st, None)

    def _step_slow(
        self, idx, s, over, score, ts_ms, topic, partition, offset, contributions, feature_names,
        model, model_version, models_over, stream_names, threshold,
    ) -> list[Alert]:  # fmt: skip
        """Per-window Python step for the windows ``idx`` (ascending) of hot streams."""
        st_l = s[idx].tolist()
        ov_l = over[idx].tolist()
        sc_l = np.asarray(score, dtype=np.float64).ravel()[idx].tolist()
        ts_l = np.asarray(ts_ms, dtype=np.int64).ravel()[idx].tolist()
        pa_l = np.asarray(partition, dtype=np.int64).ravel()[idx].tolist()
        of_l = np.asarray(offset, dtype=np.int64).ravel()[idx].tolist()
        tp_l = [topic] * len(st_l) if isinstance(topic, str) else [str(topic[i]) for i in idx.tolist()]
        shares = self._shares(contributions, idx, over)  # row j -> (F,) or None
        default_mo = (model,)
        alerts: list[Alert] = []
        for j, i in enumerate(idx.tolist()):
            st, o, ts = st_l[j], ov_l[j], ts_l[j]
            b = ((int(self._bits[st]) << 1) | int(o)) & self._mask
            inc = self._incidents.get(st)
            if inc is not None:
                inc.last_ts = ts
                if (tp_l[j], pa_l[j]) == (inc.topic, inc.partition):
                    inc.last_offset = of_l[j]
                if o:
                    inc.normal_run = 0
                    mo = default_mo if models_over is None else tuple(models_over[i])
                    inc.add_hit(sc_l[j], shares[j], mo)
                else:
                    inc.peak = max(inc.peak, sc_l[j])
                    inc.normal_run += 1
                    if inc.normal_run >= self.m:
                        alerts.append(self._alert(inc, RESOLVED, ts))
                        del self._incidents[st]
                        self._open[st] = False
                        self._cooldown_until[st] = ts + self.cooldown_ms
                        b = 0
                self._bits[st] = b
                continue
            pend = self._pending.get(st)
            if o:
                if pend is None:
                    pend = self._pending[st] = deque()
                mo = default_mo if models_over is None else tuple(models_over[i])
                pend.append(_Hit(ts, tp_l[j], pa_l[j], of_l[j], sc_l[j], shares[j], mo))
            count = b.bit_count()
            if pend is not None:
                while len(pend) > count:
                    pend.popleft()
                if not pend:
                    del self._pending[st]
            self._blocked[st] = count >= self.k
            if count >= self.k and ts >= int(self._cooldown_until[st]):
                self._blocked[st] = False
                inc = self._open_incident(
                    self._pending.pop(st), stream_names[st], model, model_version, threshold, feature_names,
                    (tp_l[j], pa_l[j], of_l[j]),
                )  # fmt: skip
                inc.last_ts = ts
                self._incidents[st] = inc
                self._open[st] = True
                alerts.append(self._alert(inc, FIRING, None))
            self._bits[st] = b
        return alerts

    def _shares(self, contributions: np.ndarray | None, idx: np.ndarray, over: np.ndarray) -> list:
        """Per slow window, its per-feature contribution shares (F,) if it is over threshold, else None."""
        out: list[np.ndarray | None] = [None] * idx.size
        if contributions is None:
            return out
        c = np.asarray(contributions, dtype=np.float64)  # (M, F)
        rows = np.flatnonzero(over[idx])  # positions in idx
        if rows.size == 0:
            return out
        a = np.abs(c[idx[rows]])  # (R, F)
        tot = a.sum(axis=1)  # (R,)
        ok = np.isfinite(tot) & (tot > 0)
        sh = a / np.where(ok, tot, 1.0)[:, None]  # (R, F)
        for r, good, row in zip(rows.tolist(), ok.tolist(), sh, strict=True):
            if good:
                out[r] = row
        return out

    def _open_incident(
        self, hits: deque[_Hit], stream: str, model: str, model_version: str, threshold: float,
        feature_names: tuple[str, ...], current: tuple[str, int, int],
    ) -> _Incident:  # fmt: skip
        """Open an incident from the pending hits; ``current`` = (topic, partition, offset) of this window."""
        first = hits[0]
        same_partition = current[:2] == (first.topic, first.partition)
        inc = _Incident(
            id=alert_id(stream, model, first.topic, first.partition, first.offset),
            stream=stream, model=model, model_version=model_version, threshold=threshold,
            feature_names=feature_names, started_at=first.ts, topic=first.topic, partition=first.partition,
            first_offset=first.offset, last_offset=current[2] if same_partition else first.offset,
        )  # fmt: skip
        for h in hits:
            inc.add_hit(h.score, h.shares, h.models_over)
        return inc

    def _alert(self, inc: _Incident, status: str, ended_at: int | None) -> Alert:
        return Alert(
            id=inc.id,
            status=status,
            stream=inc.stream,
            model=inc.model,
            model_version=inc.model_version,
            started_at=inc.started_at,
            ended_at=ended_at,
            peak_score=float(inc.peak),
            threshold=inc.threshold,
            models_over=list(inc.models_over),
            top_features=inc.top_features(self.top_features),
            source={
                "topic": inc.topic,
                "partition": inc.partition,
                "first_offset": inc.first_offset,
                "last_offset": inc.last_offset,
            },
        )
