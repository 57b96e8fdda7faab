"""Unit tests of the daemon's Kafka-free parts: routing, positions, route state, intake (the model store and
replay have files of their own)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from detector.synthetic import SensorModel
from pipelines.model_store import ModelStore
from pipelines.positions import Positions, WindowOffsets
from pipelines.routing import Router, RouteSpec
from pipelines.source import RecordBatch


def test_router_glob_regex_first_match_and_default():
    r = Router([RouteSpec(("a",), match="pump-*"), RouteSpec(("b",), regex=r"^fan-\d+$")], default_models=["c"])
    assert r.route_of("pump-17") == 0 and r.route_of("fan-3") == 1
    assert r.route_of("fan-x") == 2  # the default route
    assert Router([RouteSpec(("a",), match="pump-*")]).route_of("valve-1") == -1
    assert RouteSpec(("gru", "lstm")).label == "gru+lstm"


def test_scoring_reports_top_streams_and_alert_latency_from_the_newest_event(trained, tmp_path, monkeypatch):
    """Daemon._score: the top-K gauge ranks the anomalous stream first, and an alert's event->alert latency counts
    from its stream's newest event in the micro-batch (seconds here), not from the incident's start (minutes)."""
    import time
    from types import SimpleNamespace

    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.replay import _StderrDeadLetters
    from pipelines.sinks import FanoutSink

    ModelStore(tmp_path / "models").save("gru", trained["gru"])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [{"match": "pump-*", "models": ["gru"]}], "metrics": {"top_k_streams": 2},
           "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["t"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(tmp_path / "c.yaml"))
    daemon.producer, daemon.sinks = _StderrDeadLetters(), FanoutSink([])
    steps = 400
    now_ms = int(time.time()) * 1000  # whole seconds: the latencies below are exact in floating point
    latency_s = 7.0  # scored and alerted this long after the newest event: the clock pipelines.metrics reads
    monkeypatch.setattr("pipelines.metrics.time", SimpleNamespace(time=lambda: now_ms / 1000 + latency_s,
                                                                  perf_counter=time.perf_counter))
    values = []
    for stream, t0 in (("pump-1", 0), ("pump-2", steps)):  # the sensors the models were trained on
        X = SensorModel(4, seed=1).normal(np.arange(t0, t0 + steps, dtype=np.float64))
        if stream == "pump-1":
            X[250:steps, 2] += 8 * X[:, 2].std()  # a level shift 150 s before the newest event
        values += [json.dumps({"stream": stream, "ts": now_ms - (steps - 1 - i) * 1000,
                               "values": row.tolist()}).encode() for i, row in enumerate(X)]
    n = len(values)
    daemon.process(RecordBatch(topic=["t"] * n, partition=np.zeros(n, np.int32), offset=np.arange(n, dtype=np.int64),
                               timestamp=np.zeros(n, np.int64), key=[None] * n, value=values))
    alerts = daemon.flush()
    assert [a.stream for a in alerts if a.status == "firing"] == ["pump-1"]
    reg = daemon.registry
    assert reg.get_sample_value("anomalyd_top_stream_score", {"rank": "1", "stream": "pump-1"}) > 1.0
    assert reg.get_sample_value("anomalyd_top_stream_score", {"rank": "2", "stream": "pump-2"}) is not None
    count = reg.get_sample_value("anomalyd_event_to_alert_seconds_count")
    assert count == len(alerts) > 0
    assert reg.get_sample_value("anomalyd_event_to_alert_seconds_sum") == latency_s * count  # not 150 s: the start
    scored = reg.get_sample_value("anomalyd_windows_scored_total", {"model": "gru"})
    assert scored > 0 and reg.get_sample_value("anomalyd_anomaly_score_count", {"model": "gru"}) == scored  # once
    daemon._maybe_forget_idle(time.monotonic() + 2 * 86400)  # processing.stream_idle_timeout_s: a day
    assert daemon.routes[0].stream_index == {} and daemon.routes[0].tracker.open_incidents == 0
    assert reg.get_sample_value("anomalyd_open_incidents") == reg.get_sample_value("anomalyd_streams_tracked") == 0
    assert reg.get_sample_value("anomalyd_alerts_total", {"model": "gru", "status": "resolved"}) == 1  # pump-1's
    assert reg.get_sample_value("anomalyd_top_stream_score", {"rank": "1", "stream": "pump-1"}) is None  # gone too


def test_positions_replay_commit_and_revoke():
    from pipelines.positions import Positions

    pos = Positions()
    a, b = ("t", 0), ("t", 1)
    ids = np.array([pos.id_of(a), pos.id_of(a), pos.id_of(b), pos.id_of(a)])
    pos.assign([a, b])
    pos._resume[a] = 11  # as after a seek-back to rebuild windows below committed offset 11
    offsets = np.array([9, 10, 4, 11])
    assert pos.replay_mask(ids, offsets).tolist() == [True, True, False, False]
    assert pos.replay_mask(ids, offsets + 10).tolist() == [False] * 4  # the replay ended
    pos.advance(ids, offsets)
    assert pos.uncommitted == {a: 12, b: 5}
    got = pos.commit_offsets(np.array([3, -1]))
    assert got == {a: (12, json.dumps({"rebuild_from": 3})), b: (5, "")}
    assert pos.revoke([b]) == [1] and pos.uncommitted == {a: 12} and pos.assigned == {a}
    c = ("t", 2)
    pos._resume[c] = 50  # positioned, but no record of it polled yet: other partitions' batches still work
    assert pos.replay_mask(ids, offsets).tolist() == [False] * 4
    assert pos._resume == {c: 50}


def test_a_partition_whose_log_start_is_unknown_starts_at_its_commit_without_a_rebuild():
    """The seek back to a commit's rebuild floor needs the partition's first retained offset: a floor that retention
    removed resets the position by auto_offset_reset, and with ``latest`` the records from the commit on were never
    read (and committed past). Unknown (ListOffsets timed out for that partition): no rebuild, start at the commit.
    The client here answers as a broker would and leaves partition 1's log start out on cue."""
    from pipelines.positions import Positions

    class _Client:
        def __init__(self) -> None:
            self.seeks = {}

        def committed(self, tps):
            return {tp: (100, json.dumps({"rebuild_from": 40})) for tp in tps}

        def first_offsets(self, tps):
            return {tp: 10 for tp in tps if tp != ("t", 1)}

        def seek(self, tp, offset):
            self.seeks[tp] = offset

    pos, client = Positions(), _Client()
    pos.assign([("t", 0), ("t", 1)])
    empty = RecordBatch(topic=[], partition=np.zeros(0, np.int32), offset=np.zeros(0, np.int64),
                        timestamp=np.zeros(0, np.int64), key=[], value=[])
    pos.position_new(client, empty)
    assert client.seeks == {("t", 0): 40, ("t", 1): 100}
    assert pos._resume == {("t", 0): 100}  # partition 0 replays 40..99 without scoring; partition 1 replays nothing


