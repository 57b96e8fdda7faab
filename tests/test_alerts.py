"""AlertTracker: k-of-n opening, staying open, m-consecutive resolving, cooldown, ids, payload, batching."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from pipelines.alert_message import FIRING, RESOLVED, Alert, alert_id
from pipelines.alerts import AlertTracker

NAMES = [f"pump-{i}" for i in range(8)]
FEATURES = ["temp", "pressure", "flow"]


@dataclass
class W:
    """One scored window (test input)."""

    stream: int
    over: bool
    ts: int
    offset: int
    score: float = 0.5
    topic: str = "sensors"
    partition: int = 0
    contrib: tuple[float, ...] = (1.0, 1.0, 1.0)
    models_over: tuple[str, ...] = ()


def feed(tracker: AlertTracker, windows: list[W], sizes: list[int] | None = None, **kw) -> list[Alert]:
    """Feed ``windows`` to ``tracker`` in micro-batches of the given sizes (default: one batch)."""
    sizes = sizes or [len(windows)]
    all_with_mo = kw.get("with_models_over", False)
    alerts: list[Alert] = []
    pos = 0
    for size in sizes:
        batch = windows[pos : pos + size]
        pos += size
        if not batch:
            continue
        with_mo = all_with_mo or any(w.models_over for w in batch)
        alerts += tracker.observe(
            stream_idx=np.array([w.stream for w in batch]),
            score=np.array([w.score for w in batch]),
            over=np.array([w.over for w in batch]),
            ts_ms=np.array([w.ts for w in batch]),
            topic=[w.topic for w in batch],
            partition=np.array([w.partition for w in batch]),
            offset=np.array([w.offset for w in batch]),
            contributions=np.array([w.contrib for w in batch]),
            feature_names=FEATURES,
            model=kw.get("model", "sensors-gru"),
            model_version="v1",
            models_over=None if not with_mo
            else {j: list(w.models_over) for j, w in enumerate(batch) if w.over} if kw.get("models_over_mapping")
            else [list(w.models_over) for w in batch],
            stream_names=NAMES,
            threshold=2.5,
        )
    assert pos >= len(windows)
    return alerts


def series(stream: int, pattern: str, t0: int = 0, off0: int = 0, dt: int = 1000) -> list[W]:
    """Windows of one stream from a pattern like "1.1.." (1 = over threshold); score 2.0 if over."""
    return [W(stream, c == "1", t0 + i * dt, off0 + i, score=2.0 if c == "1" else 0.5) for i, c in enumerate(pattern)]


class RefTracker:
    """Straightforward per-window reference implementation of the alert rules (dict state, lists)."""

    def __init__(self, k: int, n: int, m: int, cooldown_ms: int, top: int):
        self.k, self.n, self.m, self.cooldown_ms, self.top = k, n, m, cooldown_ms, top
        self.hist: dict[int, list[W]] = {}  # last n windows of closed streams
        self.inc: dict[int, dict] = {}
        self.cooldown_until: dict[int, int] = {}

    @staticmethod
    def _shares(w: W) -> np.ndarray | None:
        a = np.abs(np.array(w.contrib, dtype=np.float64))
        return a / a.sum() if a.sum() > 0 else None

    def _add(self, inc: dict, w: W) -> None:
        inc["peak"] = max(inc["peak"], w.score)
        if w.over:
            sh = self._shares(w)
            if sh is not None:
                inc["shares"].append(sh)
            for name in w.models_over or ("sensors-gru",):
                if name not in inc["mo"]:
                    inc["mo"].append(name)

    def _alert(self, inc: dict, status: str, ended: int | None) -> dict:
        top = []
        if inc["shares"]:
            mean = np.sum(inc["shares"], axis=0) / len(inc["shares"])
            top = [{"feature": FEATURES[j], "share": float(mean[j])} for j in np.argsort(-mean, kind="stable")]
        first = inc["first"]
        return {
            "id": alert_id(NAMES[first.stream], "sensors-gru", first.topic, first.partition, first.offset),
            "status": status, "stream": NAMES[first.stream], "model": "sensors-gru", "model_version": "v1",
            "started_at": first.ts, "ended_at": ended, "peak_score": inc["peak"], "threshold": 2.5,
            "models_over": list(inc["mo"]), "top_features": top[: self.top],
            "source": {"topic": first.topic, "partition": first.partition, "first_offset": first.offset,
                       "last_offset": inc["last"]},
        }  # fmt: skip

    def step(self, w: W) -> list[dict]:
        inc = self.inc.get(w.stream)
        if inc is not None:
            if (w.topic, w.partition) == (inc["first"].topic, inc["first"].partition):
                inc["last"] = w.offset
            self._add(inc, w)
            inc["normal"] = 0 if w.over else inc["normal"] + 1
            if inc["normal"] < self.m:
                return []
            del self.inc[w.stream]
            self.cooldown_until[w.stream] = w.ts + self.cooldown_ms
            self.hist.pop(w.stream, None)
            return [self._alert(inc, RESOLVED, w.ts)]
        hist = self.hist.setdefault(w.stream, [])
        hist.append(w)
        del hist[: -self.n]
        hits = [h for h in hist if h.over]
        if len(hits) < self.k or w.ts < self.cooldown_until.get(w.stream, -(2**62)):
            return []
        inc = {"first": hits[0], "peak": float("-inf"), "shares": [], "mo": [], "normal": 0, "last": 0}
        inc["last"] = w.offset if (w.topic, w.partition) == (hits[0].topic, hits[0].partition) else hits[0].offset
        for h in hits:
            self._add(inc, h)
        self.inc[w.stream] = inc
        del self.hist[w.stream]
        return [self._alert(inc, FIRING, None)]


def assert_same(got: list[Alert], want: list[dict]) -> None:
    """Tracker alerts equal the reference's dicts (shares compared approximately)."""
    got_d = [a.to_dict() for a in got]
    assert [(a["id"], a["status"]) for a in got_d] == [(a["id"], a["status"]) for a in want]
    for g, w in zip(got_d, want, strict=True):
        tg, tw = g.pop("top_features"), dict(w).pop("top_features")
        assert g == {key: v for key, v in w.items() if key != "top_features"}
        assert [t["feature"] for t in tg] == [t["feature"] for t in tw]
        assert [t["share"] for t in tg] == pytest.approx([t["share"] for t in tw])


