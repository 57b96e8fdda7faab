"""Training events read from a Kafka topic time range (``anomalyd train --kafka-topic``): decoded, validated and
kept per stream as the daemon would take them (its dead letters, late events and far-ahead times left out). The
Kafka read is here; what is taken from each poll is :mod:`pipelines.train_selection`'s."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import KafkaConfig, ProcessingConfig
from .intake import _MS_LOW
from .kafka_security import client_security_config, kafka_python_bootstrap
from .train_selection import _names_problem, _Selection

__all__ = ["check_selection", "parse_features", "read_topic_series"]


def parse_features(text: str) -> list[str]:
    """``--features``' comma-separated names, each stripped; ValueError naming --features unless they are distinct
    and non-empty (the daemon's loader refuses a model whose names are not: the version would never be served)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"--features: an empty name in {text!r} (comma-separated names: none between two commas "
                         "or at either end)")
    if problem := _names_problem(names):
        raise ValueError(f"--features: {problem}, got {text!r}")
    return names

def check_selection(from_ms: int | None, to_ms: int | None, feature_names: list[str] | None) -> None:
    """ValueError, before the topic is read, for a time range that selects nothing or unusable feature names."""
    if from_ms is not None and to_ms is not None and from_ms > to_ms:
        raise ValueError(f"--from-ms: {from_ms} is after --to-ms {to_ms}: the range selects nothing")
    if feature_names is not None and (problem := _names_problem(feature_names)):
        raise ValueError(f"--features: {problem}, got {feature_names!r:.200}")


def _unit_warnings(from_ms: int | None, to_ms: int | None) -> list[str]:
    """A warning for each bound that looks like seconds (as the events' ts would below _MS_LOW): --from-ms alone
    in seconds selects the whole topic without a word."""
    return [f"warning: {flag} {value} looks like seconds: ts is epoch milliseconds ({flag} {value * 1000}?)"
            for flag, value in (("--from-ms", from_ms), ("--to-ms", to_ms))
            if value is not None and 0 < value < _MS_LOW]

class _Gaps:
    """Per partition, the offsets a read moved past without returning their records: from the log start taken
    when the read began to the end offsets (records deleted by retention while they were read, after which the
    fetch went on from the new log start; a compacted topic and transaction markers leave such gaps too)."""

    def __init__(self, starts: Mapping[int, int]) -> None:
        self._next = dict(starts)  # partition -> the next offset expected
        self.skipped: dict[int, int] = defaultdict(int)
        self.again: dict[int, int] = defaultdict(int)  # records returned again (the consumer went back)

    def add(self, partition: int, offsets: list[int]) -> int:
        """A poll's records of ``partition``, their offsets ascending: how many of the first are at offsets already
        read (returned again: an offset reset to the log start), to be left out."""
        expected = self._next[partition]
        self.again[partition] += (again := sum(o < expected for o in offsets))
        if new := offsets[again:]:
            self.skipped[partition] += new[-1] + 1 - expected - len(new)
            self._next[partition] = new[-1] + 1
        return again

    def finish(self, ends: Mapping[int, int]) -> None:
        """The partitions read to their ``ends``: offsets below the end never returned are skipped too."""
        for partition, end in ends.items():
            if self._next[partition] < end:
                self.skipped[partition] += end - self._next[partition]
                self._next[partition] = end

    def warnings(self, topic: str) -> list[str]:
        return [f"warning: partition {p} of {topic!r}: the read skipped {n} offsets whose records it never got "
                "(deleted by retention while it read? a compacted topic or transaction markers also leave such "
                "gaps): the selection may lack their events"
                for p, n in sorted(self.skipped.items()) if n > 0] + [
                f"warning: partition {p} of {topic!r}: the consumer went back (an offset reset to the log start?) and "
                f"returned {n} records again: each was taken once" for p, n in sorted(self.again.items()) if n > 0]