def test_partitions_whose_committed_offsets_cannot_be_read_are_positioned_after_the_next_poll():
    """Brokers out of reach right after an assignment: ``committed()`` times out. That stopped the daemon; now the
    partitions' records are left out and positioning is tried again after the next poll, starting (with no commit)
    at the first record polled before, not at the first of the later poll. The client here records seeks and
    refuses once on cue (a broker cannot be made to time out on exactly that call)."""
    from pipelines.positions import Positions

    class _Client:
        def __init__(self) -> None:
            self.refuse, self.seeks = True, []

        def committed(self, tps):
            if self.refuse:
                self.refuse = False
                raise TimeoutError("KafkaTimeoutError: committed() within 10 s")
            return {tp: None for tp in tps}

        def seek(self, tp, offset):
            self.seeks.append((tp, offset))

    def batch(offsets):
        n = len(offsets)
        return RecordBatch(topic=["t"] * n, partition=np.zeros(n, np.int32), offset=np.asarray(offsets, np.int64),
                           timestamp=np.zeros(n, np.int64), key=[None] * n, value=[b"{}"] * n)

    pos, client = Positions(), _Client()
    pos.assign([("t", 0)])
    assert len(pos.position_new(client, batch([5, 6, 7]))) == 0 and pos.needs_positioning
    assert client.seeks == []
    assert len(pos.position_new(client, batch([8, 9]))) == 0 and not pos.needs_positioning
    assert client.seeks == [(("t", 0), 5)]  # back to the first record polled, 5, not 8


def test_a_partition_given_back_without_a_commit_is_read_again_from_where_its_reading_started():
    """Read here from 0 to 99, revoked with nothing committed (the revoke could not deliver), assigned straight
    back: the poll may return records confluent fetched before the revoke (100..), and starting at the first of
    them skipped 0..99 for good. From where the reading started instead, unless retention has removed it."""
    from pipelines.positions import Positions

    class _Client:
        def __init__(self) -> None:
            self.seeks, self.log_start, self.commit = [], 0, None

        def committed(self, tps):
            return {tp: self.commit for tp in tps}

        def first_offsets(self, tps):
            return dict.fromkeys(tps, self.log_start)

        def seek(self, tp, offset):
            self.seeks.append(offset)

    def batch(lo, hi):
        n = hi - lo
        return RecordBatch(topic=["t"] * n, partition=np.zeros(n, np.int32), offset=np.arange(lo, hi, dtype=np.int64),
                           timestamp=np.zeros(n, np.int64), key=[None] * n, value=[b"{}"] * n)

    pos, client, tp = Positions(), _Client(), ("t", 0)
    pos.assign([tp])
    pos.position_new(client, batch(0, 20))  # the first time: at the first record polled
    pos.advance(np.full(100, pos.id_of(tp)), np.arange(100))
    for stale, log_start in ((100, 0), (100, 30), (150, 160)):
        pos.revoke([tp])
        client.log_start = log_start
        pos.assign([tp])
        pos.position_new(client, batch(stale, stale + 20))
    # from 0 while retained; the first record polled, if lower, but not below the log start (160: a seek to 150
    # would be out of range, and reset by auto_offset_reset: with latest, a skip to the end)
    assert client.seeks == [0, 0, 30, 160]
    pos.revoke([tp])
    client.commit = (170, "")
    pos.assign([tp])
    pos.position_new(client, batch(200, 210))
    assert client.seeks[-1] == 170 and tp not in pos._read_from  # a commit: from there

    # the usual case: the poll that assigns a partition has no record of it; its reading starts at the first read
    pos, client, client.seeks = Positions(), _Client(), []
    pos.assign([tp])
    pos.position_new(client, RecordBatch.empty())
    pos.advance(np.full(100, pos.id_of(tp)), np.arange(40, 140))  # from auto_offset_reset's position, 40
    pos.revoke([tp])
    pos.assign([tp])
    pos.position_new(client, batch(140, 160))
    assert client.seeks == [40]

    # given back again while the log start cannot be read: no seek; reading then starts lower (0), which counts
    client.first_offsets = lambda tps: {}
    pos.revoke([tp])
    pos.assign([tp])
    pos.position_new(client, RecordBatch.empty())
    pos.advance(np.full(10, pos.id_of(tp)), np.arange(10))
    assert pos._read_from[tp] == 0


