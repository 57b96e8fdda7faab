"""WindowBuffer against a simple per-stream deque reference on random event orders."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from detector import windows as windows_module
from detector.windows import WindowBatch, WindowBuffer


@pytest.fixture(autouse=True, params=["numpy", "native"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against both implementations of ``WindowBuffer.add``."""
    monkeypatch.setenv("ANOMALYD_NATIVE_WINDOWS", "off" if request.param == "numpy" else "on")
    return request.param


def test_implementation_is_the_one_asked_for(implementation: str) -> None:
    assert WindowBuffer(4, 2).native == (implementation == "native")
    assert not WindowBuffer(4, 2, native=False).native


def test_required_kernel_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from detector import fastpath

    monkeypatch.setattr(fastpath, "load_extension", lambda build=True: None)  # no compiler and no prebuilt kernel
    with pytest.raises(RuntimeError, match="native window kernel is required"):
        WindowBuffer(4, 2, native=True)
    monkeypatch.setenv("ANOMALYD_NATIVE_WINDOWS", "auto")
    assert not WindowBuffer(4, 2).native  # auto falls back to numpy


class _RefBuffer:
    """Event-by-event reference: one deque of the last W (ts, values) per stream."""

    def __init__(self, window: int, n_features: int, stride: int) -> None:
        self.w, self.f, self.stride = window, n_features, stride
        self.rings: dict[int, deque] = {}
        self.count: dict[int, int] = {}
        self.last_ts: dict[int, int] = {}
        self.n_events = self.n_accepted = self.n_late = self.n_missing = self.n_warming = 0

    def add(self, stream, ts, values) -> list[tuple[int, np.ndarray, int, int]]:
        out = []
        for i, (s, t, v) in enumerate(zip(stream.tolist(), ts.tolist(), values, strict=True)):
            self.n_events += 1
            if s in self.last_ts and t < self.last_ts[s]:
                self.n_late += 1
                continue
            self.n_accepted += 1
            ring = self.rings.setdefault(s, deque(maxlen=self.w))
            prev = ring[-1][1] if ring else np.zeros(self.f, dtype=np.float32)
            v = np.asarray(v, dtype=np.float32).copy()
            nan = np.isnan(v)
            self.n_missing += int(nan.sum())
            v[nan] = prev[nan]
            ring.append((t, v))
            self.last_ts[s] = t
            c = self.count[s] = self.count.get(s, 0) + 1
            if c < self.w:
                self.n_warming += 1
            elif (c - self.w) % self.stride == 0:
                out.append((s, np.stack([x[1] for x in ring]), t, i))
        return out

    def reset(self, streams) -> None:
        for s in np.asarray(streams).tolist():
            self.rings.pop(s, None)
            self.count.pop(s, None)
            self.last_ts.pop(s, None)


def _assert_same(batch: WindowBatch, ref_out: list, w: int, f: int) -> None:
    assert len(batch) == len(ref_out)
    assert batch.windows.shape == (len(ref_out), w, f) and batch.windows.dtype == np.float32
    for a in (batch.stream, batch.ts, batch.event_index):
        assert a.dtype == np.int64 and a.shape == (len(ref_out),)
    if ref_out:
        np.testing.assert_array_equal(batch.stream, [r[0] for r in ref_out])
        np.testing.assert_array_equal(batch.windows, np.stack([r[1] for r in ref_out]))
        np.testing.assert_array_equal(batch.ts, [r[2] for r in ref_out])
        np.testing.assert_array_equal(batch.event_index, [r[3] for r in ref_out])


