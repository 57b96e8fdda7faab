"""``anomalyd train`` (pipelines.train_cmd, train_topic): its arguments, checked before any training, and
``--kafka-topic``'s selection (``_Selection``), fed polls as the consumer gives them: each poll is decoded on
arrival and only the selected rows are kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.train_selection import _Selection
from pipelines.train_topic import parse_features, read_topic_series
from tests.kafka_python_fetcher import FetcherConsumer, record_batch


def rec(stream: str, ts: int, values, broker_ts: int = 0) -> tuple[bytes, bytes | None, int]:
    return json.dumps({"stream": stream, "ts": ts, "values": values}).encode(), stream.encode(), broker_ts


def test_polls_are_filtered_by_stream_and_event_time_in_read_order_per_stream():
    sel = _Selection(from_ms=1_000, to_ms=5_000, streams_glob="pump-*", feature_names=["a", "b"])
    sel.add([rec("pump-1", 3_000, {"a": 3, "b": 30}), rec("fan-1", 2_000, {"a": 9, "b": 9}),
             rec("pump-1", 999, {"a": -1, "b": -1}), rec("pump-2", 2_000, {"a": 5, "b": 50})])
    sel.add([rec("pump-1", 2_000, {"a": 2, "b": 20}), rec("pump-1", 5_000, {"a": 4, "b": 40}), (b"{oops", None, 0),
             rec("pump-1", 5_001, {"a": -1, "b": -1})])
    assert sel.finish("t") == ["a", "b"]
    assert sel.n_rejected == 1 and sel.first_rejection == "bad_json"
    series = sorted(sel.series(), key=len)
    assert [s.tolist() for s in series] == [[[5.0, 50.0]], [[3.0, 30.0], [4.0, 40.0]]]  # pump-1's 2_000: late
    assert sel.n_late == 1
    assert all(s.dtype == np.float32 for s in series)


def test_messages_the_daemon_would_dead_letter_as_oversized_are_not_trained_on():
    big = (json.dumps({"stream": "pump-1", "ts": 1, "values": {"a": 1, "b": 2}, "note": "x" * 70_000}).encode(),
           b"pump-1", 0)  # over the daemon's default 64 KiB
    sel = _Selection(None, None, "*", ["a", "b"])
    sel.add([big, rec("pump-1", 2, {"a": 3, "b": 4})])
    assert sel.n_rejected == 1 and sel.first_rejection == "oversized"  # was read with a 1 MiB limit
    assert [s.tolist() for s in sel.series()] == [[[3.0, 4.0]]]
    roomy = _Selection(None, None, "*", ["a", "b"], max_message_bytes=1 << 20)  # a config's larger limit
    roomy.add([big])
    assert roomy.n_rejected == 0


def test_feature_names_come_from_the_first_matching_stream_even_in_a_later_poll():
    sel = _Selection(None, None, "pump-*", None)
    sel.add([rec("fan-1", 1, {"x": 1}), (b"[]", None, 0)])  # nothing to name the features from yet: held
    sel.add([rec("pump-1", 2, {"a": 1, "b": 2})])
    sel.add([rec("pump-1", 3, {"b": 4, "a": 3})])
    assert sel.finish("t") == ["a", "b"]
    assert [s.tolist() for s in sel.series()] == [[[1.0, 2.0], [3.0, 4.0]]]
    assert sel.n_rejected == 1  # the held poll was decoded too, once the names were known


def test_no_names_given_or_found_is_an_error_naming_the_option():
    sel = _Selection(None, None, "*", None)
    sel.add([(b"[1, 2]", None, 0)])
    with pytest.raises(ValueError, match="--features"):
        sel.finish("t")
    assert _Selection(None, None, "*", ["a"]).series() == []


@pytest.mark.parametrize(("extra", "error"), [
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--name", "../escape"], "--name: must be a plain directory name (as models.served[].name), got '../escape'"),
    (["--risk", "1.5", "--window", "1"], "--window: must be >= 2, got 1; --risk: must be between 0 and 1, got 1.5"),
    (["--last-k", "9", "--window", "8"], "--last-k: must be between 1 and --window (8), got 9"),
    (["--threshold", "spot", "--risk", "0.05"], "--risk: risk must be in (0, 1 - init_quantile = 0.02), got 0.05"),
    (["--features", "a", "--to-ms", "160"],
     "--features, --to-ms: only with --kafka-topic (--data trains on whole files)"),
    (["--device", "tpu"], "--device: device must be auto, cpu, cuda, cuda:<index> or mps, got 'tpu'"),  # a traceback
    (["--bootstrap", "k:9092"], "--bootstrap: only with --kafka-topic (--data trains on whole files)"),
])
def test_arguments_that_would_train_nothing_or_write_elsewhere_are_refused_before_training(tmp_path, capsys, extra,
                                                                                             error):
    from pipelines.cli import main

    data = tmp_path / "d.csv"
    data.write_text("a,b\n" + "".join(f"{i},{i % 7}\n" for i in range(200)))
    argv = ["train", "--data", str(data), "--name", "m", "--models-dir", str(tmp_path / "models"), *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"anomalyd: error: {error}"
    assert not (tmp_path / "escape").exists() and not (tmp_path / "models" / "m").exists()


def test_bootstrap_beside_a_config_is_refused_not_ignored(tmp_path, capsys):
    from pipelines.cli import main

    argv = ["train", "--kafka-topic", "t", "-c", "deploy/config.example.yaml", "--bootstrap", "k:9092", "--name", "m",
            "--models-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--bootstrap: not with --config, whose kafka.bootstrap_servers (and credentials) are used" in \
        capsys.readouterr().err


def test_data_files_with_the_same_columns_in_another_order_are_reordered_others_named(tmp_path):
    from pipelines.train_cmd import _load_data_files

    rows = "".join(f"{i},{i % 7},{i % 3}\n" for i in range(200))
    (tmp_path / "a.csv").write_text("ts,temp,vib\n" + rows)
    (tmp_path / "b.csv").write_text("ts,vib,temp\n" + rows)
    series, names = _load_data_files([tmp_path / "a.csv", tmp_path / "b.csv"], 8)
    assert names == ["temp", "vib"] and series[1][:, 0].tolist() == series[0][:, 1].tolist()
    (tmp_path / "c.csv").write_text("ts,temp,flow\n" + rows)
    with pytest.raises(ValueError, match=r"c.csv: features \['temp', 'flow'\] are not those of .*a.csv"):
        _load_data_files([tmp_path / "a.csv", tmp_path / "c.csv"], 8)
    (tmp_path / "d.csv").write_text("ts,temp,vib\n" + "".join(f"{i},1,2\n" for i in range(10)))
    with pytest.raises(ValueError, match="d.csv: 10 rows, too few to train with window 8"):
        _load_data_files([tmp_path / "a.csv", tmp_path / "d.csv"], 8)


def test_a_models_dir_that_cannot_be_created_is_refused_before_training(tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "file").write_text("")
    data = tmp_path / "d.csv"
    data.write_text("a\n" + "".join(f"{i}\n" for i in range(200)))
    assert main(["train", "--data", str(data), "--name", "m", "--models-dir", str(tmp_path / "file" / "m")]) == 2
    assert f"--models-dir: cannot create {tmp_path / 'file' / 'm'}" in capsys.readouterr().err
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").write_text("")  # the model's own directory a file: the save, after training, failed
    assert main(["train", "--data", str(data), "--name", "m", "--models-dir", str(tmp_path / "models")]) == 2
    assert f"--name: {tmp_path / 'models' / 'm'} exists and is not a directory" in capsys.readouterr().err


def test_a_time_range_that_selects_nothing_says_where_the_events_are_and_their_unit():
    """Events stamped in seconds and a range in milliseconds: "no events for the given time range", no more."""
    sel = _Selection(from_ms=1_764_100_000_000, to_ms=1_764_200_000_000, streams_glob="*", feature_names=["a"])
    sel.add([rec("pump-1", 1_764_150_000 + i, [1.0]) for i in range(100)])
    assert sel.series() == []
    assert sel.nothing_selected("sensors") == (
        "no events of streams '*' in 'sensors' for the given time range; the events' ts run from 1764150000 to "
        "1764150099 (times that look like seconds: ts is epoch milliseconds)")
    sel = _Selection(from_ms=0, to_ms=10, streams_glob="*", feature_names=["a"])
    sel.add([rec("pump-1", 1_764_150_000_000, [1.0])])
    assert sel.nothing_selected("sensors").endswith("; the events' ts run from 1764150000000 to 1764150000000")


def test_features_are_stripped_and_must_be_distinct_and_non_empty():
    """``a, b`` selected nothing (no message has a key " b"); ``a,,b`` trained and saved a version the daemon's
    loader refuses; so would ``a,a`` have, had the decoder not refused it after the topic was read."""
    assert parse_features("a, b ,c") == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"--features: an empty name in 'a,,b'"):
        parse_features("a,,b")
    with pytest.raises(ValueError, match=r"--features: an empty name in ' '"):
        parse_features(" ")
    with pytest.raises(ValueError, match=r"--features: feature 'a' is named twice, got 'a, a'"):
        parse_features("a, a")


@pytest.mark.parametrize(("extra", "error"), [
    (["--features", "a,,b"], "--features: an empty name in 'a,,b' (comma-separated names: none between two commas "
                             "or at either end)"),
    (["--features", ""], "--features: an empty name in '' (comma-separated names: none between two commas "
                         "or at either end)"),
    (["--features", "a,b,a"], "--features: feature 'a' is named twice, got 'a,b,a'"),
    (["--from-ms", "200", "--to-ms", "100"], "--from-ms: 200 is after --to-ms 100: the range selects nothing"),
])
def test_topic_arguments_that_select_nothing_or_name_features_badly_are_refused_before_reading(tmp_path, capsys,
                                                                                               extra, error):
    from pipelines.cli import main

    argv = ["train", "--kafka-topic", "t", "--bootstrap", "127.0.0.1:1", "--name", "m", "--models-dir",
            str(tmp_path / "models"), *extra]
    assert main(argv) == 2  # no broker at 127.0.0.1:1: refused before it is asked
    assert capsys.readouterr().err.strip() == f"anomalyd: error: {error}"
    with pytest.raises(ValueError, match=r"--from-ms: 200 is after --to-ms 100"):
        read_topic_series("127.0.0.1:1", "t", 200, 100, "*", None, timeout_s=0.1)
    with pytest.raises(ValueError, match=r"--features: feature names must be non-empty"):
        read_topic_series("127.0.0.1:1", "t", None, None, "*", ["a", ""], timeout_s=0.1)


def test_a_first_message_with_an_empty_key_is_skipped_as_a_later_one_is():
    """It stopped the read (the daemon dead-letters it whatever the names), though the same message later was
    skipped: the names come from the next message taken."""
    sel = _Selection(None, None, "*", None)
    sel.add([rec("pump-1", 1, {"": 1, "b": 2}), rec("pump-1", 2, {"b": 3})])
    assert sel.finish("t") == ["b"] and sel.reasons == {"unknown_feature": 1}
    assert [s[:, 0].tolist() for s in sel.series()] == [[3.0]]


def test_feature_names_come_from_a_message_in_the_time_range():
    """The topic's first messages, before --from-ms, had one feature fewer: every selected message was then
    skipped as unknown_feature, and the range said to hold no events."""
    sel = _Selection(from_ms=100, to_ms=200, streams_glob="*", feature_names=None)
    sel.add([rec("pump-1", ts, {"a": 1, "b": 2}) for ts in (1, 2)] + [rec("pump-2", 300, {"a": 1, "b": 2})])
    sel.add([rec("pump-1", ts, {"a": 1, "b": 2, "c": 3}) for ts in (100, 150, 200)])
    assert sel.finish("t") == ["a", "b", "c"]
    assert [s.shape for s in sel.series()] == [(3, 3)]
    keyed = _Selection(from_ms=100, to_ms=None, streams_glob="pump-*", feature_names=None)
    keyed.add([(json.dumps({"values": {"x": 1}}).encode(), b"fan-1", 150),  # stream from the key, broker time
               (json.dumps({"values": {"a": 1}}).encode(), b"pump-1", 50),
               (json.dumps({"values": {"b": 1}}).encode(), b"pump-1", 150)])
    assert keyed.finish("t") == ["b"]


def test_while_the_names_are_unknown_only_selected_messages_are_held_and_a_range_that_misses_says_where():
    """A range in seconds over events in milliseconds, no --features: every raw message of the topic was held in
    memory waiting for names that never came, then "no message with values ... pass --features" although they had
    values. Now only the selection's messages are held, and the error says where the events' ts are."""
    sel = _Selection(from_ms=1_764_150_000, to_ms=1_764_160_000, streams_glob="pump-*", feature_names=None)
    for poll in range(3):
        sel.add([rec("pump-1", 1_764_150_000_000 + poll * 100 + i, {"a": 1.0, "b": 2.0}) for i in range(100)]
                + [rec("fan-1", 1_764_150_000, {"x": 1.0}), (b"{oops", None, 0)])
    assert sel._pending == []
    assert sel.n_rejected == 3 and sel.first_rejection == "bad_json"  # counted as they would be with the names
    with pytest.raises(ValueError) as err:
        sel.finish("sensors")
    assert str(err.value) == ("no events of streams 'pump-*' in 'sensors' for the given time range (3 messages "
                              "skipped, the first as bad_json); the events' ts run from 1764150000000 to "
                              "1764150000299")
    # a right range near the topic's end: what comes before it is not held, what is in it is trained on
    late = _Selection(from_ms=1_000, to_ms=None, streams_glob="*", feature_names=None)
    late.add([rec("pump-1", ts, {"a": ts}) for ts in range(0, 1_000, 10)])
    late.add([rec("pump-1", 1_000, None), rec("pump-1", 999, None)])  # a selected one without values: counted
    assert late._pending == [] and late.names is None and late.reasons == {"missing_values": 1}
    late.add([rec("pump-1", 995, {"a": 0}), rec("pump-1", 1_001, {"a": 1}), rec("pump-1", 1_002, {"a": 2})])
    assert late.finish("sensors") == ["a"]
    assert [s.tolist() for s in late.series()] == [[[1.0], [2.0]]]
    assert late.n_rejected == 1 and late.first_rejection == "missing_values"  # the held one, decoded with the names
    # a stream id the daemon dead-letters (a control character) names no features
    odd = _Selection(from_ms=None, to_ms=None, streams_glob="*", feature_names=None)
    odd.add([rec("bad\nid", 1, {"x": 1.0}), rec("pump-1", 2, {"a": 1.0}), rec("pump-1", 3, {"a": 2.0})])
    assert odd.finish("sensors") == ["a"] and [s.tolist() for s in odd.series()] == [[[1.0], [2.0]]]


class _FakeConsumer:
    """kafka-python's KafkaConsumer as read_topic_series uses it, over the partitions of ``ends``, polls returning
    ``polls`` ((partition, offsets) each; stream p-1, ts 1_764_100_000_000 + a, value a = offset + 100 * partition):
    by default one partition of offsets 0..9 whose polls return 0..3, then (retention having deleted 4..6 while they
    were read) 7..9."""

    polls, ends = [(0, [0, 1, 2, 3]), (0, [7, 8, 9])], {0: 10}

    def __init__(self, **config) -> None:
        self.config, self.position_timeouts = config, []
        self._polls, self._pos = list(self.polls), dict.fromkeys(self.ends, 0)
        _FakeConsumer.last = self

    def partitions_for_topic(self, topic):
        return set(self.ends)

    def assign(self, parts):
        self.parts = {tp.partition: tp for tp in parts}

    def beginning_offsets(self, parts):
        return {tp: 0 for tp in parts}

    def end_offsets(self, parts):
        return {tp: self.ends[tp.partition] for tp in parts}

    def seek_to_beginning(self, *parts):
        pass

    def position(self, tp, timeout_ms=None):
        self.position_timeouts.append(timeout_ms)
        return self._pos[tp.partition]

    def poll(self, timeout_ms, max_records):
        from kafka.consumer.fetcher import ConsumerRecord

        if not self._polls:
            return {}
        p, offsets = self._polls.pop(0)
        self._pos[p] = offsets[-1] + 1
        return {self.parts[p]: [ConsumerRecord("t", p, 1, o, 1_764_100_000_000 + a, 0, b"p-1",
                                               json.dumps({"ts": 1_764_100_000_000 + a, "values": {"a": a}}).encode(),
                                               [], None, -1, -1, -1) for o in offsets for a in [o + 100 * p]]}

    def close(self):
        pass


def test_a_read_that_jumps_past_records_goes_on_from_the_log_start_and_says_so(monkeypatch, capsys):
    """The consumer kept kafka-python's auto_offset_reset='latest': a fetch that fell off the log start (retention
    deleting the segment being read) moved to the partition's end, the rest of it skipped without a word, and
    position() had no timeout (it waits for that reset's answer). Now: earliest, a timeout, and a warning."""
    import kafka

    monkeypatch.setattr(kafka, "KafkaConsumer", _FakeConsumer)
    series, names = read_topic_series("127.0.0.1:1", "t", None, None, "*", None, timeout_s=5)
    consumer = _FakeConsumer.last
    assert consumer.config["auto_offset_reset"] == "earliest"
    assert None not in consumer.position_timeouts
    assert names == ["a"] and [s[:, 0].tolist() for s in series] == [[0, 1, 2, 3, 7, 8, 9]]
    assert ("warning: partition 0 of 't': the read skipped 3 offsets whose records it never got"
            in capsys.readouterr().out)


def test_offsets_skipped_are_counted_from_the_log_start_within_polls_and_up_to_the_end():
    from pipelines.train_topic import _Gaps

    gaps = _Gaps({0: 5, 1: 0, 2: 0})
    gaps.add(0, [8, 9, 11])  # 5..7 gone before the first fetch, 10 between two records
    assert gaps.add(0, [11, 12]) == 1  # a record returned again is not a gap: left out, said
    gaps.add(1, [0, 1, 2])
    gaps.add(2, [0])
    gaps.finish({0: 13, 1: 6})  # 1: 3..5 never returned; 2 not finished (stopped early)
    assert dict(gaps.skipped) == {0: 4, 1: 3, 2: 0}
    assert [w.split(":")[1] for w in gaps.warnings("t")] == [" partition 0 of 't'", " partition 1 of 't'",
                                                             " partition 0 of 't'"]
    assert gaps.warnings("t")[2].endswith("went back (an offset reset to the log start?) and returned 1 records "
                                          "again: each was taken once")


def test_late_events_are_dropped_as_the_daemon_drops_them_not_sorted_into_the_series():
    """The daemon drops an event older than its stream's newest; training sorted each stream by ts, so a late
    event was moved into the middle of the series: trained and calibrated on a sequence the daemon never builds."""
    sel = _Selection(None, None, "*", ["a"])
    sel.add([rec("p-1", ts, [float(ts)]) for ts in (10, 20, 30)] + [rec("p-2", 5, [5.0])])
    sel.add([rec("p-1", 25, [99.0]), rec("p-1", 30, [30.5]), rec("p-2", 4, [99.0]), rec("p-1", 40, [40.0])])
    assert [s[:, 0].tolist() for s in sel.series()] == [[10.0, 20.0, 30.0, 30.5, 40.0], [5.0]]  # equal ts: taken
    assert sel.n_late == 2
    late = "late (older than an earlier event of their stream on their partition, dropped as the daemon does)"
    assert sel.skipped() == f"skipped 2 messages: 2 {late}"
    sel.add([(b"{oops", None, 0)])
    assert sel.skipped() == f"skipped 3 messages: 1 the daemon dead-letters (bad_json 1; first: bad_json); 2 {late}"


def test_event_times_far_ahead_of_the_broker_are_skipped_as_the_daemon_dead_letters_them(tmp_path, monkeypatch):
    """The daemon dead-letters (bad_timestamp) an event more than processing.max_event_time_ahead_s ahead of its
    record's broker timestamp; training kept it (a ts in microseconds: the newest, so in the validation part, where
    it raised the calibrated threshold)."""
    now = 1_764_100_000_000
    polls = [[rec("p-1", now + i, [float(i)], broker_ts=now) for i in range(5)]
             + [rec("p-1", now * 1000, [7.0], broker_ts=now),  # microseconds
                rec("p-1", now + 3_600_000, [8.0], broker_ts=now)]]  # an hour ahead
    sel = _Selection(None, None, "*", None)  # the default: a day
    for poll in polls:
        sel.add(poll)
    assert [s[:, 0].tolist() for s in sel.series()] == [[0.0, 1.0, 2.0, 3.0, 4.0, 8.0]]
    assert sel.n_rejected == 1 and sel.first_rejection == "bad_timestamp"
    assert sel.skipped() == "skipped 1 messages: 1 the daemon dead-letters (bad_timestamp 1; first: bad_timestamp)"
    strict = _Selection(None, None, "*", ["f0"], max_ahead_s=60)  # a config's processing.max_event_time_ahead_s
    strict.add(polls[0])
    assert [s[:, 0].tolist() for s in strict.series()] == [[0.0, 1.0, 2.0, 3.0, 4.0]] and strict.n_rejected == 2
    never = _Selection(None, None, "*", ["f0"], max_ahead_s=0)  # 0: never, as in the daemon
    never.add(polls[0])
    assert never.n_rejected == 0

    import yaml

    from pipelines import train_cmd
    from pipelines.cli import main

    cfg = yaml.safe_load(open("deploy/config.example.yaml"))
    cfg.setdefault("processing", {})["max_event_time_ahead_s"] = 60
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    asked = {}

    def read(*args, **kwargs):
        asked.update(kwargs)
        raise ValueError("read")

    monkeypatch.setattr(train_cmd, "read_topic_series", read)
    argv = ["train", "--kafka-topic", "t", "--name", "m", "--models-dir", str(tmp_path / "models")]
    assert main([*argv, "-c", str(tmp_path / "c.yaml")]) == 2 and asked["max_ahead_s"] == 60
    assert main(argv) == 2 and asked["max_ahead_s"] == 86400


def test_without_features_the_names_are_the_union_over_the_selection_in_first_seen_order():
    """The names were the first selected message's keys: a first message {"a": ..} fixed a model without "b", every
    later message with "b" was skipped as unknown_feature, and the daemon serving it dead-lettered them all."""
    def m(ts, vals, stream="p-1"):
        return json.dumps({"stream": stream, "ts": ts, "values": vals}).encode(), None, ts

    sel = _Selection(100, None, "p-*", None)
    sel.add([m(100, {"a": 1.0}), m(101, {"a": 2.0, "b": 20.0}), m(50, {"z": 1.0}), m(102, {"x": 1.0}, "fan-1")])
    sel.add([m(103, {"c": 300.0, "a": 3.0}), m(104, {"b": 40.0, "a": 4.0, "c": 400.0})])
    assert sel.finish("t") == ["a", "b", "c"]  # not z (before --from-ms), not x (another stream)
    (series,) = sel.series()
    np.testing.assert_array_equal(series, [[1.0, np.nan, np.nan], [2.0, 20.0, np.nan], [3.0, np.nan, 300.0],
                                           [4.0, 40.0, 400.0]])  # absent: missing values, as the daemon reads them
    assert series.dtype == np.float32
    assert sel.n_rejected == 1 and sel.first_rejection == "unknown_feature"  # z: the daemon dead-letters it
    given = _Selection(None, None, "*", ["a"])  # --features: those, and no other
    given.add([m(100, {"a": 1.0}), m(101, {"a": 2.0, "b": 20.0})])
    assert given.finish("t") == ["a"] and given.n_rejected == 1 and given.first_rejection == "unknown_feature"
    blank = _Selection(None, None, "*", None)  # a blank key after the first message: skipped, not the whole read
    blank.add([m(100, {"a": 1.0}), m(101, {"a": 2.0, "": 20.0}), m(102, {"a": 3.0, " ": 1.0, "b": 1.0})])
    assert blank.finish("t") == ["a"] and blank.reasons == {"unknown_feature": 2}


def test_a_time_range_in_seconds_is_warned_about_before_the_topic_is_read(monkeypatch, capsys):
    """Bounds that look like seconds were said only when the range then selected nothing: --from-ms in seconds
    alone selected the whole topic without a word."""
    import kafka

    monkeypatch.setattr(kafka, "KafkaConsumer", _FakeConsumer)
    series, _ = read_topic_series("127.0.0.1:1", "t", 1_764_100_000, None, "*", None, timeout_s=5)
    assert len(series[0]) == 7  # the whole (fake) topic
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("warning: --from-ms 1764100000 looks like seconds: ts is epoch milliseconds "
                      "(--from-ms 1764100000000?)")
    with pytest.raises(ValueError, match="for the given time range"):  # nothing selected
        read_topic_series("127.0.0.1:1", "t", 0, 1_764_200_000, "*", None, timeout_s=5)  # 0: no warning
    assert capsys.readouterr().out.splitlines()[0] == (
        "warning: --to-ms 1764200000 looks like seconds: ts is epoch milliseconds (--to-ms 1764200000000?)")
    read_topic_series("127.0.0.1:1", "t", 1_764_100_000_000, 1_764_200_000_000, "*", None, timeout_s=5)
    assert "looks like seconds" not in capsys.readouterr().out


def test_late_events_are_decided_per_partition_and_a_stream_on_several_is_joined_by_event_time(monkeypatch, capsys):
    """Late events were decided in poll order across partitions: a stream whose key moved to a new partition
    (partitions added) had its older partition's events, read after the new one's first poll, dropped as late."""
    import kafka

    monkeypatch.setattr(kafka, "KafkaConsumer", _FakeConsumer)
    monkeypatch.setattr(_FakeConsumer, "ends", {0: 6, 1: 3})
    monkeypatch.setattr(_FakeConsumer, "polls", [(1, [0, 1, 2]), (0, [0, 1, 2, 3, 4, 5])])
    series, _ = read_topic_series("127.0.0.1:1", "t", None, None, "*", None, timeout_s=5)
    assert [s[:, 0].tolist() for s in series] == [[0, 1, 2, 3, 4, 5, 100, 101, 102]]  # was [100, 101, 102]
    assert capsys.readouterr().out == ("note: 1 streams read from several partitions (partitions added?): each "
                                       "partition's events taken in offset order, then joined by event time (none "
                                       "counted late across them)\n")
    sel = _Selection(None, None, "*", ["a"])  # late within a partition: as the daemon, in offset order
    for sel.partition, times in [(0, (1, 2, 3)), (3, (10, 11)), (0, (4, 2, 5, 10)), (3, (9, 12))]:
        sel.add([rec("p-1", ts, [ts]) for ts in times])
    assert [s[:, 0].tolist() for s in sel.series()] == [[1, 2, 3, 4, 5, 10, 10, 11, 12]] and sel.n_late == 2


def test_events_outside_the_range_count_for_the_late_rule():
    """The running maximum was taken after the range filter: an event past --to-ms followed by older in-range ones
    of its stream (a producer clock ahead for a while) left those in, where the daemon drops them."""
    sel = _Selection(None, 100, "*", ["a"])
    sel.add([rec("p-1", ts, [ts]) for ts in (10, 500, 20, 20, 15)])
    assert [s[:, 0].tolist() for s in sel.series()] == [[10.0]] and sel.n_late == 3  # was [10, 20, 20], 1
    held = _Selection(None, 100, "*", None)  # the names not known yet: its time counts all the same
    held.add([rec("p-1", 500, {"a": 0}), rec("p-2", 10**15, {"a": 0}, broker_ts=1_764_100_000_000)])  # 2: far ahead
    held.add([rec("p-1", 20, {"a": 1}), rec("p-2", 30, {"a": 2})])
    held.partition = 1
    held.add([rec("p-1", 25, {"a": 3})])
    assert [s[:, 0].tolist() for s in held.series()] == [[2.0], [3.0]] and held.n_late == 1


def test_a_consumer_that_goes_back_does_not_feed_records_twice(monkeypatch, capsys):
    """An offset reset to the log start (earliest) re-read a partition: its records went to the selection again,
    counted late or, at the stream's newest ts, trained on twice, without a word."""
    import kafka

    monkeypatch.setattr(kafka, "KafkaConsumer", _FakeConsumer)
    monkeypatch.setattr(_FakeConsumer, "polls", [(0, [0, 1, 2, 3]), (0, list(range(10)))])
    series, _ = read_topic_series("127.0.0.1:1", "t", None, None, "*", None, timeout_s=5)
    assert [s[:, 0].tolist() for s in series] == [list(range(10))]  # was 0, 1, 2, 3, 3, 4, ..., 9
    assert capsys.readouterr().out == ("warning: partition 0 of 't': the consumer went back (an offset reset to the "
                                       "log start?) and returned 4 records again: each was taken once\n")


def test_feature_names_come_only_from_messages_taken_with_them():
    """A message that named a new key and was then skipped for another reason (a bad value, non-finite, too far
    ahead, late) added that key: a model with a constant feature, whose key the daemon then took."""
    now = 1_764_100_000_000
    sel = _Selection(None, None, "*", None)
    sel.add([rec("p-1", now + i, {"a": i}) for i in range(5)])
    sel.add([rec("p-1", now + 5, {"a": 1, "zzz": "oops"}), rec("p-1", now + 5, {"a": 1, "huge": 1e300}),
             rec("p-1", now + 10**12, {"a": 1, "future": 3}, broker_ts=now), rec("p-1", now, {"a": 1, "old": 1}),
             rec("p-1", now + 7, {"a": 7, "b": 70})])
    assert sel.finish("t") == ["a", "b"]  # was a, zzz, huge, future, old, b
    np.testing.assert_array_equal(sel.series()[0][:, 0], [0, 1, 2, 3, 4, 7])
    assert sel.reasons == {"unknown_feature": 4}  # as the daemon serving the model dead-letters them


@pytest.mark.parametrize("first", [
    b'{"stream":"p-1","ts":1764100000000,"values":{"a":1,"zzz":"oops"}}',  # a bad value type
    b'{"stream":"p-1","ts":1764100000000,"values":{"a":1,"huge":1e300}}',  # non-finite as float32
    b'{"stream":"p-1","ts":1764100000000,"values":{"a":1,"spare":NaN}}',  # json.loads takes these three, the
    b'{"stream":"p-1","ts":1764100000000,"values":{"a":1,"n":1e999}}',  # daemon's parser does not
    b'{"stream":"p-1","ts":1764100000000,"values":{"a":1,"\\ud800x":2}}',
    b'{"stream":"p-1","ts":1764100000000,"values":{"a":1,"b":2},"value":3}',  # both forms
    b'{"stream":"p-1","ts":1764100900000,"values":{"a":1,"future":3}}',  # far ahead of its broker time
    b'{"stream":"p-0","ts":1764100000000,"values":{"a":1,"old":1}}',  # late: behind an event past --to-ms
])
def test_the_first_names_come_only_from_a_message_taken_with_them(first):
    """The first selected message with values gave the names whatever then became of it (dead-lettered, far
    ahead, late): its keys became constant model features, which the daemon serving the model then took."""
    now = 1_764_100_000_000
    sel = _Selection(None, now + 1_000_000, "*", None, max_ahead_s=60)
    sel.add([rec("p-0", now + 2_000_000, {"a": 0})])  # past --to-ms: counts for the late rule
    sel.add([(first, b"p-1", now)] + [rec("p-1", now + 1 + i, {"a": i}, broker_ts=now) for i in range(3)])
    assert sel.finish("t") == ["a"]  # was a and the first message's other key
    assert sel.n_late + sel.n_rejected == 1 and [s[:, 0].tolist() for s in sel.series()] == [[0.0, 1.0, 2.0]]


class _FetcherConsumer(FetcherConsumer):
    """kafka-python's KafkaConsumer as read_topic_series uses it, on kafka-python's real Fetcher and record batches:
    one partition, fetches answered from ``log``; only the broker's answers are made here."""

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, parts):
        self.subscriptions.assign_from_user(parts)

    def beginning_offsets(self, parts):
        return dict.fromkeys(parts, 0)

    def end_offsets(self, parts):
        return dict.fromkeys(parts, self.log[-1][0] + 1)

    def seek_to_beginning(self, *parts):
        for tp in parts:
            self.subscriptions.seek(tp, 0)

    def close(self):
        pass


