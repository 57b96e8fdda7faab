"""Open incidents handed over with a partition: the last commit before it goes (a revoke, the shutdown) carries them in
its metadata, and the next owner continues them (no second firing alert; its resolved alert keeps the id)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from pipelines.alert_message import FIRING
from pipelines.positions import MAX_METADATA_BYTES, Positions
from pipelines.source import RecordBatch

A, B = ("t", 0), ("t", 1)


def _state(i: int, stream: str | None = None) -> dict:
    return {"id": f"{i:032x}", "stream": stream or f"pump-{i}", "route": "gru", "version": "1", "threshold": 2.5,
            "started": 1_000 + i, "topic": "t", "partition": 0, "first": 10 + i, "last": 20 + i, "peak": 3.5,
            "normal": 2, "over": ["gru"], "shares": {"s0": 0.75, "s1": 0.25}, "n": 4}


def _processed(pos: Positions, tp, offsets: list[int]) -> None:
    pos.advance(np.full(len(offsets), pos.id_of(tp)), np.array(offsets, np.int64))


def test_the_last_commit_carries_open_incidents_even_of_a_partition_with_nothing_new():
    pos = Positions()
    pos.assign([A, B])
    _processed(pos, A, [5, 6])
    _processed(pos, B, [40])
    del pos.uncommitted[B]  # B committed already, A not
    floors = np.array([3, 30])
    assert pos.commit_offsets(floors, {}) == {A: (7, json.dumps({"rebuild_from": 3}))}  # as any commit
    handover = {pos.id_of(B): [_state(1)]}
    got = pos.commit_offsets(floors, handover)
    assert got[A] == (7, json.dumps({"rebuild_from": 3}))
    offset, metadata = got[B]
    assert offset == 41 and json.loads(metadata) == {"rebuild_from": 30, "incidents": [_state(1)]}
    pos.revoke([B])
    assert pos.commit_offsets(floors, handover) == {A: (7, json.dumps({"rebuild_from": 3}))}  # gone: not ours


def test_incidents_beyond_what_a_broker_takes_in_metadata_are_left_to_be_detected_afresh(caplog):
    pos = Positions()
    pos.assign([A])
    _processed(pos, A, [99])
    many = [_state(i, stream="s" * 200 + str(i)) for i in range(40)]
    many[0]["stream"] = "pompe-\u00e9t\u00e9-" + "s" * 190  # escaped: the bytes a broker counts are the characters
    with caplog.at_level(logging.WARNING, logger="anomalyd"):
        (_, metadata), = pos.commit_offsets(np.array([50]), {0: many[::-1]}).values()
    assert metadata.isascii() and len(metadata) <= MAX_METADATA_BYTES < 4096  # the default offset.metadata.max.bytes
    kept = json.loads(metadata)["incidents"]
    assert 5 < len(kept) < 40 and kept == many[:len(kept)]  # the oldest first
    assert f"{len(kept)} of 40 open incidents handed over" in caplog.text


class _Client:
    """Answers ``committed`` with what the previous owner committed, records seeks."""

    def __init__(self, committed: dict) -> None:
        self.answers, self.seeks = committed, {}

    def committed(self, tps):
        return {tp: self.answers.get(tp) for tp in tps}

    def first_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def seek(self, tp, offset):
        self.seeks[tp] = offset


def test_the_next_owner_reads_the_incidents_once_and_hands_them_over_again_unchanged():
    empty = RecordBatch.empty()
    metadata = json.dumps({"rebuild_from": 30, "incidents": [_state(1), "junk"]}) + "\x00"  # confluent's NUL
    pos = Positions()
    pos.assign([A, B])
    pos.position_new(_Client({A: (41, metadata), B: (7, json.dumps({"rebuild_from": 3}))}), empty)
    assert pos.take_handed_over() == {A: [_state(1)]} and pos.take_handed_over() == {}
    # no record read since: its own last commit hands them over at the same offset
    assert pos.commit_offsets(np.array([30, 3]), {pos.id_of(A): [_state(1)]})[A][0] == 41
    pos.assign([B])
    pos.position_new(_Client({B: (7, "not ours")}), empty)
    assert pos.take_handed_over() == {}


@pytest.fixture
def route(trained, tmp_path):
    from pipelines.model_store import ModelStore
    from pipelines.routes import RouteState
    from pipelines.routing import RouteSpec

    ModelStore(tmp_path).save("gru", trained["gru"])
    return RouteState(RouteSpec(("gru",)), [ModelStore(tmp_path).load("gru")], 1, {"k": 3, "n": 5, "m": 5})


def test_a_route_adopts_a_handed_over_incident_and_holds_its_stream_as_silent_as_it_was(route):
    import time

    alert, resolved = route.adopt({**_state(1), "idle_s": 100.0, "last_ts": 5_000}, tp_id=3)
    assert (alert.status, alert.stream, alert.id, resolved) == (FIRING, "pump-1", _state(1)["id"], [])
    j = route.stream_index["pump-1"]
    assert route.stream_tp[j] == 3 and route.tracker.open_incidents == 1
    (state,) = route.handover()[3]
    assert state["id"] == _state(1)["id"] and state["last_ts"] == 5_000 and 100 <= state["idle_s"] < 110
    for broken in ({k: v for k, v in _state(2).items() if k != "n"}, {**_state(2), "started": 1e999}):
        with pytest.raises((KeyError, OverflowError)):
            route.adopt(broken, tp_id=3)
    assert "pump-2" not in route.stream_index  # nothing left behind
    # its records read again to rebuild its window are no news of it: still silent for 100 s
    n = 3
    route.add(np.full(n, j), np.arange(4_000, 4_000 + n, dtype=np.int64), np.zeros((n, 4), np.float32),
              np.full(n, 3), np.arange(n, dtype=np.int64), ["t"] * n, np.zeros(n, np.int32), np.zeros(n, bool))
    assert route.forget_idle(200.0, now=time.monotonic())[0] == []
    gone, (end,) = route.forget_idle(90.0, now=time.monotonic())  # the next owner forgets it as this one would
    assert gone == ["pump-1"] and (end.id, end.ended_at) == (_state(1)["id"], 5_000)  # at its last window


def test_a_stream_with_incidents_handed_over_with_two_partitions_keeps_the_later_one(route):
    """Its key moved to another partition: each owner had an incident open for it. Both ids resolve, once."""
    older, newer = _state(1, stream="pump-x"), {**_state(2, stream="pump-x"), "started": 9_000, "last_ts": 9_500}
    first, _ = route.adopt(newer, tp_id=1)
    alert, resolved = route.adopt({**older, "last_ts": 3_000}, tp_id=0)
    assert alert is None and [(a.id, a.status, a.ended_at) for a in resolved] == [(older["id"], "resolved", 3_000)]
    assert route.tracker.open_incidents == 1 and route.handover()[1][0]["id"] == newer["id"]
    route.forget_partitions([1])  # the other order: the incident held is the older one
    route.adopt(older, tp_id=0)
    alert, resolved = route.adopt(newer, tp_id=1)
    assert alert.id == newer["id"] and [a.id for a in resolved] == [older["id"]]
    assert route.tracker.open_incidents == 1


def test_a_commit_that_handed_over_is_rewritten_at_the_new_owners_next_commit_keeping_its_floor():
    """Else its incidents stayed in the partition's metadata after they resolved here, and the partition's next
    owner (after a crash, or a revoke with nothing new to commit) took them up again: a resolved incident fired.
    Rewritten before the windows are rebuilt (or with no rebuild at all), it keeps the floor it was read with."""
    pos = Positions()
    pos.assign([A, B])
    handed = json.dumps({"rebuild_from": 30, "incidents": [_state(1)]})
    pos.position_new(_Client({A: (41, handed), B: (7, json.dumps({"incidents": [_state(2)]}))}), RecordBatch.empty())
    assert pos.uncommitted == {A: 41, B: 7}  # at the next commit, whether the windows are rebuilt or not
    floors_here = np.array([-1, -1])  # no record read yet: no window holds anything
    got = pos.commit_offsets(floors_here, {})
    assert got == {A: (41, json.dumps({"rebuild_from": 30})), B: (7, "")} and pos._carries == set()
    assert pos.replay_mask(np.full(11, pos.id_of(A)), np.arange(30, 41)).all()  # the replay, then a record of ours
    _processed(pos, A, [41])
    assert pos.commit_offsets(np.array([35, -1]), {})[A] == (42, json.dumps({"rebuild_from": 35}))  # its own now


def test_an_answer_of_an_earlier_generation_does_not_cancel_the_rewrite():
    """A quiet partition's commit of offset 41 still in flight when the group rebalances, and the partition comes
    back: the rewrite to make is again (41, ...); the old answer, equal to it, must not take it away."""
    from prometheus_client import CollectorRegistry

    from pipelines.commits import Committer
    from pipelines.metrics import Metrics

    pos = Positions()
    committer = Committer(pos, Metrics(CollectorRegistry(), process_metrics=False))
    pos.assign([A])
    pos.position_new(_Client({A: (41, json.dumps({"incidents": [_state(1)]}))}), RecordBatch.empty())
    committer._answers.put((-1, 1, {A: (41, "")}, 0.01, None))  # generation -1: before the assignment
    committer.collect()
    assert pos.uncommitted == {A: 41}
    committer._answers.put((committer._generation, 2, {A: (41, "")}, 0.01, None))
    committer.collect()
    assert pos.uncommitted == {}


def test_the_same_incident_from_two_partitions_is_continued_once_and_a_bad_silence_changes_nothing(route):
    state = _state(1, stream="pump-y")
    first, _ = route.adopt(state, tp_id=0)
    assert route.adopt(state, tp_id=1) == (None, [])  # not resolved by itself
    assert route.tracker.open_incidents == 1 and route.stream_tp[route.stream_index["pump-y"]] == 0
    for bad in ("x", None):
        with pytest.raises((TypeError, ValueError)):
            route.adopt({**_state(2, stream="pump-z"), "idle_s": bad}, tp_id=0)
    assert "pump-z" not in route.stream_index and route.tracker.open_incidents == 1


def test_the_later_incident_of_a_stream_takes_its_partition_and_silence(route):
    import time

    route.adopt({**_state(1, stream="pump-w"), "idle_s": 5000.0}, tp_id=0)
    alert, resolved = route.adopt({**_state(2, stream="pump-w"), "started": 9_000, "idle_s": 1.0}, tp_id=1)
    j = route.stream_index["pump-w"]
    assert alert.id == _state(2)["id"] and len(resolved) == 1 and route.stream_tp[j] == 1
    assert route.forget_idle(3600.0, now=time.monotonic())[0] == []  # silent for 1 s, not 5000


def test_the_metadata_limit_follows_the_brokers_when_the_operator_lowers_it(tmp_path):
    from pipelines.config import load_config

    pos = Positions(max_metadata_bytes=600)
    pos.assign([A])
    _processed(pos, A, [99])
    (_, metadata), = pos.commit_offsets(np.array([50]), {0: [_state(i) for i in range(10)]}).values()
    assert len(metadata) <= 600 and 0 < len(json.loads(metadata)["incidents"]) < 10
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"kafka": {"topics": ["t"], "commit_metadata_max_bytes": 1000}}))
    assert load_config(path).kafka.commit_metadata_max_bytes == 1000


class _SmallMetadataBrokers:
    """Commits as brokers whose offset.metadata.max.bytes is 200 do: a commit with longer metadata is refused whole,
    with kafka-python's error."""

    def __init__(self) -> None:
        self.committed: dict = {}

    def commit(self, offsets, timeout_s=None):
        from kafka.errors import OffsetMetadataTooLargeError

        if any(len(meta) > 200 for _, meta in offsets.values()):
            raise OffsetMetadataTooLargeError("offset commit refused")
        self.committed.update(offsets)

    rebalance_commit_answered_later = False  # synchronous, as confluent-kafka's

    def commit_in_rebalance(self, offsets, answered) -> None:
        self.commit(offsets)