def _assert_state(buf: WindowBuffer, ref: _RefBuffer, n_streams_seen: int) -> None:
    for name in ("n_events", "n_accepted", "n_late", "n_missing", "n_warming"):
        assert getattr(buf, name) == getattr(ref, name), name
    ids = np.arange(n_streams_seen + 3)
    np.testing.assert_array_equal(buf.stream_count(ids), [ref.count.get(s, 0) for s in ids.tolist()])
    assert buf.n_streams == sum(1 for c in ref.count.values() if c > 0)
    if not buf.keep_timestamps:
        return
    for s in ids.tolist():
        ts, vals = buf.last_events(s)
        ring = ref.rings.get(s, ())
        np.testing.assert_array_equal(ts, [x[0] for x in ring])
        assert vals.shape == (len(ring), buf.n_features)
        if ring:
            np.testing.assert_array_equal(vals, np.stack([x[1] for x in ring]))


def _random_batch(rng: np.random.Generator, n: int, n_streams: int, f: int, clock: np.ndarray,
                  nan_p: float, late_p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random events; per-stream clocks advance, some events jump back in time, some repeat a timestamp."""
    stream = rng.integers(0, n_streams, n)
    ts = np.empty(n, dtype=np.int64)
    for i, s in enumerate(stream.tolist()):  # test data only
        r = rng.random()
        if r < late_p:
            ts[i] = clock[s] - rng.integers(1, 50)
        else:
            clock[s] += 0 if r < late_p + 0.1 else rng.integers(1, 20)
            ts[i] = clock[s]
    values = rng.normal(size=(n, f)).astype(np.float32)
    values[rng.random((n, f)) < nan_p] = np.nan
    return stream, ts, values


def _random_schedule(w: int, f: int, seed: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """40 random batches: sizes 0 .. 200, new streams appearing, some batches of one stream (> 2W events of
    it), ~20% NaN values and ~15% late events."""
    rng = np.random.default_rng(seed)
    clock = np.zeros(64, dtype=np.int64)
    n_streams = 2
    sizes = [0, 1, 2, 7, 40, 3 * w * 2 + 5, 200, 1, 13, 150, 5]
    for step in range(40):
        n = sizes[step % len(sizes)]
        if step % 6 == 5:
            n_streams = min(64, n_streams + 5)  # new streams appear mid-way
        # few streams in big batches -> many (> 2W) events of one stream per batch
        k = 1 if step % 7 == 3 else n_streams
        stream, ts, values = _random_batch(rng, n, k, f, clock, nan_p=0.2, late_p=0.15)
        if k == 1:
            stream[:] = n_streams - 1 if step % 2 else 0
            ts = np.sort(ts) if step % 3 else ts
        yield n_streams, stream, ts, values


_RANDOM_CASES = [(1, 2, 1, 0), (2, 1, 1, 1), (3, 2, 3, 2), (4, 3, 1, 3), (5, 2, 3, 4), (8, 1, 2, 5), (3, 1, 1, 6)]


@pytest.mark.parametrize("keep_ts", [True, False])
@pytest.mark.parametrize("w,f,stride,seed", _RANDOM_CASES)
def test_matches_reference_on_random_batches(w: int, f: int, stride: int, seed: int, keep_ts: bool) -> None:
    buf = WindowBuffer(w, f, stride=stride, initial_capacity=2, keep_timestamps=keep_ts)
    ref = _RefBuffer(w, f, stride)
    for n_streams, stream, ts, values in _random_schedule(w, f, seed):
        _assert_same(buf.add(stream, ts, values), ref.add(stream, ts, values), w, f)
        _assert_state(buf, ref, n_streams)
    assert buf.n_accepted > 500 and buf.n_late > 20 and buf.n_missing > 100


@pytest.mark.parametrize("w,f,stride,seed", _RANDOM_CASES[1::2])
def test_without_rotation_table_matches_reference(w: int, f: int, stride: int, seed: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows longer than _ROT_TABLE_MAX_W compute ring slots per call; force that path on small windows."""
    monkeypatch.setattr(windows_module, "_ROT_TABLE_MAX_W", 0)
    buf = WindowBuffer(w, f, stride=stride, initial_capacity=2)
    assert buf.memory_bytes() == 2 * (w * f * 4 + w * 8 + 24) + f * 4  # no (W, W) table
    ref = _RefBuffer(w, f, stride)
    for n_streams, stream, ts, values in _random_schedule(w, f, seed):
        _assert_same(buf.add(stream, ts, values), ref.add(stream, ts, values), w, f)
        _assert_state(buf, ref, n_streams)


@pytest.mark.parametrize("w,f,stride,seed", [(4, 3, 1, 10), (6, 2, 4, 11), (2, 1, 1, 12)])
def test_without_timestamps_same_windows_as_with(w: int, f: int, stride: int, seed: int) -> None:
    with_ts = WindowBuffer(w, f, stride=stride, initial_capacity=1)
    no_ts = WindowBuffer(w, f, stride=stride, initial_capacity=1, keep_timestamps=False)
    assert with_ts.keep_timestamps and not no_ts.keep_timestamps
    n_windows = 0
    for n_streams, stream, ts, values in _random_schedule(w, f, seed):
        a, b = with_ts.add(stream, ts, values), no_ts.add(stream, ts, values)
        for name in ("stream", "windows", "ts", "event_index"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        n_windows += len(a)
        for name in ("n_events", "n_accepted", "n_late", "n_missing", "n_warming", "capacity", "n_streams"):
            assert getattr(with_ts, name) == getattr(no_ts, name), name
        ids = np.arange(n_streams)
        np.testing.assert_array_equal(with_ts.stream_count(ids), no_ts.stream_count(ids))
    assert n_windows > 100 and no_ts.n_late > 20
    assert no_ts.memory_bytes() == with_ts.memory_bytes() - with_ts.capacity * w * 8


def test_without_timestamps_last_events_raises_and_seed_works() -> None:
    w, f, stride = 4, 2, 3
    rng = np.random.default_rng(21)
    src = WindowBuffer(w, f, stride=stride)
    clock = np.zeros(6, dtype=np.int64)
    src.add(*_random_batch(rng, 60, 6, f, clock, nan_p=0.2, late_p=0.1))
    a = WindowBuffer(w, f, stride=stride)
    b = WindowBuffer(w, f, stride=stride, keep_timestamps=False, initial_capacity=1)
    counts = src.stream_count(np.arange(6))
    for s in range(6):
        ts, vals = src.last_events(s)
        a.seed(s, ts, vals, count=int(counts[s]))
        b.seed(s, ts, vals, count=int(counts[s]))
    with pytest.raises(RuntimeError, match="keep_timestamps=False"):
        b.last_events(0)
    np.testing.assert_array_equal(b.stream_count(np.arange(6)), counts)
    assert (b.n_events, b.n_accepted, b.n_streams) == (0, 0, 6)
    n_windows = 0
    for n in (1, 40, 7, 25):
        batch = _random_batch(rng, n, 6, f, clock, nan_p=0.2, late_p=0.2)
        oa, ob = a.add(*batch), b.add(*batch)
        for name in ("stream", "windows", "ts", "event_index"):
            np.testing.assert_array_equal(getattr(oa, name), getattr(ob, name))
        n_windows += len(oa)
        assert (a.n_late, a.n_missing) == (b.n_late, b.n_missing)
    assert n_windows > 10 and b.n_late > 0
    late = b.n_late
    b.seed(9, np.array([5, 7]), np.array([[1.0, np.nan], [np.nan, 2.0]]))  # grows, forward fills
    assert b.capacity == 16 and b.stream_count(np.array([9]))[0] == 2
    out = b.add(np.array([9, 9, 9]), np.array([6, 8, 9]), np.array([[0.0, 0.0], [3.0, 3.0], [4.0, 4.0]]))
    assert b.n_late == late + 1 and list(out.event_index) == [2]  # ts 6 < seeded last ts 7 is late
    np.testing.assert_array_equal(out.windows[0], [[1.0, 0.0], [1.0, 2.0], [3.0, 3.0], [4.0, 4.0]])


@pytest.mark.parametrize("keep_ts", [False, True])
def test_memory_per_stream_is_one_float32_ring(keep_ts: bool) -> None:
    w, f, cap = 64, 8, 100_000
    buf = WindowBuffer(w, f, initial_capacity=cap, keep_timestamps=keep_ts)
    # counters: count, largest ts and stride phase (the phase was left out); fill: F float32 for the buffer
    ring, counters, ts_ring, table, fill = w * f * 4, 3 * 8, w * 8 if keep_ts else 0, w * w * 8, f * 4
    assert buf.memory_bytes() == cap * (ring + counters + ts_ring) + table + fill
    arrays = [buf._buf, buf._count, buf._last_ts, buf._phase, buf._fill, buf._rot] + [buf._ring_ts] * keep_ts
    assert buf.memory_bytes() == sum(a.nbytes for a in arrays)
    if not keep_ts:
        assert ring == 2048 and buf.memory_bytes() / cap <= 2048 + 32  # one (W, F) float32 ring + counters
    buf.add(np.array([cap]), np.array([0]), np.zeros((1, f)))  # grows to 2 * cap
    assert buf.capacity == 2 * cap
    assert buf.memory_bytes() == 2 * cap * (ring + counters + ts_ring) + table + fill


def test_long_single_stream_batches_more_than_2w() -> None:
    w, f = 4, 2
    buf, ref = WindowBuffer(w, f, stride=3), _RefBuffer(w, f, 3)
    rng = np.random.default_rng(7)
    t0 = 0
    for n in (3, 1, 25, 9, 2, 31):
        ts = t0 + np.arange(n, dtype=np.int64)
        t0 += n
        stream = np.zeros(n, dtype=np.int64)
        stream[::5] = 1
        values = rng.normal(size=(n, f)).astype(np.float32)
        out = buf.add(stream, ts, values)
        expected = ref.add(stream, ts, values)
        _assert_same(out, expected, w, f)
    assert buf.n_accepted == 71 and buf.n_late == 0


def test_huge_timestamp_span_uses_rank_path() -> None:
    w, f = 2, 1
    buf, ref = WindowBuffer(w, f), _RefBuffer(w, f, 1)
    rng = np.random.default_rng(11)
    i64 = np.iinfo(np.int64)
    big = np.array([-(2**62), -5, 0, 3, 2**62, i64.max, i64.min], dtype=np.int64)
    for _ in range(5):
        n = 60
        stream = rng.integers(0, 20, n)
        ts = big[rng.integers(0, big.size, n)]
        values = rng.normal(size=(n, f)).astype(np.float32)
        _assert_same(buf.add(stream, ts, values), ref.add(stream, ts, values), w, f)
        _assert_state(buf, ref, 20)
    assert buf.n_late > 0


def test_nan_without_history_is_zero_and_counted() -> None:
    buf = WindowBuffer(2, 2)
    out = buf.add(np.array([0, 0]), np.array([1, 2]), np.array([[np.nan, 1.0], [2.0, np.nan]]))
    assert buf.n_missing == 2
    np.testing.assert_array_equal(out.windows[0], [[0.0, 1.0], [2.0, 1.0]])


def test_nan_without_history_takes_the_fill_value_in_a_batch_and_in_a_seed() -> None:
    buf = WindowBuffer(3, 2)
    buf.set_fill(np.array([300.0, 5.0]))
    out = buf.add(np.array([0, 0, 1, 0]), np.array([1, 2, 1, 3]),
                  np.array([[np.nan, 1.0], [301.0, np.nan], [np.nan, np.nan], [np.nan, 2.0]]))
    np.testing.assert_array_equal(out.windows[0], [[300.0, 1.0], [301.0, 1.0], [301.0, 2.0]])
    assert buf.n_missing == 5
    buf.seed(2, np.array([1, 2]), np.array([[np.nan, 7.0], [8.0, np.nan]]))
    np.testing.assert_array_equal(buf.add(np.array([2]), np.array([3]), np.array([[9.0, 9.0]])).windows[0],
                                  [[300.0, 7.0], [8.0, 7.0], [9.0, 9.0]])
    with pytest.raises(ValueError, match="2 finite values"):
        buf.set_fill(np.array([1.0, np.nan]))


def test_equal_timestamp_is_accepted_and_older_dropped() -> None:
    buf = WindowBuffer(2, 1)
    buf.add(np.array([3]), np.array([10]), np.ones((1, 1)))
    out = buf.add(np.array([3, 3, 3]), np.array([10, 9, 11]), np.array([[2.0], [5.0], [3.0]]))
    assert (buf.n_accepted, buf.n_late, buf.n_warming) == (3, 1, 1)
    np.testing.assert_array_equal(out.event_index, [0, 2])
    np.testing.assert_array_equal(out.windows[:, :, 0], [[1.0, 2.0], [2.0, 3.0]])


def test_seed_last_events_round_trip() -> None:
    w, f, stride = 4, 2, 3
    rng = np.random.default_rng(3)
    a = WindowBuffer(w, f, stride=stride)
    clock = np.zeros(10, dtype=np.int64)
    for n in (30, 50):
        a.add(*_random_batch(rng, n, 10, f, clock, nan_p=0.2, late_p=0.1))
    b = WindowBuffer(w, f, stride=stride, initial_capacity=1)
    counts = a.stream_count(np.arange(10))
    for s in range(10):
        ts, vals = a.last_events(s)
        b.seed(s, ts, vals, count=int(counts[s]))
    assert (b.n_events, b.n_accepted, b.n_missing) == (0, 0, 0)
    np.testing.assert_array_equal(b.stream_count(np.arange(10)), counts)
    for s in range(10):
        for x, y in zip(a.last_events(s), b.last_events(s), strict=True):
            np.testing.assert_array_equal(x, y)
    for n in (1, 40, 7):
        batch = _random_batch(rng, n, 10, f, clock, nan_p=0.2, late_p=0.1)
        oa, ob = a.add(*batch), b.add(*batch)
        for name in ("stream", "windows", "ts", "event_index"):
            np.testing.assert_array_equal(getattr(oa, name), getattr(ob, name))
        assert len(oa) > 0 or n == 1


def test_seed_completes_window_on_next_event() -> None:
    buf = WindowBuffer(3, 1)
    buf.seed(5, np.array([1, 2]), np.array([[np.nan], [4.0]]))
    assert buf.n_missing == 0 and buf.n_streams == 1
    out = buf.add(np.array([5]), np.array([3]), np.array([[6.0]]))
    np.testing.assert_array_equal(out.windows[0, :, 0], [0.0, 4.0, 6.0])
    assert len(buf.add(np.array([5]), np.array([2]), np.array([[1.0]]))) == 0  # late vs seeded ts
    with pytest.raises(ValueError, match="non-decreasing"):
        buf.seed(1, np.array([2, 1]), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="count"):
        buf.seed(1, np.array([1, 2]), np.zeros((2, 1)), count=1)


@pytest.mark.parametrize("keep_ts", [True, False])
def test_reset_streams_forgets_state(keep_ts: bool) -> None:
    w, f = 3, 2
    rng = np.random.default_rng(5)
    buf, ref = WindowBuffer(w, f, stride=1, keep_timestamps=keep_ts), _RefBuffer(w, f, 1)
    clock = np.zeros(12, dtype=np.int64)
    for step in range(12):
        batch = _random_batch(rng, 25, 12, f, clock, nan_p=0.3, late_p=0.2)
        _assert_same(buf.add(*batch), ref.add(*batch), w, f)
        if step % 3 == 1:
            gone = rng.choice(12, size=4, replace=False)
            buf.reset_streams(np.append(gone, 10_000))  # unknown index is ignored
            ref.reset(gone)
            clock[gone] -= 100  # a reset stream accepts any timestamp again
        _assert_state(buf, ref, 12)


def test_capacity_grows_geometrically_and_memory_fits() -> None:
    buf = WindowBuffer(2, 1, initial_capacity=1)
    buf.add(np.array([0]), np.array([0]), np.zeros((1, 1)))
    assert buf.capacity == 1
    buf.add(np.array([1]), np.array([0]), np.zeros((1, 1)))
    assert buf.capacity == 2
    buf.add(np.array([2]), np.array([0]), np.zeros((1, 1)))
    assert buf.capacity == 4
    buf.add(np.array([100]), np.array([0]), np.zeros((1, 1)))
    assert buf.capacity == 101 and buf.n_streams == 4
    np.testing.assert_array_equal(buf.stream_count(np.array([0, 1, 2, 3, 100, 5000])), [1, 1, 1, 0, 1, 0])
    big = WindowBuffer(64, 8, initial_capacity=100_000)  # zero pages are not touched until written
    assert big.memory_bytes() < 2**30 // 2
    assert (big.window, big.n_features, big.stride, big.n_streams) == (64, 8, 1, 0)


def test_empty_and_all_late_batches() -> None:
    buf = WindowBuffer(2, 3)
    out = buf.add(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, 3)))
    assert len(out) == 0 and out.windows.shape == (0, 2, 3)
    buf.add(np.array([0, 0]), np.array([5, 6]), np.ones((2, 3)))
    out = buf.add(np.array([0, 0]), np.array([1, 2]), np.ones((2, 3)))
    assert len(out) == 0 and buf.n_late == 2 and buf.n_events == 4