def test_opens_after_k_of_last_n() -> None:
    tr = AlertTracker(k=3, n=5, m=10)
    # over at 0, 3, 5: at window 5 the last five are windows 1..5 -> only 2 over: stays closed.
    assert feed(tr, series(0, "100101")) == []
    assert tr.open_incidents == 0
    # window 6 over: windows 2..6 hold 3, 5, 6 -> opens; first anomalous window of the incident = window 3.
    alerts = feed(tr, [W(0, True, 6000, 6, score=3.0)])
    assert [a.status for a in alerts] == [FIRING]
    a = alerts[0]
    assert a.id == alert_id("pump-0", "sensors-gru", "sensors", 0, 3)
    assert (a.started_at, a.ended_at, a.peak_score, a.threshold) == (3000, None, 3.0, 2.5)
    assert a.source == {"topic": "sensors", "partition": 0, "first_offset": 3, "last_offset": 6}
    assert tr.open_incidents == 1


def test_stays_open_and_resolves_after_m_consecutive_normal() -> None:
    tr = AlertTracker(k=2, n=3, m=4)
    pattern = "11" + "000" + "1" + "000" + "1" + "0000" + "000"
    alerts = feed(tr, series(1, pattern, off0=100))
    assert [a.status for a in alerts] == [FIRING, RESOLVED]
    firing, resolved = alerts
    assert firing.id == resolved.id
    # The 4th consecutive normal window after the over window at 9 is window 13.
    assert resolved.ended_at == 13000
    assert resolved.source == {"topic": "sensors", "partition": 0, "first_offset": 100, "last_offset": 113}
    assert resolved.peak_score == 2.0
    assert tr.open_incidents == 0