def test_the_rebuild_floor_is_read_whatever_follows_the_metadata_object():
    """confluent-kafka writes a trailing NUL, and read metadata without one past its end: both must still give the
    floor, and anything else none (the replay then starts at the commit)."""
    from pipelines.positions import _rebuild_floor

    for text, floor in (('{"rebuild_from": 1600}', 1600), ('{"rebuild_from": 1600}\x00', 1600),
                        ('{"rebuild_from": 9408}umer', 9408), (' {"rebuild_from": 7} ', 7), ("", -1),
                        ("\x00", -1), ("[1]", -1), ('{"other": 1}', -1), ("garbage", -1),
                        ('{"rebuild_from": "x"}', -1)):
        assert _rebuild_floor(text) == floor, text


def test_records_of_a_partition_revoked_during_the_poll_are_dropped():
    from pipelines.positions import Positions

    pos = Positions()
    pos.assign([("t", 0), ("t", 1)])
    batch = RecordBatch(topic=["t"] * 4, partition=np.array([0, 1, 1, 0], np.int32), offset=np.arange(4),
                        timestamp=np.zeros(4, np.int64), key=[None] * 4, value=[b"a", b"b", b"c", b"d"])
    assert pos.drop_unassigned(batch) is batch  # no revoke: untouched
    pos.revoke([("t", 1)])  # inside the poll that returned ``batch``
    assert pos.drop_unassigned(batch).value == [b"a", b"d"]
    assert pos.drop_unassigned(batch) is batch  # once per revoke


def test_the_rebuild_replay_starts_at_the_floor_within_retention_and_the_cap():
    from pipelines.positions import replay_start

    assert replay_start(committed=1000, floor=900, log_start=0, max_replay=500) == 900
    assert replay_start(committed=1000, floor=900, log_start=950, max_replay=500) == 950  # retention removed 900
    assert replay_start(committed=10_000_000, floor=3, log_start=0, max_replay=500) == 9_999_500  # a quiet stream
    assert replay_start(committed=1000, floor=-1, log_start=0) == 1000  # no floor: resume at the commit
    assert replay_start(committed=1000, floor=1000, log_start=0) == 1000


def test_a_commit_in_mid_replay_never_moves_the_committed_offset_back():
    from pipelines.positions import Positions

    pos = Positions()
    a, b = ("t", 0), ("t", 1)
    ids = np.array([pos.id_of(a)] * 3 + [pos.id_of(b)])
    pos.assign([a, b])
    pos._resume[a] = 1000  # seeked back to 900 to rebuild windows; 1000 is committed
    offsets = np.array([950, 951, 952, 7])
    assert pos.replay_mask(ids, offsets).tolist() == [True, True, True, False]
    pos.advance(ids, offsets)
    assert pos.uncommitted == {b: 8}  # b is live and committable; a's replay is below its commit
    assert set(pos.commit_offsets(np.array([900, -1]))) == {b}
    tail, tail_ids = np.array([998, 999, 1000]), np.array([pos.id_of(a)] * 3)
    assert pos.replay_mask(tail_ids, tail).tolist() == [True, True, False]  # the replay ends at 999
    pos.advance(tail_ids, tail)
    assert pos.uncommitted == {a: 1001, b: 8}