def _record_batch(offsets: list[int], bad: set[int] = frozenset()) -> tuple[int, bytes]:
    """Records of stream p-1, ts and value a = the offset; those at ``bad`` with a header name that is not UTF-8."""
    return record_batch(offsets, bad, value=lambda o: json.dumps({"ts": 1_764_100_000_000 + o, "values": {"a": o}})
                        .encode(), key=b"p-1", ts=lambda o: 1_764_100_000_000 + o)


def test_a_record_kafka_python_cannot_read_is_skipped_as_the_daemon_dead_letters_it(monkeypatch, capsys):
    """kafka-python's CorruptRecordError (a header name that is not UTF-8) came out of the read: training crashed,
    where the daemon dead-letters such a record (unreadable_record) and reads on. kafka-python parses a batch from
    its start, so the records after the bad one in its batch are unreadable too, each skipped."""
    import kafka

    monkeypatch.setattr(kafka, "KafkaConsumer", _FetcherConsumer)
    monkeypatch.setattr(_FetcherConsumer, "log", [_record_batch([0, 1, 2]), _record_batch([3, 4, 5, 6], bad={4}),
                                                  _record_batch([7, 8])])
    series, names = read_topic_series("127.0.0.1:1", "t", None, None, "*", None, timeout_s=5)
    assert names == ["a"] and [s[:, 0].tolist() for s in series] == [[0, 1, 2, 3, 7, 8]]
    assert capsys.readouterr().out == ("skipped 3 messages: 3 the daemon dead-letters (unreadable_record 3; first: "
                                       "unreadable_record)\n")  # no offsets said skipped as never returned