def test_cooldown_uses_event_time_and_resolve_clears_history() -> None:
    tr = AlertTracker(k=2, n=4, m=2, cooldown_s=10.0)
    alerts = feed(tr, series(0, "1100", t0=0))  # resolves at ts 3000 -> cooldown until 13000
    assert [a.status for a in alerts] == [FIRING, RESOLVED]
    assert feed(tr, series(0, "11111", t0=4000, off0=4)) == []  # ts 4000..8000: in cooldown
    # ts 13000: allowed again; the last 4 windows (offsets 6..8 over, 9 normal) hold 3 over -> opens.
    reopened = feed(tr, [W(0, False, 13000, 9)])
    assert [a.status for a in reopened] == [FIRING]
    assert reopened[0].id == alert_id("pump-0", "sensors-gru", "sensors", 0, 6) != alerts[0].id
    assert reopened[0].started_at == 6000


def test_resolve_clears_last_n_bits_without_cooldown() -> None:
    tr = AlertTracker(k=2, n=5, m=1, cooldown_s=0)
    # After resolving at window 2, windows 0 and 1 no longer count: one more over is not enough.
    alerts = feed(tr, series(0, "1101"))
    assert [a.status for a in alerts] == [FIRING, RESOLVED]
    assert [a.status for a in feed(tr, series(0, "1", t0=5000, off0=4))] == [FIRING]


def test_ids_are_deterministic_across_replay_and_batching() -> None:
    rng = np.random.default_rng(1)
    windows = random_windows(rng, 400)
    a = feed(AlertTracker(k=2, n=4, m=3, cooldown_s=2), windows)
    b = feed(AlertTracker(k=2, n=4, m=3, cooldown_s=2), windows, sizes=[1, 7, 50, 3, 339])
    assert len(a) > 4
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    c = feed(AlertTracker(k=2, n=4, m=3, cooldown_s=2), windows, model="other")
    assert {x.id for x in a}.isdisjoint({x.id for x in c})


def test_several_occurrences_in_one_batch_equal_one_at_a_time() -> None:
    windows = []
    for i, c in enumerate("1101100000000011100000000"):  # two streams interleaved, each window twice
        windows += [W(2, c == "1", 1000 * i, 2 * i, score=1.0 + i), W(5, c != "1", 1000 * i, 2 * i + 1)]
    one_batch = feed(AlertTracker(k=2, n=3, m=4, cooldown_s=1), windows)
    singles = feed(AlertTracker(k=2, n=3, m=4, cooldown_s=1), windows, sizes=[1] * len(windows))
    assert len(one_batch) >= 4
    assert [a.to_dict() for a in one_batch] == [a.to_dict() for a in singles]


def random_windows(rng: np.random.Generator, count: int, streams: int = 6) -> list[W]:
    """Bursty random windows over a few streams, with random contributions and a second partition."""
    hot = rng.random(streams) < 0.5
    out = []
    for i in range(count):
        s = int(rng.integers(streams))
        if rng.random() < 0.05:
            hot[s] = not hot[s]
        over = bool(rng.random() < (0.7 if hot[s] else 0.08))
        contrib = tuple(float(x) for x in rng.random(3) * (rng.random(3) < 0.8))
        mo = tuple(sorted({str(m) for m in rng.choice(["gru", "lstm"], size=int(rng.integers(1, 3)))}))
        out.append(
            W(s, over, ts=200 * i, offset=i, score=float(rng.random() * (3 if over else 1)),
              partition=int(rng.random() < 0.1), contrib=contrib, models_over=mo if over else ())
        )  # fmt: skip
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mapping", [False, True], ids=["models_over_list", "models_over_of_over_windows"])
def test_vectorised_path_matches_reference(seed: int, mapping: bool) -> None:
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(1, 5)), int(rng.integers(4, 8))
    m, cooldown_s, top = int(rng.integers(1, 6)), float(rng.choice([0.0, 2.0, 5.0])), int(rng.integers(1, 4))
    windows = random_windows(rng, 3000)
    ref = RefTracker(k, n, m, int(cooldown_s * 1000), top)
    want = [a for w in windows for a in ref.step(w)]
    sizes = rng.integers(1, [4, 30, 200][seed % 3], size=len(windows)).tolist()
    got = feed(AlertTracker(k, n, m, cooldown_s, top), windows, sizes=sizes, with_models_over=True,
               models_over_mapping=mapping)  # routes pass a mapping holding only the windows over threshold
    assert len(want) > 20
    assert_same(got, want)


