"""Vectorised sliding-window buffer for many event streams at once.

Each stream ``s`` (a dense integer index chosen by the caller) owns a ring of its last ``W`` accepted
events, ``F`` float32 features each: storage has shape ``(capacity, W, F)`` and the stream's ``c``-th
accepted event (1-based) sits in slot ``(c - 1) % W``. A window starting at slot ``p`` wraps around the
ring; it is gathered in one ``np.take`` of ``F``-float rows with row indices ``s * W + (p + j) % W``
(``j = 0 .. W-1``; the slots come from a precomputed ``(W, W)`` rotation table when ``W <= 256``).

``WindowBuffer.add`` takes a batch of events ``(stream, ts, values)`` and returns every window that became
due, without a Python loop over events:

* events are grouped per stream with a stable argsort (events of one stream keep their input order);
* an event is *late* (dropped, counted in ``n_late``) iff its ``ts`` is below the stream's largest accepted
  ``ts`` (a segmented cumulative maximum; equal timestamps are accepted);
* NaN values are forward filled per stream and feature from the last accepted value (an index
  ``maximum.accumulate``); a NaN with no previous value for that stream takes the fill value (``set_fill``: the
  models' centre; 0.0 by default). Every NaN
  of an accepted event counts once in ``n_missing`` (values, not events); NaNs of late events do not count;
* after accepting an event, with ``c`` = the stream's accepted count, a window is due iff ``c >= W`` and
  ``(c - W) % stride == 0``. All windows are read *before* the batch is written: the window of the
  ``k``-th new event of a stream (``k < W - 1``) is the ring slice starting at slot ``c % W`` (its
  ``W - 1 - k`` old events, then stale rows) with the last ``k + 1`` rows patched from the batch; later
  ones (any number, also more than ``2W`` per stream and batch) are contiguous slices of the batch's own
  grouped values. Then only the last ``W`` accepted events of each stream are written to the ring.

Where the fused extension of :mod:`detector.fastpath` can be had, ``add`` instead runs its C++ kernel
(``_window_ring.h``): the same definition applied event by event, without the GIL, about 3x faster at 1,000
streams (``tests/test_windows.py`` runs every test against both; ``ANOMALYD_NATIVE_WINDOWS=0``: numpy only).

Memory (``memory_bytes()``), per stream slot: ``W * F * 4`` B of values, 24 B of counters (count, largest ts,
stride phase) and, unless ``keep_timestamps=False``, ``W * 8`` B of ring timestamps (used only by
``last_events``); plus 32 KiB for the rotation table at ``W=64``. At ``W=64, F=8``: 2,072 B per slot without
timestamps (2,584 B with), i.e. 198 MiB (246 MiB) at capacity 100,000 and 259 MiB (323 MiB) at 131,072. Arrays
come from ``np.zeros``: slots never written are not resident. Capacity doubles as larger stream indices appear (old
and new arrays then briefly coexist). There are no per-stream Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._segments import accept_mask, accepted_events, sorted_groups  # noqa: F401 - the last two for pipelines

_TS_MIN = np.iinfo(np.int64).min
_ROT_TABLE_MAX_W = 256  # larger windows compute ring slots per call instead of a (W, W) table


@dataclass(frozen=True)
class WindowBatch:
    """Windows that became due in one ``WindowBuffer.add`` call, in input (event) order."""

    stream: np.ndarray  # (M,) int64 stream index of each due window
    windows: np.ndarray  # (M, W, F) float32, oldest -> newest, as of the event that made it due
    ts: np.ndarray  # (M,) int64 timestamp (ms) of that newest event
    event_index: np.ndarray  # (M,) int64 position in the input batch of that event

    def __len__(self) -> int:
        return int(self.stream.shape[0])


class WindowBuffer:
    """Ring buffers of the last ``window`` events for many streams, fed and read in batches."""

    def __init__(self, window: int, n_features: int, stride: int = 1, initial_capacity: int = 1024,
                 keep_timestamps: bool = True, native: bool | None = None) -> None:
        """``keep_timestamps=False`` saves ``W * 8`` bytes per stream; ``last_events`` is then unavailable.

        ``native``: apply events with the C++ kernel of :mod:`detector.fastpath` (``_window_ring.h``: the same
        definition, event by event, without the GIL); None: as ``ANOMALYD_NATIVE_WINDOWS`` says (default auto:
        when the extension can be had), True requires it, False: numpy."""
        for name, val in (("window", window), ("n_features", n_features), ("stride", stride),
                          ("initial_capacity", initial_capacity)):
            if int(val) != val or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        self._w, self._f, self._stride = int(window), int(n_features), int(stride)
        cap = int(initial_capacity)
        # np.zeros: pages are only touched when a stream is written.
        self._buf = np.zeros((cap, self._w, self._f), dtype=np.float32)  # (S, W, F) ring of values
        self._ring_ts = np.zeros((cap, self._w), dtype=np.int64) if keep_timestamps else None  # (S, W) or None
        ar = np.arange(self._w, dtype=np.int64)
        # (W, W) row p: ring slots of a window starting at slot p (None: computed per call for large W)
        self._rot = (ar[:, None] + ar[None, :]) % self._w if self._w <= _ROT_TABLE_MAX_W else None
        self._count = np.zeros(cap, dtype=np.int64)  # (S,) accepted events so far
        self._phase = np.zeros(cap, dtype=np.int64)  # (S,) due at count - W = phase (mod stride): align_next
        self._fill = np.zeros(self._f, dtype=np.float32)  # (F,) a missing value with none before it: set_fill
        self._last_ts = np.full(cap, _TS_MIN, dtype=np.int64)  # (S,) largest accepted ts
        self.n_events = self.n_accepted = self.n_late = self.n_missing = self.n_warming = 0
        from .fastpath import window_kernel  # torch and the extension only when a buffer is made

        self._native = window_kernel(native)

    def set_fill(self, values: np.ndarray) -> None:
        """(F,) what a missing value (NaN) becomes when its stream has no earlier value of the feature: the
        models' centre of the data (their scaler's), so a stream whose first readings lack a feature is no
        anomaly at once (0.0 in raw units, far from a feature centred at 300, scored 170x the threshold)."""
        fill = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if fill.shape != (self._f,) or not np.isfinite(fill).all():
            raise ValueError(f"fill must be {self._f} finite values, got {values!r}")
        self._fill = fill

    # ------------------------------------------------------------------ properties
    @property
    def window(self) -> int:
        return self._w

    @property
    def n_features(self) -> int:
        return self._f

    @property
    def stride(self) -> int:
        return self._stride

    @property
    def keep_timestamps(self) -> bool:
        """Whether ring timestamps are stored (needed by ``last_events``)."""
        return self._ring_ts is not None

    @property
    def capacity(self) -> int:
        """Number of stream slots allocated (stream indices ``0 .. capacity-1`` fit without growing)."""
        return int(self._count.shape[0])

    @property
    def n_streams(self) -> int:
        """Number of streams currently holding state (at least one accepted or seeded event, not reset)."""
        return int(np.count_nonzero(self._count))

    def memory_bytes(self) -> int:
        """Bytes held by the buffer's arrays (allocated size; untouched zero pages are not resident)."""
        arrays = (self._buf, self._count, self._last_ts, self._phase, self._fill, self._ring_ts, self._rot)
        return int(sum(a.nbytes for a in arrays if a is not None))

    # ------------------------------------------------------------------ main entry
    def add(self, stream: np.ndarray, ts: np.ndarray, values: np.ndarray) -> WindowBatch:
        """Apply a batch of events and return the windows that became due, in input order.

        ``stream`` (N,) non-negative ints, ``ts`` (N,) int64 ms, ``values`` (N, F) floats (NaN = missing).
        Events of the same stream are applied in input order.
        """
        stream, ts, values = self._check_batch(stream, ts, values)
        n = stream.shape[0]
        self.n_events += n
        if n == 0:
            return self._empty_batch()
        self._ensure_capacity(int(stream.max()) + 1)
        if self._native is not None:
            return self._add_native(stream, ts, values)
        w = self._w

        order = np.argsort(stream, kind="stable")  # (N,) groups events per stream, input order kept
        s = stream[order]
        t = ts[order]
        starts, gid = sorted_groups(s)
        acc = accept_mask(t, gid, starts, self._last_ts[s[starts]])  # (N,) bool
        if not acc.all():
            order, s, t = order[acc], s[acc], t[acc]
            if s.shape[0] == 0:
                self.n_late += n
                return self._empty_batch()
            starts, gid = sorted_groups(s)
        a = s.shape[0]
        self.n_accepted += a
        self.n_late += n - a

        u = s[starts]  # (G,) streams present
        sizes = np.diff(np.append(starts, a))  # (G,) accepted events per stream
        rank = np.arange(a, dtype=np.int64) - starts[gid]  # (A,) 0-based position within its stream
        c_before = self._count[u]  # (G,)
        c = c_before[gid] + rank + 1  # (A,) accepted count after each event
        vals = values[order]  # (A, F) float32
        nan = np.isnan(vals)
        n_nan = int(np.count_nonzero(nan))
        if n_nan:
            self.n_missing += n_nan
            vals = self._forward_fill(vals, nan, u, c_before, starts, gid)
        self.n_warming += int(np.count_nonzero(c < w))

        due = c >= w
        if self._stride > 1:
            due &= (c - w - self._phase[s]) % self._stride == 0
        idx = np.flatnonzero(due)  # (M,) due events, grouped order
        idx = idx[np.argsort(order[idx])]  # output (input) order
        wins = self._windows(vals, s[idx], c[idx], rank[idx], starts[gid[idx]])  # (M, W, F)

        # Write only the last W accepted events of each stream: no slot is written twice.
        keep = rank >= sizes[gid] - w
        sw = s[keep]
        slot = (c[keep] - 1) % w
        self._buf.reshape(-1, self._f)[sw * w + slot] = vals[keep]  # (S*W, F) view
        if self._ring_ts is not None:
            self._ring_ts[sw, slot] = t[keep]
        self._count[u] = c_before + sizes
        self._last_ts[u] = t[starts + sizes - 1]
        return WindowBatch(s[idx], wins, t[idx], order[idx])

    @property
    def native(self) -> bool:
        """Whether ``add`` runs the C++ kernel."""
        return self._native is not None

    def _add_native(self, stream: np.ndarray, ts: np.ndarray, values: np.ndarray) -> WindowBatch:
        n = stream.shape[0]
        stream, ts, values = (np.ascontiguousarray(a) for a in (stream, ts, values))
        out = np.empty((n, self._w, self._f), dtype=np.float32)  # pages past the due windows are never touched
        idx = np.empty(n, dtype=np.int64)
        m, late, missing, warming = self._native(self._buf, self._ring_ts, self._count, self._last_ts, stream, ts,
                                                 values, self._stride, out, idx, self._fill, self._phase)
        self.n_accepted += n - late
        self.n_late += late
        self.n_missing += missing
        self.n_warming += warming
        idx = idx[:m]
        wins = out[:m] if 2 * m >= n else out[:m].copy()  # few due windows (stride > 1): free the rest now
        return WindowBatch(stream[idx], wins, ts[idx], idx)

    def _windows(self, vals: np.ndarray, s: np.ndarray, c: np.ndarray, k: np.ndarray,
                 first: np.ndarray) -> np.ndarray:
        """Windows of due events, read *before* this batch is written to the ring: (M, W, F).

        ``vals`` (A, F) the batch's accepted values grouped by stream; per due event: stream ``s``,
        count ``c`` after it, rank ``k`` within its stream in this batch and ``first`` row of its stream
        in ``vals``.
        A window holds ``W - 1 - k`` old ring events followed by new events ``first .. first + k``.
        When ``k < W - 1`` it is gathered from the ring starting at slot ``c % W`` (old events, then
        ``k + 1`` stale rows) and its tail is patched from ``vals``; otherwise it is a contiguous slice
        of ``vals``.
        """
        w = self._w
        mixed = k < w - 1  # (M,)
        n_mixed = int(np.count_nonzero(mixed))
        if mixed.shape[0] == 0:
            return np.zeros((0, w, self._f), dtype=np.float32)
        vals_start = np.maximum(first + k - (w - 1), 0)  # (M,) valid rows of vals where k >= W-1
        if n_mixed == 0:
            return self._gather(vals, vals_start)
        # Gather everything from the majority source, then overwrite the minority's windows.
        if 2 * n_mixed >= mixed.shape[0]:
            wins = self._gather_ring(s, c % w)  # (M, W, F)
            if n_mixed < mixed.shape[0]:
                wins[~mixed] = self._gather(vals, vals_start[~mixed])
        else:
            wins = self._gather(vals, vals_start)
            wins[mixed] = self._gather_ring(s[mixed], c[mixed] % w)
        km, fm = k[mixed], first[mixed]
        if int(km.max()) == 0:  # one new event per window: the common case
            wins[mixed, w - 1] = vals[fm]
            return wins
        n_new = km + 1  # (Mm,) rows to patch per window
        rep = np.repeat(np.flatnonzero(mixed), n_new)  # (T,)
        off = np.arange(rep.shape[0]) - np.repeat(np.cumsum(n_new) - n_new, n_new)  # (T,) 0 .. k
        dst = rep * w + np.repeat(w - n_new, n_new) + off
        wins.reshape(-1, self._f)[dst] = vals[np.repeat(fm, n_new) + off]
        return wins

    # ------------------------------------------------------------------ state access
    def stream_count(self, stream: np.ndarray) -> np.ndarray:
        """Events accepted (or seeded) so far for each given stream, (K,) int64; unknown streams give 0."""
        stream = self._check_streams(stream)
        out = np.zeros(stream.shape[0], dtype=np.int64)
        inside = stream < self.capacity
        out[inside] = self._count[stream[inside]]
        return out

    def last_events(self, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """The stream's last ``k <= W`` accepted events, oldest first: ``(ts (k,) int64, values (k, F))``.

        Values are as stored, i.e. with NaNs already forward filled. Raises ``RuntimeError`` when the buffer
        was created with ``keep_timestamps=False``.
        """
        if self._ring_ts is None:
            raise RuntimeError("last_events needs ring timestamps, but this WindowBuffer was created with "
                               "keep_timestamps=False")
        s = self._check_streams(np.asarray([stream]))[0]
        if s >= self.capacity or self._count[s] == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self._f), dtype=np.float32)
        c = int(self._count[s])
        k = min(c, self._w)
        slots = np.arange(c - k, c) % self._w  # (k,)
        return self._ring_ts[s, slots].copy(), self._buf[s, slots].copy()

    def seed(self, stream: int, ts: np.ndarray, values: np.ndarray, count: int | None = None) -> None:
        """Replace a stream's state by the given events (e.g. from ``last_events`` after a rebalance).

        No windows are produced and no counters change. ``ts`` must be non-decreasing (with
        ``keep_timestamps=False`` only its last value is kept, as the stream's latest accepted ts). NaNs are
        forward filled (the fill value when there is no previous value). Only the last ``W`` events are kept. ``count``
        is the stream's accepted count to record (default ``len(ts)``); pass the original ``stream_count`` to
        keep the stride phase counted from the stream's first event (one set by ``align_next`` is not kept). The
        next event may then complete a window.
        """
        s = int(self._check_streams(np.asarray([stream]))[0])
        _, ts_arr, vals = self._check_batch(np.zeros(np.shape(ts)[:1], dtype=np.int64), ts, values)
        k = ts_arr.shape[0]
        cnt = k if count is None else int(count)
        if cnt < k:
            raise ValueError(f"count ({cnt}) must be >= the number of seeded events ({k})")
        if k > 1 and np.any(np.diff(ts_arr) < 0):
            raise ValueError("seed timestamps must be non-decreasing")
        self._ensure_capacity(s + 1)
        self.reset_streams(np.asarray([s]))
        if k == 0:
            return
        if np.isnan(vals).any():
            z = np.zeros((1,), dtype=np.int64)
            vals = self._forward_fill(vals, np.isnan(vals), np.asarray([s]), z, z, np.zeros(k, np.int64))
        ts_arr, vals = ts_arr[-self._w:], vals[-self._w:]
        slots = np.arange(cnt - ts_arr.shape[0], cnt) % self._w
        self._buf[s, slots] = vals
        if self._ring_ts is not None:
            self._ring_ts[s, slots] = ts_arr
        self._count[s] = cnt
        self._last_ts[s] = ts_arr[-1]

    def align_next(self, stream: np.ndarray) -> None:
        """With a stride, make the next accepted event of each of these streams close a due window (or its first
        full one, when it has fewer than W events), and every stride-th after it. After a rebuild, the stream's
        count starts at wherever the replay began: the phase the old owner kept is lost, and with a stride over
        W / 2 the events it had read but not yet scored in any window could fall in none."""
        if self._stride == 1:
            return
        stream = self._check_streams(stream)
        self._ensure_capacity(int(stream.max()) + 1 if stream.size else 0)
        self._phase[stream] = (np.maximum(self._count[stream] + 1, self._w) - self._w) % self._stride

    def largest_ts(self, stream: np.ndarray) -> np.ndarray:
        """(N,) each stream's largest accepted timestamp so far (int64 min before its first event)."""
        stream = self._check_streams(stream)  # a negative index read another stream's (from the end)
        return np.where(stream < self.capacity, self._last_ts[np.minimum(stream, self.capacity - 1)], _TS_MIN)

    def reset_streams(self, stream: np.ndarray) -> None:
        """Forget the given streams (e.g. partition revoked); they start afresh on their next event."""
        stream = self._check_streams(stream)
        stream = stream[stream < self.capacity]
        self._count[stream] = 0
        self._phase[stream] = 0
        self._last_ts[stream] = _TS_MIN

    # ------------------------------------------------------------------ helpers
    def _forward_fill(self, vals: np.ndarray, nan: np.ndarray, u: np.ndarray, c_before: np.ndarray,
                      starts: np.ndarray, gid: np.ndarray) -> np.ndarray:
        """Replace NaNs by the previous value of the same stream and feature (the fill value when there is none).

        ``vals`` (A, F) grouped by stream (``starts`` (G,), ``gid`` (A,)); ``u`` (G,) streams,
        ``c_before`` (G,) their accepted counts before these events (the ring's newest value fills the
        NaNs that have no earlier value in the batch).
        """
        src = np.where(nan, -1, np.arange(vals.shape[0], dtype=np.int64)[:, None])  # (A, F)
        np.maximum.accumulate(src, axis=0, out=src)  # last non-NaN row so far, per feature
        r, f = np.nonzero(nan)  # (K,) NaN cells
        j = src[r, f]
        g = gid[r]
        own = j >= starts[g]  # a non-NaN value of the same stream earlier in the batch
        fill = self._fill[f]  # (K,) a copy
        fill[own] = vals[j[own], f[own]]
        ring = ~own & (c_before[g] > 0)  # take the stream's newest stored value
        if ring.any():
            gr = g[ring]
            fill[ring] = self._buf[u[gr], (c_before[gr] - 1) % self._w, f[ring]]
        out = vals.copy()
        out[r, f] = fill
        return out

    def _gather_ring(self, s: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Ring windows: slots ``p, p+1, .. (mod W)`` of streams ``s`` (both (M,)), (M, W, F) float32."""
        w = self._w
        if self._rot is not None:
            rows = np.take(self._rot, p, axis=0)  # (M, W) slots
            rows += (s * w)[:, None]  # rows of the (S*W,) view below
        else:
            ar = np.arange(w, dtype=np.int64)
            rows = (s * w + p)[:, None] + ar  # (M, W)
            np.subtract(rows, w, out=rows, where=ar >= (w - p)[:, None])  # wrap around the ring
        # One opaque F*4-byte element per ring row: np.take then copies whole rows; indices are in range.
        flat = self._buf.view(np.dtype((np.void, self._f * 4))).reshape(-1)  # (S*W,)
        out = np.take(flat, rows.reshape(-1), mode="clip")  # (M*W,)
        return out.view(np.float32).reshape(s.shape[0], w, self._f)

    def _gather(self, arr: np.ndarray, start_rows: np.ndarray) -> np.ndarray:
        """Copy ``W`` consecutive F-rows of C-contiguous ``arr`` from each of ``start_rows``: (M, W, F)."""
        w, f = self._w, self._f
        rows = arr.size // f
        blk = np.dtype((np.void, w * f * 4))
        # One opaque W*F*4-byte element per possible start row: fancy indexing is then one memcpy per window.
        view = np.ndarray(shape=(rows - w + 1,), dtype=blk, buffer=arr, offset=0, strides=(f * 4,))
        return view[start_rows].view(np.float32).reshape(start_rows.shape[0], w, f)

    def _ensure_capacity(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new = max(needed, 2 * cap)
        self._buf = _grown(self._buf, new)
        if self._ring_ts is not None:
            self._ring_ts = _grown(self._ring_ts, new)
        self._count = np.concatenate([self._count, np.zeros(new - cap, dtype=np.int64)])
        self._phase = np.concatenate([self._phase, np.zeros(new - cap, dtype=np.int64)])
        self._last_ts = np.concatenate([self._last_ts, np.full(new - cap, _TS_MIN, dtype=np.int64)])

    def _empty_batch(self) -> WindowBatch:
        e = np.zeros(0, dtype=np.int64)
        return WindowBatch(e, np.zeros((0, self._w, self._f), dtype=np.float32), e.copy(), e.copy())

    def _check_streams(self, stream: np.ndarray) -> np.ndarray:
        stream = np.asarray(stream)
        if stream.ndim != 1 or (stream.size and not np.issubdtype(stream.dtype, np.integer)):
            raise ValueError(
                f"stream must be a 1-D integer array, got shape {stream.shape} dtype {stream.dtype}")
        stream = stream.astype(np.int64, copy=False)
        if stream.size and stream.min() < 0:
            raise ValueError("stream indices must be >= 0")
        return stream

    def _check_batch(self, stream: np.ndarray, ts: np.ndarray,
                     values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stream = self._check_streams(stream)
        n = stream.shape[0]
        ts = np.asarray(ts)
        if ts.shape != (n,) or (n and not np.issubdtype(ts.dtype, np.integer)):
            raise ValueError(
                f"ts must be an integer array of shape ({n},), got shape {ts.shape} dtype {ts.dtype}")
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (n, self._f):
            raise ValueError(f"values must have shape ({n}, {self._f}), got {values.shape}")
        return stream, ts.astype(np.int64, copy=False), values


def _grown(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` (S, ...) copied into the first rows of a new zero array (n, ...); untouched rows stay lazy."""
    out = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
