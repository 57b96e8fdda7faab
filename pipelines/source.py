"""Kafka consumers behind one small interface: kafka-python (default) or confluent-kafka (extra ``fast``).

Both give the daemon the same semantics: a consumer group, no auto-commit, batch polls returned as columns,
explicit commits with metadata, rebalance callbacks run inside ``poll`` on the polling thread. This module holds
the interface (:class:`Source`, :class:`RecordBatch`) and :func:`make_source`; the clients are in
:mod:`pipelines.source_kafka_python` and :mod:`pipelines.source_confluent`, imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

FETCH_MIN_BYTES = 65536  # kafka.fetch_min_bytes default: the broker answers a fetch once it has this much ...
FETCH_MAX_WAIT_MS = 10  # ... or after this long (benchmarks/RESULTS.md, item 18)
METADATA_MAX_AGE_MS = 30_000  # topic metadata every 30 s, not the clients' 5 min: new partitions are seen sooner
LOOKUP_TIMEOUT_S = 10.0  # committed() and first_offsets(): all the partitions of one call within this
UNREADABLE = "unreadable_record"  # the dead-letter reason of a record the Kafka client could not read
METADATA_END = "\x00"  # after every commit's metadata, as confluent-kafka writes it (KafkaPythonSource._offsets)

__all__ = ["TopicPartition", "RecordBatch", "Source", "make_source", "CommitDone", "KafkaCommitError",
           "CommittedUnreadable", "UNREADABLE"]

TopicPartition = tuple[str, int]
RebalanceCallback = Callable[[list[TopicPartition]], None]
AssignCallback = RebalanceCallback
CommitDone = Callable[[BaseException | None], None]  # a commit's outcome: None, or why it failed


@dataclass
class RecordBatch:
    """One poll's records as columns, in partition order then offset order."""

    topic: list[str]
    partition: np.ndarray  # (N,) int32
    offset: np.ndarray  # (N,) int64
    timestamp: np.ndarray  # (N,) int64 broker/producer timestamp, ms
    key: list[bytes | None]
    value: list[bytes]
    # the headers of the record at a position, read only when asked (a dead letter keeps them); None: no headers
    headers_of: Callable[[int], list[tuple[str, bytes]]] | None = None
    # positions of records the client could not read (their value empty), and why: dead-lettered as UNREADABLE
    unreadable: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.value)

    def headers(self, i: int) -> list[tuple[str, bytes]]:
        """The original headers of record ``i`` ([] when it has none)."""
        return self.headers_of(i) if self.headers_of is not None else []

    def select(self, idx: np.ndarray) -> RecordBatch:
        """The records at positions ``idx`` (in that order)."""
        of, bad = self.headers_of, self.unreadable
        return RecordBatch([self.topic[i] for i in idx], self.partition[idx], self.offset[idx], self.timestamp[idx],
                           [self.key[i] for i in idx], [self.value[i] for i in idx],
                           None if of is None else lambda i: of(int(idx[i])),
                           bad and {j: bad[int(i)] for j, i in enumerate(idx) if int(i) in bad})

    @classmethod
    def empty(cls) -> RecordBatch:
        return cls([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), [], [])


class Source(Protocol):
    def poll(self, max_records: int, timeout_ms: int) -> RecordBatch: ...
    def commit(self, offsets: Mapping[TopicPartition, tuple[int, str]], timeout_s: float | None = None) -> None:
        """Synchronously commit ``{tp: (next offset, metadata)}``; raises when it fails, or when no answer came
        within ``timeout_s`` (None: the client's own limit, none at all for confluent-kafka)."""
    def commit_async(self, offsets: Mapping[TopicPartition, tuple[int, str]], done: CommitDone) -> None:
        """Send the commit and return; ``done(error or None)`` is called from a later ``poll`` (on the polling
        thread), or never when the brokers never answer. A broker that hangs held a synchronous commit (and the
        loop) for 30 s (kafka-python) or until it woke up (confluent-kafka)."""
    rebalance_commit_answered_later: bool  # commit_in_rebalance only sends; its answer comes from a later poll
    def commit_in_rebalance(self, offsets: Mapping[TopicPartition, tuple[int, str]], answered: CommitDone) -> None:
        """Commit from inside a rebalance callback: synchronously (raises when it fails; confluent-kafka), or,
        with ``rebalance_commit_answered_later`` (kafka-python 3 allows no blocking call there), only sent, its
        answer given to ``answered(error or None)`` from a later ``poll``."""
    def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, str] | None]:
        """The group's committed ``(offset, metadata)`` of each partition (None: no commit); raises when the brokers
        give no answer within LOOKUP_TIMEOUT_S (tried again after the next poll), and :class:`CommittedUnreadable`
        when asking again cannot help."""
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def first_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset each partition still holds (its log start, which retention moves up), within
        LOOKUP_TIMEOUT_S; a partition the brokers did not answer for is left out (or all of them: an exception)."""
    def assignment(self) -> set[TopicPartition]: ...
    def lag(self) -> dict[TopicPartition, int]: ...
    def reachable(self, timeout_s: float) -> bool | None:
        """Whether the brokers answer: the leader of an assigned partition, else of a subscribed topic's first
        partition (a ListOffsets round trip of at most ``timeout_s``; a member whose partitions an outage took is
        not an idle one). None when no partition is known at all."""
    def close(self, timeout_s: float | None = None) -> None:
        """Leave the group and release the client, giving up after ``timeout_s`` (brokers that do not answer);
        commits nothing."""


class KafkaCommitError(RuntimeError):
    """An asynchronous commit that the group coordinator refused or that failed on the way (confluent-kafka)."""


class CommittedUnreadable(RuntimeError):
    """The committed offsets cannot be read, and asking again will not help (an authorization refusal, of the
    group or of a partition's topic; metadata this client cannot decode): the daemon stops, nothing committed, the
    message says why. Asking again after every poll had left the partitions unread for ever behind a warning."""


def make_source(client: str, **kwargs: Any) -> Source:
    if client == "kafka-python":
        from .source_kafka_python import KafkaPythonSource

        return KafkaPythonSource(**kwargs)
    if client == "confluent":
        from .source_confluent import ConfluentSource

        return ConfluentSource(**kwargs)
    raise ValueError(f"kafka.client must be 'kafka-python' or 'confluent', got {client!r}")