def test_window_offsets_floor_covers_every_window_and_bounds_the_replay():
    rng = np.random.default_rng(7)
    w, n_streams = 8, 12
    marks = WindowOffsets(w, capacity=4)  # grows
    seen: dict[int, list[int]] = {}
    offset = 100
    for _ in range(40):
        n = int(rng.integers(0, 60))
        stream = rng.integers(0, n_streams, n)  # some streams get more than 2W events in one batch
        offsets = offset + np.arange(n)
        offset += n
        marks.add(stream, offsets)
        for st, o in zip(stream.tolist(), offsets.tolist(), strict=True):
            seen.setdefault(st, []).append(o)
        floor = marks.floor(n_streams)
        for st in range(n_streams):
            got = seen.get(st, [])
            if not got:
                assert floor[st] == -1
                continue
            assert floor[st] in got
            assert floor[st] <= got[-w:][0]  # the whole window is replayed
            assert floor[st] >= got[-(2 * w - 1):][0]  # and at most W - 1 events more
    marks.reset(np.array([3]))
    assert marks.floor(n_streams)[3] == -1
    marks.add(np.array([3]), np.array([offset]))
    assert marks.floor(n_streams)[3] == offset


def test_the_rebuild_floor_counts_accepted_events_only(trained, tmp_path):
    """Late events are in no window: counted in the floor's blocks of W, they let the floor pass events that are
    still in the window (a replay from there rebuilt a different window)."""
    from pipelines.routes import RouteState
    from pipelines.routing import RouteSpec

    ModelStore(tmp_path).save("gru", trained["gru"])
    route = RouteState(RouteSpec(("gru",)), [ModelStore(tmp_path).load("gru")], 1, {"k": 3, "n": 5, "m": 5})
    w = route.buffer.window  # 32
    ts = np.r_[np.arange(2 * w) * 1000, 70_000, np.full(5, 100), 71_000 + np.arange(26) * 1000]  # 5 late events
    n = len(ts)  # 96 = 3W events, 91 accepted
    stream = np.repeat(route.stream_ids(["pump-1"]), n)
    route.add(stream, ts.astype(np.int64), np.zeros((n, 4), np.float32), np.zeros(n, np.int64),
              np.arange(n, dtype=np.int64), ["t"] * n, np.zeros(n, np.int32), np.zeros(n, bool))
    accepted = np.r_[np.arange(2 * w + 1), np.arange(2 * w + 6, n)]
    floor = route.rebuild_floor(1)[0]
    assert floor <= accepted[-w]  # offset 59: the whole window is replayed (counting the late events gave 64)
    assert floor >= accepted[-(2 * w - 1)]  # offset 28: and at most W - 1 accepted events more


def test_silent_streams_are_forgotten_their_incidents_resolved_and_their_ids_reused(trained, tmp_path):
    import time

    from pipelines.routes import RouteState
    from pipelines.routing import RouteSpec

    ModelStore(tmp_path).save("gru", trained["gru"])
    route = RouteState(RouteSpec(("gru",)), [ModelStore(tmp_path).load("gru")], 1, {"k": 3, "n": 5, "m": 5})

    def feed(names: list[str], t0: int) -> np.ndarray:
        ids = route.stream_ids(names)
        n = len(ids)
        route.add(ids, np.full(n, t0, np.int64) + np.arange(n), np.zeros((n, 4), np.float32), np.zeros(n, np.int64),
                  np.arange(n, dtype=np.int64), ["t"] * n, np.zeros(n, np.int32), np.zeros(n, bool))
        return ids

    quiet, stuck = feed(["quiet", "stuck"], 5000).tolist()
    (opened,) = route.tracker.observe(np.full(3, stuck), np.full(3, 5.0), np.ones(3, bool), np.arange(3), "t",
                                      np.zeros(3), np.arange(3), stream_names=route.stream_names)
    cut = time.monotonic()
    (busy,) = feed(["busy"], 10).tolist()
    gone, resolved = route.forget_idle(1.0, now=cut + 1.0)
    assert gone == ["quiet", "stuck"] and set(route.stream_index) == {"busy"} and route.buffer.n_streams == 1
    assert [(a.id, a.status, a.stream, a.ended_at) for a in resolved] == [(opened.id, "resolved", "stuck", 5001)]
    assert route.tracker.open_incidents == 0
    assert route.stream_ids(["newcomer"]).tolist() == [quiet]  # the id is reused: churn does not grow memory
    n_ids = len(route.stream_names)
    assert route.stream_ids(["quiet"]).tolist() == [stuck]  # back later: a new, empty stream
    assert len(route.stream_names) == n_ids
    assert route.forget_idle(1.0, now=time.monotonic() + 2.0) == (["busy"], [])  # the newcomers were never fed
    w = route.buffer.window
    ids = route.stream_ids(["pending"] * w)
    route.add(ids, np.arange(w, dtype=np.int64), np.zeros((w, 4), np.float32), np.zeros(w, np.int64),
              np.arange(w, dtype=np.int64), ["t"] * w, np.zeros(w, np.int32), np.ones(w, bool))
    assert route.pending_windows == 1
    assert route.forget_idle(1.0, now=time.monotonic() + 2.0) == ([], [])  # its window is still to be scored
    route.offsets.reset(np.array([0, 10_000]))  # an id beyond its capacity (new offsets after a reload): no error