@pytest.mark.parametrize("kwargs", [dict(window=0, n_features=1), dict(window=2, n_features=0),
                                    dict(window=2, n_features=1, stride=0)])
def test_constructor_rejects_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WindowBuffer(**kwargs)


def test_add_rejects_bad_input() -> None:
    buf = WindowBuffer(2, 2)
    with pytest.raises(ValueError, match="values"):
        buf.add(np.array([0]), np.array([1]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="ts"):
        buf.add(np.array([0]), np.array([1.5]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=">= 0"):
        buf.add(np.array([-1]), np.array([1]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="stream"):
        buf.add(np.array([0.0]), np.array([1]), np.zeros((1, 2)))
    assert buf.n_events == 0


def test_largest_ts_rejects_negative_indices_as_every_accessor_does() -> None:
    """-1 read the last slot's timestamp (another stream's) instead of being refused."""
    buf = WindowBuffer(2, 1, initial_capacity=4)
    buf.add(np.array([3]), np.array([77]), np.zeros((1, 1)))
    assert buf.largest_ts(np.array([3, 0, 9])).tolist() == [77, np.iinfo(np.int64).min, np.iinfo(np.int64).min]
    with pytest.raises(ValueError, match=">= 0"):
        buf.largest_ts(np.array([-1]))
    with pytest.raises(ValueError, match="stream"):
        buf.largest_ts(np.array([0.5]))


def test_align_next_makes_the_next_accepted_event_due_and_every_stride_th_after_it() -> None:
    buf = WindowBuffer(4, 1, stride=3)

    def due_counts(n: int, first_ts: int) -> list[int]:
        s = np.array([5] * n)
        before = int(buf.stream_count(np.array([5]))[0])
        wb = buf.add(s, np.arange(first_ts, first_ts + n), np.zeros((n, 1), np.float32))
        return [before + int(i) + 1 for i in wb.event_index]  # the count each due event reached

    assert due_counts(10, 0) == [4, 7, 10]
    buf.align_next(np.array([5]))
    buf.add(np.array([5]), np.array([0]), np.zeros((1, 1), np.float32))  # late: dropped, not the next accepted one
    assert due_counts(6, 10) == [11, 14]  # (11 - 4) % 3 == 1: the phase moved by 1
    buf.align_next(np.array([7]))  # fewer than W events: its first full window is due
    assert buf.add(np.array([7] * 5), np.arange(5), np.zeros((5, 1), np.float32)).event_index.tolist() == [3]
    buf.reset_streams(np.array([5]))  # a stream forgotten starts afresh, its phase too
    assert due_counts(7, 0) == [4, 7]