def read_topic_series(bootstrap: str, topic: str, from_ms: int | None, to_ms: int | None, streams_glob: str,
                      feature_names: list[str] | None, timeout_s: float = 30.0,
                      security: Mapping[str, Any] | None = None,
                      max_message_bytes: int = KafkaConfig.max_message_bytes,
                      max_ahead_s: float = ProcessingConfig.max_event_time_ahead_s,
                      ) -> tuple[list[np.ndarray], list[str]]:
    """Events of ``topic`` with from_ms <= ts <= to_ms, decoded and validated exactly as the daemon does, grouped
    per stream id as (T, F) series (see :meth:`_Selection.series`). Messages the daemon would dead-letter, and late
    events (older than an earlier one of their stream on their partition, which the daemon drops), are skipped
    (counted), and so are records kafka-python cannot read (which the daemon dead-letters as unreadable_record);
    records a consumer that went back returns again are taken once.
    ``security``: the config's ``kafka.security`` settings (read with kafka-python); ``max_message_bytes`` and
    ``max_ahead_s``: its kafka.max_message_bytes and processing.max_event_time_ahead_s (larger messages, and events
    further ahead of their record's broker timestamp, are dead-lettered by the daemon: skipped).

    ``ts`` is the event time (the message's own ``ts``), which need not follow the broker's timestamps (a replay
    of history, a producer ahead of the clock): every partition is read from its first retained record to the
    end offsets taken at the start, each poll decoded as it arrives, keeping only the selected rows. Reading
    stops early only after ``timeout_s`` without a record, and then says which partitions it did not finish."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import CorruptRecordError

    from .source_kafka_python import skip_unreadable

    check_selection(from_ms, to_ms, feature_names)
    for line in _unit_warnings(from_ms, to_ms):
        print(line)
    with kafka_python_bootstrap(bootstrap, security):
        # earliest: a fetch that falls off the log start (retention deleting what is being read) goes on from the
        # new start, the records lost said below; kafka-python's default, latest, skipped the rest silently
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                 consumer_timeout_ms=int(timeout_s * 1000), auto_offset_reset="earliest",
                                 **client_security_config("kafka-python", security))
    selection = _Selection(from_ms, to_ms, streams_glob, feature_names, max_message_bytes, max_ahead_s)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not parts:
            raise ValueError(f"topic {topic!r} does not exist or has no partitions")
        consumer.assign(parts)
        starts, ends = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        consumer.seek_to_beginning(*parts)  # the first retained record
        gaps = _Gaps({tp.partition: starts[tp] for tp in parts})
        wait_ms = int(min(timeout_s, 1.0) * 1000)  # position() waits for a pending offset reset: None if not done
        deadline = time.monotonic() + timeout_s
        while True:
            at = {tp: consumer.position(tp, timeout_ms=wait_ms) for tp in parts}
            if not (behind := {tp.partition: (pos, ends[tp]) for tp, pos in at.items()
                               if pos is None or pos < ends[tp]}):
                gaps.finish({tp.partition: ends[tp] for tp in parts})
                break
            if time.monotonic() > deadline:
                print(f"stopped reading {topic!r}: no record for {timeout_s:g}s; partitions not read to the end "
                      f"(position, end): {behind}")
                gaps.finish({tp.partition: ends[tp] for tp in parts if tp.partition not in behind})
                break
            try:
                polled = consumer.poll(timeout_ms=500, max_records=10000)
            except CorruptRecordError as exc:
                tp, offset = skip_unreadable(consumer, exc, wait_ms)  # as the daemon's source
                deadline = time.monotonic() + timeout_s
                if not gaps.add(tp.partition, [offset]):
                    selection.unreadable()
                continue
            for tp, recs in polled.items():
                deadline = time.monotonic() + timeout_s
                again = gaps.add(tp.partition, [r.offset for r in recs])
                selection.partition = tp.partition
                selection.add([(r.value or b"", r.key, r.timestamp) for r in recs[again:]])
    finally:
        consumer.close()
    for line in gaps.warnings(topic):
        print(line)
    names = selection.finish(topic)
    series = selection.series()
    if skipped := selection.skipped():
        print(skipped)
    if not series:
        raise ValueError(selection.nothing_selected(topic))
    return series, list(names)