def test_the_selection_keeps_no_python_object_per_row():
    """Each kept row held its own stream id string (and series() a Python int and list slot per row): about 184 B a
    row at F=4 where 24 B was documented. Rows are now arrays only (stream indices); series() sorts them in place."""
    sel = _Selection(None, None, "*", ["a"])
    for poll in range(4):
        sel.add([rec(f"p-{i % 3}", poll * 1000 + i // 3, [poll * 1000 + i]) for i in range(300)])
        sel.add([rec("p-0", 0, [-1.0])])  # late
    before = [s[:, 0].tolist() for s in sel.series()]
    assert [len(s) for s in before] == [400, 400, 400] and sel.n_late == 4

    def sizes(obj, depth=0):  # the lengths of every container the selection holds, arrays excepted
        if isinstance(obj, list | tuple | dict | set) and depth < 4:
            yield len(obj)
            for item in obj.values() if isinstance(obj, dict) else obj:
                yield from sizes(item, depth + 1)

    assert max(sizes(list(vars(sel).values()))) < 100  # was 1200: a str per row
    sel.add([rec("p-3", 5, [5.0]), rec("p-1", 4000, [4000.0])])  # after series(): added to what it sorted
    after = [s[:, 0].tolist() for s in sel.series()]
    assert after == [before[0], before[1] + [4000.0], before[2], [5.0]]
    assert before[0] == sorted(before[0]) and before[0][:3] == [0.0, 3.0, 6.0]


def test_while_the_names_are_unknown_messages_without_values_are_counted_not_held():
    """Every selected message without values was held as raw bytes until the names came (a topic of heartbeats:
    all of them), although the daemon dead-letters each whatever the names."""
    sel = _Selection(None, None, "*", None)
    for _ in range(3):
        sel.add([rec("p-1", 1, None), rec("p-1", 2, []), rec("p-1", 3, {}), rec("p-1", 4, "x"),
                 (b'{"stream":"p-1","ts":5,"values":[],"value":1}', None, 0)] * 100)
    assert sel._pending == [] and sel.names is None  # was 1500 raw messages
    assert sel.reasons == {"missing_values": 600, "wrong_length": 300, "bad_value_type": 600}
    sel.add([rec("p-1", 6, [1.0]), rec("p-1", 7, [2.0])])
    assert sel.finish("t") == ["f0"] and [s.tolist() for s in sel.series()] == [[[1.0], [2.0]]]
    assert sel.n_rejected == 1500