@pytest.mark.parametrize("topics", [["a"] * 6, ["a", "b", "a", "b", "b", "a"]], ids=["one topic", "two topics"])
def test_batch_ids_are_stable_per_topic_partition(topics):
    positions = Positions()
    part = np.array([2, 0, 2, 1, 0, 0], np.int32)
    batch = RecordBatch(topic=topics, partition=part, offset=np.arange(6, dtype=np.int64),
                        timestamp=np.zeros(6, np.int64), key=[b""] * 6, value=[b""] * 6)
    ids = positions.batch_ids(batch)
    assert [positions.tps[i] for i in ids.tolist()] == list(zip(topics, part.tolist(), strict=True))
    again = positions.batch_ids(batch)  # ids persist across batches
    assert again.tolist() == ids.tolist()



def test_routes_with_the_same_features_keep_their_own_streams(trained, tmp_path):
    """Two routes whose models share one feature list: each stream's events reach its own route's buffers (the
    decoder groups per route, not per feature list); a stream no route takes is counted as unrouted."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.replay import _StderrDeadLetters

    store = ModelStore(tmp_path / "models")
    for kind in ("gru", "lstm"):
        store.save(kind, trained[kind])
    assert trained["gru"].feature_names == trained["lstm"].feature_names
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}, {"name": "lstm"}],
                      "device": "cpu"},
           "routes": [{"match": "pump-*", "models": ["gru"]}, {"regex": "^fan-", "models": ["lstm"]}],
           "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["t"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(tmp_path / "c.yaml"))
    daemon.producer = _StderrDeadLetters()
    names = trained["gru"].feature_names
    streams = ["pump-1", "fan-1", "valve-9", "fan-2", "pump-1", "fan-1"] * 3
    values = [json.dumps({"stream": s, "ts": 1_700_000_000_000 + i, "values": [float(i)] * len(names)}).encode()
              for i, s in enumerate(streams)]
    n = len(values)
    daemon.process(RecordBatch(topic=["t"] * n, partition=np.zeros(n, np.int32), offset=np.arange(n, dtype=np.int64),
                               timestamp=np.zeros(n, np.int64), key=[None] * n, value=values))
    pumps, fans = daemon.routes
    assert pumps.stream_names == ["pump-1"] and sorted(fans.stream_names) == ["fan-1", "fan-2"]
    assert pumps.buffer.n_events == 6 and fans.buffer.n_events == 9
    # a revoke whose flush failed leaves windows pending: the revoked partition's go with its state
    more = [json.dumps({"stream": s, "ts": 1_700_000_001_000 + i, "values": [float(i)] * len(names)}).encode()
            for i, s in enumerate(["fan-1"] * 40 + ["fan-2"] * 40)]
    daemon.process(RecordBatch(topic=["t"] * 80, partition=np.r_[np.zeros(40, np.int32), np.ones(40, np.int32)],
                               offset=np.r_[np.arange(n, n + 40), np.arange(40)], timestamp=np.zeros(80, np.int64),
                               key=[None] * 80, value=more))
    assert fans.pending_windows > 0
    fans.forget_partitions([daemon.positions.id_of(("t", 1))])  # fan-2's events came from partition 1
    assert fans.pending_windows == sum(len(p[0]) for p in fans._pending) > 0
    assert all((p[0] == fans.stream_index["fan-1"]).all() for p in fans._pending)
    assert daemon.registry.get_sample_value("anomalyd_events_total", {"topic": "t", "outcome": "unrouted"}) == 3
    # one poll, one route, two topics: each topic's events are counted under its own label (all went to the first)
    mixed = [json.dumps({"stream": s, "ts": 1_700_000_002_000 + i, "values": [1.0] * len(names)}).encode()
             for i, s in enumerate(["fan-3", "fan-4", "fan-4", "fan-4"])]
    daemon.process(RecordBatch(topic=["a", "b", "b", "b"], partition=np.zeros(4, np.int32),
                               offset=np.arange(4, dtype=np.int64), timestamp=np.zeros(4, np.int64), key=[None] * 4,
                               value=mixed))
    counted = {t: daemon.registry.get_sample_value("anomalyd_events_total", {"topic": t, "outcome": "warming"})
               for t in ("a", "b")}
    assert counted == {"a": 1, "b": 3}
    # a new stream whose first readings lack a feature: the gap takes the model's centre of the data, not 0.0
    center = trained["lstm"].scaler.center
    W = fans.buffer.window
    first = {n: 1.0 for n in names[1:]}  # names[0] missing (null) in its first event
    gap = [json.dumps({"stream": "fan-5", "ts": 1_700_000_003_000 + i,
                       "values": first | {names[0]: None if i == 0 else 2.0}}).encode() for i in range(W)]
    fans.take_pending()
    daemon.process(RecordBatch(topic=["t"] * W, partition=np.zeros(W, np.int32), offset=np.arange(W, dtype=np.int64),
                               timestamp=np.zeros(W, np.int64), key=[None] * W, value=gap))
    (window,) = fans.take_pending()[0][1]
    assert window[0, 0] == pytest.approx(center[0]) and window[1, 0] == 2.0 and center[0] != 0.0


def test_an_event_time_far_ahead_of_the_clock_is_dead_lettered_not_taken(trained, tmp_path, capsys):
    """ts in microseconds (or corrupt): taken, it made every later event of its stream late, dropped."""
    import time

    daemon = _gru_daemon(trained, tmp_path, processing={"max_event_time_ahead_s": 3600})
    now = int(time.time() * 1000)
    names = trained["gru"].feature_names
    times = [now - 2000, now * 1000, now - 1000, now + 600_000]  # the second in microseconds; the last 10 min ahead
    values = [json.dumps({"stream": "pump-1", "ts": ts, "values": [1.0] * len(names)}).encode() for ts in times]
    daemon.process(RecordBatch(topic=["t"] * 4, partition=np.zeros(4, np.int32), offset=np.arange(4, dtype=np.int64),
                               timestamp=np.zeros(4, np.int64), key=[None] * 4, value=values))
    (route,) = daemon.routes
    assert route.buffer.n_events == 3 and route.buffer.n_late == 0  # the later events were taken
    got = daemon.registry.get_sample_value
    assert got("anomalyd_dead_letters_total", {"topic": "t", "reason": "bad_timestamp"}) == 1
    err = capsys.readouterr().err
    assert "ahead of its record's broker timestamp, more than processing.max_event_time_ahead_s (3600)" in err
    assert "microseconds or nanoseconds? ts is epoch milliseconds" in err
    # measured from the record's broker timestamp, not the clock: a re-read (window rebuild) days later agrees
    old = now - 10 * 86_400_000
    late_values = [json.dumps({"stream": "pump-2", "ts": ts, "values": [1.0] * len(names)}).encode()
                   for ts in (old, old + 7_200_000)]  # the second two hours ahead of its broker time
    daemon.process(RecordBatch(topic=["t"] * 2, partition=np.zeros(2, np.int32), offset=np.arange(4, 6, dtype=np.int64),
                               timestamp=np.full(2, old, np.int64), key=[None] * 2, value=late_values))
    assert got("anomalyd_dead_letters_total", {"topic": "t", "reason": "bad_timestamp"}) == 2
    # the oldest time an int64 holds is not "ahead" (ts - broker time wrapped around to a large positive number)
    ancient = [json.dumps({"stream": "pump-3", "ts": ts, "values": [1.0] * len(names)}).encode()
               for ts in (-(2**63), -(2**63) + 1)]
    daemon.process(RecordBatch(topic=["t"] * 2, partition=np.zeros(2, np.int32), offset=np.arange(6, 8, dtype=np.int64),
                               timestamp=np.full(2, now, np.int64), key=[None] * 2, value=ancient))
    assert got("anomalyd_dead_letters_total", {"topic": "t", "reason": "bad_timestamp"}) == 2
    assert "-9223372036854775808 is" not in capsys.readouterr().err


@pytest.mark.parametrize("limit_s", [1e16, 1e306])
def test_a_limit_on_event_time_ahead_beyond_what_the_config_takes_is_refused_at_load(trained, tmp_path, limit_s):
    """1e16 s as "never" had overflowed int64 on every poll (the limit plus a broker time; 1e306: int(inf) at
    start). The config takes at most 1e9 s now (31 years), and says so at load."""
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match=r"processing.max_event_time_ahead_s: must be <= 1000000000"):
        _gru_daemon(trained, tmp_path, processing={"max_event_time_ahead_s": limit_s})


def test_the_largest_limit_on_event_time_ahead_is_no_crash(trained, tmp_path):
    """At the config's largest limit (1e9 s) an event time near int64's end is ahead, refused, not a crash."""
    daemon = _gru_daemon(trained, tmp_path, processing={"max_event_time_ahead_s": 1e9})
    names = trained["gru"].feature_names
    values = [json.dumps({"stream": "pump-1", "ts": ts, "values": [1.0] * len(names)}).encode()
              for ts in (1_700_000_000_000, 2**62)]
    daemon.process(RecordBatch(topic=["t"] * 2, partition=np.zeros(2, np.int32), offset=np.arange(2, dtype=np.int64),
                               timestamp=np.full(2, 1_700_000_000_000, np.int64), key=[None] * 2, value=values))
    assert daemon.routes[0].buffer.n_events == 1


def test_a_stream_arriving_on_another_partition_is_reported_once_a_minute(trained, tmp_path, caplog, monkeypatch):
    """Partitions added to a topic with a backlog move keys: the new partition's events of a stream come first, its
    old partition's backlog then falls behind them and is dropped as late. That loss is said, not only counted."""
    from pipelines import routes as routes_module
    from pipelines.routes import RouteState
    from pipelines.routing import RouteSpec

    ModelStore(tmp_path).save("gru", trained["gru"])
    route = RouteState(RouteSpec(("gru",)), [ModelStore(tmp_path).load("gru")], 1, {"k": 3, "n": 5, "m": 5})
    clock = [1000.0]
    monkeypatch.setattr(routes_module.time, "monotonic", lambda: clock[0])

    def feed(names: list[str], ts: list[int], tp: int) -> int:
        ids, n = route.stream_ids(names), len(names)
        late, _ = route.add(ids, np.array(ts, np.int64), np.zeros((n, 4), np.float32), np.full(n, tp, np.int64),
                            np.arange(n, dtype=np.int64), ["t"] * n, np.full(n, tp, np.int32), np.zeros(n, bool))
        return late

    def moved() -> list[str]:
        return [r.getMessage() for r in caplog.records if "another partition than before" in r.getMessage()]

    assert feed(["a", "b"], [10, 10], tp=0) == 0
    assert feed(["a"], [30], tp=1) == 0  # a's key now maps to partition 1 ...
    assert feed(["a", "b"], [20, 20], tp=0) == 1  # ... and its backlog on partition 0 is late
    assert len(moved()) == 1 and "1 events of streams" in moved()[0] and "(e.g. a)" in moved()[0]
    feed(["b"], [40], tp=1)
    assert len(moved()) == 1  # within a minute: counted, not said
    route.forget_partitions([1])  # b's id is free, and then taken by a stream that never moved
    route.stream_ids(["c"])
    clock[0] += 61
    feed(["a"], [50], tp=1)
    assert "3 events of streams" in moved()[-1] and "(e.g. a, b)" in moved()[-1]  # named as they moved


