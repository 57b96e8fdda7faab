"""KafkaPythonSource with records kafka-python cannot parse, through kafka-python's own fetcher and record batches
(header names that are not UTF-8); only the broker's fetch answers are made here. The real broker's case is
tests/integration/test_unreadable_records.py."""

from __future__ import annotations

import threading

from kafka.structs import TopicPartition

from pipelines.source_kafka_python import KafkaPythonSource
from tests.kafka_python_fetcher import FetcherConsumer, record_batch

TP = TopicPartition("t", 0)


class _Consumer(FetcherConsumer):
    def __init__(self, log: list[tuple[int, bytes]]) -> None:
        super().__init__()
        self.subscriptions.assign_from_user([TP])
        self.subscriptions.seek(TP, 0)
        self.log = log


def _source(log: list[tuple[int, bytes]]) -> KafkaPythonSource:
    source = object.__new__(KafkaPythonSource)  # its consumer made here, not connected to brokers
    source._coordinator, source._consumer, source._last_unreadable = None, _Consumer(log), {}
    return source


def _read(source: KafkaPythonSource, polls: int = 20, max_records: int = 500) -> list[tuple[int, str]]:
    out = []
    for _ in range(polls):
        batch = source.poll(max_records, 0)
        out += [(int(batch.offset[i]), "unreadable" if batch.unreadable and i in batch.unreadable
                 else batch.value[i].decode()) for i in range(len(batch))]
    return out


def test_a_bad_record_and_the_rest_of_its_batch_are_unreadable_and_reading_goes_on() -> None:
    """CorruptRecordError came out of every poll, the partition stood still. Every offset now comes once, in order:
    the bad record and those after it in its batch (kafka-python parses a batch from its start) unreadable."""
    log = [record_batch([0, 1, 2]), record_batch([3, 4, 5, 6], bad={4}), record_batch([7, 8])]
    for max_records in (500, 2):
        assert _read(_source(log), max_records=max_records) == [
            (0, "v0"), (1, "v1"), (2, "v2"), (3, "v3"), (4, "unreadable"), (5, "unreadable"), (6, "unreadable"),
            (7, "v7"), (8, "v8")]


def test_a_seek_back_to_an_unreadable_record_reads_it_again_rather_than_hang() -> None:
    """Positioning a newly assigned partition seeks to the first record polled (or the commit), here the unreadable
    one: kafka-python's failed parse, left in its fetcher, made the next poll loop for ever."""
    source = _source([record_batch([0, 1, 2], bad={0}), record_batch([3, 4])])
    first = source.poll(500, 0)
    assert first.offset.tolist() == [0] and first.unreadable
    source._consumer.seek(TP, 0)  # as Positions.position_new does
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_read(source, polls=6)), daemon=True)
    reader.start()
    reader.join(timeout=30)  # a hang guard
    assert not reader.is_alive(), "kafka-python's poll looped on the failed parse"
    assert got[0] == [(0, "unreadable"), (1, "unreadable"), (2, "unreadable"), (3, "v3"), (4, "v4")]