def test_payload_fields_top_features_and_models_over() -> None:
    tr = AlertTracker(k=2, n=2, m=1, top_features=2)
    windows = [
        W(3, True, 10, 40, score=1.5, contrib=(3.0, 1.0, 0.0), models_over=("sensors-gru",)),
        W(3, True, 20, 41, score=4.0, contrib=(1.0, 3.0, 0.0), models_over=("sensors-lstm", "sensors-gru")),
        W(3, True, 30, 42, score=2.0, contrib=(0.0, 4.0, 0.0), models_over=("sensors-lstm",)),
        W(3, False, 40, 43, score=0.2),
    ]
    firing, resolved = feed(tr, windows, model="sensors-gru+sensors-lstm")
    assert firing.model == "sensors-gru+sensors-lstm"
    assert firing.models_over == ["sensors-gru", "sensors-lstm"]
    assert firing.top_features == [("temp", 0.5), ("pressure", 0.5)]
    assert firing.peak_score == 4.0
    assert [f for f, _ in resolved.top_features] == ["pressure", "temp"]
    assert [s for _, s in resolved.top_features] == pytest.approx([2 / 3, 1 / 3])
    assert sum(s for _, s in resolved.top_features) <= 1.0
    assert (resolved.started_at, resolved.ended_at) == (10, 40)
    assert resolved.source == {"topic": "sensors", "partition": 0, "first_offset": 40, "last_offset": 43}
    decoded = json.loads(resolved.to_json())
    assert decoded["status"] == "resolved" and decoded["top_features"][0]["feature"] == "pressure"
    assert Alert.from_dict(decoded) == resolved


def test_idle_streams_leave_no_python_state_and_decay_forgets_hits() -> None:
    tr = AlertTracker(k=3, n=4, m=2)
    s = np.arange(100_000) % 5000
    zeros = np.zeros(s.size)
    kw = dict(
        topic="t",
        partition=zeros.astype(int),
        offset=np.arange(s.size),
        stream_names=[str(i) for i in range(5000)],
    )
    assert tr.observe(s, zeros, zeros.astype(bool), np.arange(s.size), **kw) == []
    assert tr._pending == {} and tr.open_incidents == 0
    over = s == 7
    tr.observe(s[:8], zeros[:8] + 2, over[:8], np.arange(8), **kw | {"partition": zeros[:8], "offset": np.arange(8)})
    assert list(tr._pending) == [7]
    tr.observe(s, zeros, zeros.astype(bool), np.arange(s.size), **kw)  # stream 7 decays to 0 in numpy
    assert tr._pending == {}


def test_reset_streams_forgets_open_incident() -> None:
    tr = AlertTracker(k=1, n=1, m=1)
    assert [a.status for a in feed(tr, series(4, "1"))] == [FIRING]
    tr.reset_streams([4, 9999])
    assert tr.open_incidents == 0
    assert feed(tr, series(4, "0", t0=5000, off0=1)) == []


@pytest.mark.parametrize("kw", [dict(k=0), dict(k=6, n=5), dict(n=65, k=1), dict(m=0), dict(cooldown_s=-1)])
def test_rejects_bad_parameters(kw: dict) -> None:
    with pytest.raises(ValueError):
        AlertTracker(**kw)


def test_rejects_contributions_of_wrong_shape() -> None:
    tr = AlertTracker()
    with pytest.raises(ValueError, match="contributions shape"):
        one = np.array([0])
        tr.observe(one, one + 2.0, one == 0, one, "t", one, one, np.ones((1, 2)), FEATURES, stream_names=NAMES)