def test_a_selection_of_a_batch_keeps_each_records_headers():
    """Records dropped from a poll (a revoked partition) must not shift the headers a dead letter copies."""
    n = 5
    batch = RecordBatch(topic=["t"] * n, partition=np.array([0, 1, 0, 1, 0], np.int32), offset=np.arange(n),
                        timestamp=np.zeros(n, np.int64), key=[None] * n, value=[b"%d" % i for i in range(n)],
                        headers_of=lambda i: [("i", b"%d" % i)])
    kept = batch.select(np.array([1, 3]))
    assert [kept.headers(i) for i in range(2)] == [[("i", b"1")], [("i", b"3")]]
    assert kept.select(np.array([1])).headers(0) == [("i", b"3")]
    assert RecordBatch.empty().select(np.array([], np.int64)).headers_of is None


def test_event_times_in_seconds_are_reported_not_taken_silently(trained, tmp_path, caplog):
    """``ts`` is epoch milliseconds; seconds (or micro/nanoseconds) decode without error, so the intake says so,
    naming the topic, a stream and the value, at most every 10 minutes."""
    daemon = _gru_daemon(trained, tmp_path, "pump-*",
                         processing={"max_event_time_ahead_s": 0})  # micro/nanoseconds: taken
    width = len(trained["gru"].feature_names)
    offset = 0

    def process(stream: str, times: list[int]) -> list[str]:
        nonlocal offset
        values = [json.dumps({"stream": stream, "ts": t, "values": [0.0] * width}).encode() for t in times]
        n = len(values)
        caplog.clear()
        with caplog.at_level("WARNING", logger="anomalyd"):
            daemon.process(RecordBatch(topic=["sensors"] * n, partition=np.zeros(n, np.int32),
                                       offset=np.arange(offset, offset + n, dtype=np.int64),
                                       timestamp=np.zeros(n, np.int64), key=[None] * n, value=values))
        offset += n
        return [r.getMessage() for r in caplog.records if "event times" in r.getMessage()]

    assert process("pump-1", [1_764_180_000_000 + i * 1000 for i in range(5)]) == []  # milliseconds
    said = process("pump-2", [1_764_180_000 + i for i in range(5)])
    assert len(said) == 1 and "topic sensors" in said[0] and "like seconds" in said[0]
    assert "pump-2: ts 1764180000," in said[0] and "1970-01-21" in said[0]
    assert process("pump-3", [1_764_180_000 + i for i in range(5)]) == []  # not again within 10 minutes
    daemon.intake._unit_warned_at -= 601
    said = process("pump-4", [1_764_180_000_000_000_000 + i for i in range(5)])
    assert len(said) == 1 and "microseconds or nanoseconds" in said[0] and "pump-4: ts 1764180000000000004" in said[0]
    daemon.intake._unit_warned_at -= 601
    said = process("pump-5", [-5, 0, 1, 2, 3])  # not seconds: no time at all
    assert len(said) == 1 and "look like no time at all (zero or negative)" in said[0] and "pump-5: ts -5," in said[0]