@pytest.mark.parametrize("in_rebalance", [False, True])
def test_a_handover_the_brokers_refuse_as_too_large_is_committed_without_the_incidents(in_rebalance, caplog):
    """kafka.commit_metadata_max_bytes above the brokers' limit: the last commit was refused whole, so the shutdown
    exited 1 and the next owner read everything since the commit before again (duplicate alerts)."""
    from prometheus_client import CollectorRegistry

    from pipelines.commits import Committer
    from pipelines.metrics import Metrics

    pos = Positions()
    committer = Committer(pos, Metrics(CollectorRegistry(), process_metrics=False))
    committer.source = brokers = _SmallMetadataBrokers()
    pos.assign([A, B])
    _processed(pos, A, [99])
    _processed(pos, B, [7])
    offsets = pos.commit_offsets(np.array([50, 3]), {0: [_state(1)]})
    with caplog.at_level(logging.WARNING, logger="anomalyd"):
        committer.commit(offsets, in_rebalance=in_rebalance, wait=not in_rebalance, timeout_s=5.0)
    assert brokers.committed == {A: (100, json.dumps({"rebuild_from": 50})), B: (8, json.dumps({"rebuild_from": 3}))}
    assert pos.uncommitted == {} and "refused open incidents in the commit's metadata" in caplog.text