def test_resolving_a_silent_stream_is_a_resolve_like_any_other() -> None:
    """resolve_streams (a stream gone silent) clears the last-n bits and starts the cooldown, as m normal windows
    do: a single over window after it neither opens an incident (k=2) nor finds missing pending hits."""
    def obs(tr: AlertTracker, overs: list[bool], ts: list[int], off: list[int]) -> list[Alert]:
        n = len(overs)
        return tr.observe(np.zeros(n, int), np.where(overs, 2.0, 0.5), np.array(overs), np.array(ts), "t",
                          np.zeros(n, int), np.array(off), stream_names=["s0"])

    for cooldown_s in (60.0, 0.0):
        tr = AlertTracker(k=2, n=3, m=5, cooldown_s=cooldown_s)
        assert [a.status for a in obs(tr, [True] * 3, [0, 1000, 2000], [0, 1, 2])] == [FIRING]
        assert [(a.status, a.ended_at) for a in tr.resolve_streams(np.array([0]), np.array([2000]))] == [
            (RESOLVED, 2000)]
        assert obs(tr, [False, True], [3000, 4000], [3, 4]) == [] and tr.open_incidents == 0
    assert tr.resolve_streams(np.array([0]), np.array([np.iinfo(np.int64).min])) == []  # nothing open


def test_an_open_incident_handed_over_continues_with_its_id_and_resolves_once() -> None:
    """The last commit before a partition goes carries its open incidents (as JSON); the next owner's tracker
    continues each: the same id and start, no second firing while the anomaly goes on, then one resolved alert
    whose peak, offsets and features are those an owner that never stopped would have reported."""
    windows = series(2, "111" + "1" * 4 + "0" * 5, t0=5000, off0=200)
    for i, w in enumerate(windows):  # the features that drive it change: pressure first, then temp
        w.contrib = (0.0, 3.0, 1.0) if i < 3 else (4.0, 1.0, 0.0)
    windows[5].score = 7.0
    whole = AlertTracker(k=2, n=3, m=5, top_features=2)
    expected = feed(whole, windows)
    assert [a.status for a in expected] == [FIRING, RESOLVED]

    first = AlertTracker(k=2, n=3, m=5, top_features=2)
    (firing,) = feed(first, windows[:4])
    (st, state), = first.handover()
    assert st == 2
    state = json.loads(json.dumps(state))  # through the commit metadata
    second = AlertTracker(k=2, n=3, m=5, top_features=2)
    adopted = second.adopt(9, state, FEATURES)  # a firing alert of the incident now (for Alertmanager's re-posts)
    assert (adopted.status, adopted.id, adopted.started_at, adopted.stream) == (FIRING, firing.id, 5000, "pump-2")
    assert adopted.source["last_offset"] == 203
    assert second.open_incidents == 1
    rest = [W(9, w.over, w.ts, w.offset, w.score, contrib=w.contrib) for w in windows[4:]]
    got = feed(second, rest)
    assert [a.status for a in got] == [RESOLVED]  # no firing again
    assert got[0] == expected[1]  # id, start, end, peak 7.0, last offset, top features
    assert second.open_incidents == 0


def test_a_malformed_handed_over_state_changes_nothing() -> None:
    tr = AlertTracker(k=2, n=3, m=5)
    (firing,) = feed(AlertTracker(k=2, n=3, m=5), series(1, "11"))
    donor = AlertTracker(k=2, n=3, m=5)
    feed(donor, series(1, "11"))
    (_, state), = donor.handover()
    for broken in ({k: v for k, v in state.items() if k != "peak"}, {**state, "first": "x"}, {**state, "over": 3}):
        with pytest.raises((KeyError, TypeError, ValueError)):
            tr.adopt(1, broken, FEATURES)
        assert tr.open_incidents == 0
    assert tr.adopt(1, state, FEATURES).id == firing.id
