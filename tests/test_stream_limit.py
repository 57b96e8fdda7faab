"""processing.max_streams: the events of new streams beyond the limit are dead-lettered (reason too_many_streams),
not tracked, and said; the streams already tracked keep being scored, and a new one is taken once there is room."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import yaml

from pipelines.model_store import ModelStore
from pipelines.source import RecordBatch


class _DeadLetters:
    """The dead-letter producer's interface, keeping what it was given: (stream, reason, detail) per message."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    def produce(self, topic, value, key=None, headers=None) -> None:
        h = {k: v.decode() for k, v in headers or []}
        self.sent.append((json.loads(value)["stream"], h["anomalyd-error-reason"], h["anomalyd-error-detail"]))

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def make_daemon(trained, tmp_path):
    from pipelines.config import load_config
    from pipelines.daemon import Daemon

    ModelStore(tmp_path / "models").save("gru", trained["gru"])
    width = len(trained["gru"].feature_names)

    def make(max_streams: int):
        cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
               "routes": [{"match": "*", "models": ["gru"]}], "sinks": {"kafka": {"enabled": False}},
               "kafka": {"topics": ["t"]}, "processing": {"max_streams": max_streams}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        daemon = Daemon(load_config(tmp_path / "c.yaml"))
        daemon.producer = _DeadLetters()
        daemon.positions.assign([("t", 0)])
        return daemon

    make.width = width
    return make


def _batch(streams: list[str], first_offset: int, width: int) -> RecordBatch:
    n = len(streams)
    now = int(time.time() * 1000)
    values = [json.dumps({"stream": s, "ts": now + i, "values": [0.5] * width}).encode() for i, s in enumerate(streams)]
    return RecordBatch(topic=["t"] * n, partition=np.zeros(n, np.int32),
                       offset=np.arange(first_offset, first_offset + n, dtype=np.int64),
                       timestamp=np.full(n, now, np.int64), key=[None] * n, value=values)


def test_new_streams_beyond_the_limit_are_dead_lettered_and_said(make_daemon, caplog):
    daemon = make_daemon(max_streams=2)
    got = daemon.registry.get_sample_value
    assert got("anomalyd_streams_max") == 2
    caplog.set_level(logging.WARNING, logger="anomalyd")
    daemon.process(_batch(["a", "b", "c", "a", "c", "d", "b"], 0, make_daemon.width))
    (route,) = daemon.routes
    assert sorted(route.stream_index) == ["a", "b"] and route.buffer.n_events == 4  # a and b, all of their events
    sent = daemon.producer.sent
    assert [(s, r) for s, r, _ in sent] == [("c", "too_many_streams"), ("c", "too_many_streams"),
                                             ("d", "too_many_streams")]  # in input order
    assert "2 streams are tracked (processing.max_streams)" in sent[0][2]
    assert got("anomalyd_dead_letters_total", {"topic": "t", "reason": "too_many_streams"}) == 3
    assert got("anomalyd_events_total", {"topic": "t", "outcome": "dead_lettered"}) == 3
    warnings = [r.getMessage() for r in caplog.records if "processing.max_streams" in r.getMessage()]
    assert len(warnings) == 1 and "3 events of new streams (e.g. c, d)" in warnings[0]
    assert daemon.positions.uncommitted == {("t", 0): 7}  # every record processed: nothing is held back

    daemon.process(_batch(["e", "a"], 7, make_daemon.width))  # within the minute: counted, not said again
    assert [s for s, _, _ in sent] == ["c", "c", "d", "e"]
    assert len([r for r in caplog.records if "processing.max_streams" in r.getMessage()]) == 1

    route.forget_partitions([daemon.positions.id_of(("t", 0))])  # room again (as after a revoke)
    daemon.process(_batch(["e", "f", "g"], 9, make_daemon.width))
    assert sorted(route.stream_index) == ["e", "f"] and [s for s, _, _ in sent][4:] == ["g"]


def test_a_limit_with_room_for_every_event_checks_nothing_and_zero_means_no_limit(make_daemon):
    daemon = make_daemon(max_streams=0)
    daemon.process(_batch([f"s{i}" for i in range(50)], 0, make_daemon.width))
    assert len(daemon.routes[0].stream_index) == 50 and daemon.producer.sent == []
    assert daemon.registry.get_sample_value("anomalyd_streams_max") == 0
    daemon = make_daemon(max_streams=3)
    daemon.process(_batch(["x", "y", "x", "z", "x"], 0, make_daemon.width))  # 3 new streams, room for 3: all taken
    assert sorted(daemon.routes[0].stream_index) == ["x", "y", "z"] and daemon.producer.sent == []


def test_records_read_again_to_rebuild_windows_are_not_dead_lettered_twice(make_daemon, caplog):
    """A replayed record (below the commit, read again after a restart) of a stream beyond the limit was handled
    when first read: counted as replayed, not sent to the dead-letter topic again (nor said to be)."""
    caplog.set_level(logging.WARNING, logger="anomalyd")
    daemon = make_daemon(max_streams=1)
    daemon.positions._resume[("t", 0)] = 3  # as after a seek back below committed offset 3
    daemon.process(_batch(["a", "b", "b", "b", "c"], 0, make_daemon.width))
    got = daemon.registry.get_sample_value
    assert [(s, r) for s, r, _ in daemon.producer.sent] == [("b", "too_many_streams"), ("c", "too_many_streams")]
    assert got("anomalyd_events_total", {"topic": "t", "outcome": "replayed"}) == 3  # a, b, b: below the commit
    assert list(daemon.routes[0].stream_index) == ["a"]
    assert "2 events of new streams (e.g. b, c) went to the dead-letter topic" in caplog.text


def test_the_limit_is_checked_in_the_config(tmp_path):
    from pipelines.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"topics": ["t"]}, "processing": {"max_streams": 5}}))
    assert load_config(path).processing.max_streams == 5
    path.write_text(yaml.safe_dump({"kafka": {"topics": ["t"]}, "processing": {"max_streams": -1}}))
    with pytest.raises(ConfigError, match="processing.max_streams") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_the_refusals_series_exists_at_zero_for_topics_of_a_pattern_once_assigned(trained, tmp_path):
    """AnomalydStreamLimitReached uses increase(), which misses a series' first count; with kafka.topic_pattern the
    topics are known only when their partitions are assigned."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon

    ModelStore(tmp_path / "models").save("gru", trained["gru"])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [{"match": "*", "models": ["gru"]}], "sinks": {"kafka": {"enabled": False}},
           "kafka": {"topic_pattern": "^plant-.*"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(tmp_path / "c.yaml"))
    got = lambda: daemon.registry.get_sample_value("anomalyd_dead_letters_total",  # noqa: E731
                                                   {"topic": "plant-1", "reason": "too_many_streams"})
    assert got() is None
    daemon._on_assign([("plant-1", 0), ("plant-1", 1)])
    assert got() == 0


def test_the_routing_cache_holds_more_than_the_streams_the_daemon_may_hold(make_daemon):
    """The per-stream routing cache started afresh at 500,000 ids, half the default limit: with more streams in use
    it was emptied every few polls and nearly every event was routed again."""
    from pipelines.intake import SPEC_CACHE_MIN

    for max_streams, room in ((0, SPEC_CACHE_MIN), (2, SPEC_CACHE_MIN), (1_000_000, 1_250_000)):
        intake = make_daemon(max_streams).intake
        assert intake._spec_of._limit == room
        intake.set_routes(intake.routes)  # made again with the routes: the same room
        assert intake._spec_of._limit == room
