"""kafka-python's consumer on its own Fetcher and record batches, with only the broker's fetch answers made here:
for records kafka-python cannot parse (a header name that is not UTF-8), which a real broker takes but tests
need in exact batches. The real broker's case is tests/integration/test_unreadable_records.py."""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import SimpleNamespace

from kafka.consumer.fetcher import CompletedFetch, Fetcher
from kafka.consumer.subscription_state import SubscriptionState
from kafka.record.default_records import DefaultRecordBatchBuilder


class NotUtf8(str):
    """A header name kafka-python's producer side writes as bytes that are not UTF-8 (it calls ``str.encode``)."""

    def encode(self, *_args, **_kwargs) -> bytes:
        return b"tenant-\xff\xfe"


def record_batch(offsets: list[int], bad: set[int] = frozenset(), value: Callable[[int], bytes] = b"v%d".__mod__,
                 key: bytes | None = None, ts: Callable[[int], int] = (1000).__add__) -> tuple[int, bytes]:
    """``(last offset, batch)``: one record a offset, ``value(offset)``, those at ``bad`` with a header name that
    is not UTF-8."""
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    for offset in offsets:
        builder.append(offset - offsets[0], ts(offset), key, value(offset),
                       [(NotUtf8("tenant"), b"a")] if offset in bad else [])
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, offsets[0])  # the base offset, which the broker sets (outside the CRC)
    return offsets[-1], bytes(buf)


class FetcherConsumer:
    """The consumer calls the sources make (poll, position, seek), on kafka-python's real Fetcher; fetches are
    answered from ``log`` (``record_batch`` results), whole batches from the one holding the position."""

    log: list[tuple[int, bytes]] = []

    def __init__(self, **_config) -> None:
        self.subscriptions = SubscriptionState()
        self._fetcher = Fetcher(SimpleNamespace(_manager=SimpleNamespace(_net=None, cluster=None,
                                                                         broker_version=(3, 0))), self.subscriptions)

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        records, partial = self._fetcher.fetched_records(max_records)
        if not partial:
            for tp in self._fetcher._fetchable_partitions():
                at = self.position(tp)
                data = b"".join(buf for last, buf in self.log if last >= at)
                self._fetcher._completed_fetches.append(CompletedFetch(tp, at, 11, SimpleNamespace(
                    error_code=0, high_watermark=10**6, records=data, aborted_transactions=None, diverging_epoch=None,
                    preferred_read_replica=-1), None))
        return records or self._fetcher.fetched_records(max_records)[0]

    def position(self, tp, timeout_ms=None) -> int:
        return self.subscriptions.assignment[tp].position.offset

    def seek(self, tp, offset: int) -> None:
        self.subscriptions.seek(tp, offset)