def test_a_handed_over_incident_of_a_stream_routed_elsewhere_here_is_resolved_with_its_id(trained, tmp_path):
    """The previous owner ran another config (the stream's route renamed, say): the incident is not continued, and
    its resolved alert goes out, so that its id does not stay open for ever on the alerts topic."""
    import io

    from pipelines.alerts import AlertTracker
    from pipelines.sinks import FanoutSink, LogSink

    daemon = _gru_daemon(trained, tmp_path, "pump-*")
    out = io.StringIO()
    daemon.sinks = FanoutSink([LogSink(out)])
    old = AlertTracker(k=1, n=1, m=5)
    (firing,) = old.observe([0], [4.0], [True], [1_700_000_000_000], "t", [0], [17], contributions=[[3.0, 1.0]],
                            feature_names=["temp", "flow"], model="old-route", stream_names=["pump-1"])
    ((_, state),) = old.handover()
    daemon.positions.handed_over = {("t", 0): [state]}
    daemon._adopt_handed_over()
    (line,) = [json.loads(s) for s in out.getvalue().splitlines()]
    assert (line["id"], line["status"], line["stream"], line["model"]) == (firing.id, "resolved", "pump-1",
                                                                           "old-route")
    assert line["ended_at"] == 1_700_000_000_000 and line["top_features"][0]["feature"] == "temp"
    got = daemon.registry.get_sample_value("anomalyd_alerts_total", {"model": "old-route", "status": "resolved"})
    assert got == 1
    assert daemon.routes[0].tracker.open_incidents == 0  # not continued here


