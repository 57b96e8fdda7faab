"""KafkaPythonSource with records kafka-python cannot parse, through kafka-python's own fetcher and record batches
(header names that are not UTF-8); only the broker's fetch answers are made here. The real broker's case is
tests/integration/test_unreadable_records.py."""

from __future__ import annotations

import struct
import threading
from types import SimpleNamespace

from kafka.consumer.fetcher import CompletedFetch, Fetcher
from kafka.consumer.subscription_state import SubscriptionState
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import TopicPartition

from pipelines.source_kafka_python import KafkaPythonSource

TP = TopicPartition("t", 0)


class _NotUtf8(str):
    def encode(self, *_args, **_kwargs) -> bytes:
        return b"tenant-\xff\xfe"


def _batch(base: int, offsets: list[int], bad: set[int] = frozenset()) -> tuple[int, bytes]:
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    for offset in offsets:
        builder.append(offset - base, 1000 + offset, None, b"v%d" % offset,
                       [(_NotUtf8("tenant"), b"a")] if offset in bad else [])
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, base)  # the base offset, which the broker sets (outside the CRC)
    return offsets[-1], bytes(buf)


class _Consumer:
    """kafka-python's KafkaConsumer as the source uses it, on its real Fetcher; fetches answered from ``log``."""

    def __init__(self, log: list[tuple[int, bytes]]) -> None:
        self.subscriptions = SubscriptionState()
        self.subscriptions.assign_from_user([TP])
        self.subscriptions.seek(TP, 0)
        self._fetcher = Fetcher(SimpleNamespace(_manager=SimpleNamespace(_net=None, cluster=None,
                                                                         broker_version=(3, 0))), self.subscriptions)
        self.log = log

    def _fetch(self) -> None:
        for tp in self._fetcher._fetchable_partitions():
            at = self.position(tp)
            data = b"".join(buf for last, buf in self.log if last >= at)  # whole batches, from the one holding it
            self._fetcher._completed_fetches.append(CompletedFetch(tp, at, 11, SimpleNamespace(
                error_code=0, high_watermark=10**6, records=data, aborted_transactions=None, diverging_epoch=None,
                preferred_read_replica=-1), None))

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        records, partial = self._fetcher.fetched_records(max_records)
        if not partial:
            self._fetch()
        return records or self._fetcher.fetched_records(max_records)[0]

    def position(self, tp, timeout_ms=None) -> int:
        return self.subscriptions.assignment[tp].position.offset

    def seek(self, tp, offset: int) -> None:
        self.subscriptions.seek(tp, offset)


def _source(log: list[tuple[int, bytes]]) -> KafkaPythonSource:
    source = object.__new__(KafkaPythonSource)  # its consumer made here, not connected to brokers
    source._coordinator, source._consumer, source._last_unreadable = None, _Consumer(log), None
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
    log = [_batch(0, [0, 1, 2]), _batch(3, [3, 4, 5, 6], bad={4}), _batch(7, [7, 8])]
    for max_records in (500, 2):
        assert _read(_source(log), max_records=max_records) == [
            (0, "v0"), (1, "v1"), (2, "v2"), (3, "v3"), (4, "unreadable"), (5, "unreadable"), (6, "unreadable"),
            (7, "v7"), (8, "v8")]


def test_a_seek_back_to_an_unreadable_record_reads_it_again_rather_than_hang() -> None:
    """Positioning a newly assigned partition seeks to the first record polled (or the commit), here the unreadable
    one: kafka-python's failed parse, left in its fetcher, made the next poll loop for ever."""
    source = _source([_batch(0, [0, 1, 2], bad={0}), _batch(3, [3, 4])])
    first = source.poll(500, 0)
    assert first.offset.tolist() == [0] and first.unreadable
    source._consumer.seek(TP, 0)  # as Positions.position_new does
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_read(source, polls=6)), daemon=True)
    reader.start()
    reader.join(timeout=30)  # a hang guard
    assert not reader.is_alive(), "kafka-python's poll looped on the failed parse"
    assert got[0] == [(0, "unreadable"), (1, "unreadable"), (2, "unreadable"), (3, "v3"), (4, "v4")]