def test_open_incidents_a_handover_cannot_carry_are_resolved_before_it(trained, tmp_path, caplog):
    """The commit metadata carries about 8 incidents per partition; the others were left to be detected afresh by
    the next owner, under new ids, and their own ids stayed open for ever on the alerts topic."""
    import io

    from pipelines.sinks import FanoutSink, LogSink

    daemon = _gru_daemon(trained, tmp_path, "pump-*", kafka={"commit_metadata_max_bytes": 800},
                         alerts={"k": 1, "n": 1})
    out = io.StringIO()
    daemon.sinks = FanoutSink([LogSink(out)])
    (route,) = daemon.routes
    names = [f"pump-{i}" for i in range(6)]
    ids = route.stream_ids(names)
    route.stream_tp[ids] = daemon.positions.id_of(("t", 0))
    t0 = 1_700_000_000_000
    fired = route.tracker.observe(ids, np.full(6, 4.0), np.ones(6, bool), t0 + 1000 * np.arange(6), "t", np.zeros(6),
                                  10 + np.arange(6), model=route.spec.label, stream_names=route.stream_names)
    assert len(fired) == 6 and route.tracker.open_incidents == 6
    (beyond,) = daemon.commits.handover(daemon.routes)[1].values()
    assert 0 < len(beyond) < 6
    with caplog.at_level("WARNING", logger="anomalyd"):
        (carried,) = daemon._handover().values()
    resolved = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(a["stream"] for a in resolved) == sorted(s["stream"] for s in beyond)  # the newest: the oldest
    assert all(a["status"] == "resolved" for a in resolved)  # are handed over
    assert {a["id"] for a in resolved} <= {a.id for a in fired}
    assert route.tracker.open_incidents == 6 - len(beyond) == len(carried)
    assert daemon.commits.handover(daemon.routes)[1] == {}  # the rest fit: nothing left out, nothing said there
    assert f"resolved {len(beyond)} open incidents that the commit metadata handing partitions t/0 over" in \
        caplog.text


def _gru_daemon(trained, tmp_path, match: str = "*", **sections):
    """A Daemon (no Kafka client until it runs) serving the trained GRU on the streams matching ``match``, its dead
    letters written to stderr; ``sections`` are merged into the config's sections (kafka, processing, alerts)."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.replay import _StderrDeadLetters

    ModelStore(tmp_path / "models").save("gru", trained["gru"])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [{"match": match, "models": ["gru"]}], "sinks": {"kafka": {"enabled": False}},
           "kafka": {"topics": ["t"]}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(tmp_path / "c.yaml"))
    daemon.producer = _StderrDeadLetters()
    return daemon


def test_missing_feature_values_of_live_events_are_counted_per_topic(trained, tmp_path):
    """README: a null or absent feature is carried forward and counted; the count was internal only."""
    daemon = _gru_daemon(trained, tmp_path)
    names = trained["gru"].feature_names
    rows = [[1.0] * len(names) for _ in range(6)]
    rows[2][0] = rows[4][1] = rows[4][2] = None
    values = [json.dumps({"stream": "pump-1", "ts": 1_700_000_000_000 + i, "values": row}).encode()
              for i, row in enumerate(rows)]
    values.append(json.dumps({"stream": "pump-1", "ts": 1_700_000_000_010,  # absent: a named value left out
                              "values": {n: 1.0 for n in names[1:]}}).encode())
    n = len(values)
    daemon.process(RecordBatch(topic=["t"] * n, partition=np.zeros(n, np.int32), offset=np.arange(n, dtype=np.int64),
                               timestamp=np.zeros(n, np.int64), key=[None] * n, value=values))
    assert daemon.registry.get_sample_value("anomalyd_missing_values_total", {"topic": "t"}) == 4
