"""Kafka consumers behind one small interface: kafka-python (default) or confluent-kafka (extra ``fast``).

Both give the daemon the same semantics: a consumer group, no auto-commit, batch polls returned as columns,
explicit commits with metadata, rebalance callbacks run inside ``poll`` on the polling thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .kafka_io import RECONNECT_BACKOFF_MAX_MS, client_security_config, confluent_refusal, kafka_python_bootstrap

FETCH_MIN_BYTES = 65536  # kafka.fetch_min_bytes default: the broker answers a fetch once it has this much ...
FETCH_MAX_WAIT_MS = 10  # ... or after this long (benchmarks/RESULTS.md, item 18)
METADATA_MAX_AGE_MS = 30_000  # topic metadata every 30 s, not the clients' 5 min: new partitions are seen sooner
METADATA_END = "\x00"  # after every commit's metadata, as confluent-kafka writes it (KafkaPythonSource._offsets)
# librdkafka stops fetching a partition whose prefetch queue is over its thresholds (queued.min.messages, 100,000
# messages) and looks again only after this long; its default, 1 s, left a consumer that drains 100,000 messages
# in well under a second with nothing to read for up to a second at a time (librdkafka issue #2879; the
# setting is in librdkafka 2.3 and later; benchmarks/RESULTS.md, item 23)
FETCH_QUEUE_BACKOFF_MS = 50
_JOIN_WAIT_MS = 1000  # the shortest kafka-python poll while a group join is in flight

log = logging.getLogger(__name__)

__all__ = ["TopicPartition", "RecordBatch", "Source", "KafkaPythonSource", "ConfluentSource", "make_source",
           "confluent_columns_py", "CommitDone", "KafkaCommitError"]

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

    def __len__(self) -> int:
        return len(self.value)

    def headers(self, i: int) -> list[tuple[str, bytes]]:
        """The original headers of record ``i`` ([] when it has none)."""
        return self.headers_of(i) if self.headers_of is not None else []

    def select(self, idx: np.ndarray) -> RecordBatch:
        """The records at positions ``idx`` (in that order)."""
        of = self.headers_of
        return RecordBatch([self.topic[i] for i in idx], self.partition[idx], self.offset[idx], self.timestamp[idx],
                           [self.key[i] for i in idx], [self.value[i] for i in idx],
                           None if of is None else lambda i: of(int(idx[i])))

    @classmethod
    def empty(cls) -> RecordBatch:
        return cls([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), [], [])


class Source(Protocol):
    def poll(self, max_records: int, timeout_ms: int) -> RecordBatch: ...
    def commit(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        """Synchronously commit ``{tp: (next offset, metadata)}``."""
    def commit_async(self, offsets: Mapping[TopicPartition, tuple[int, str]], done: CommitDone) -> None:
        """Send the commit and return; ``done(error or None)`` is called from a later ``poll`` (on the polling
        thread), or never when the brokers never answer. A broker that hangs held a synchronous commit (and the
        loop) for 30 s (kafka-python) or until it woke up (confluent-kafka)."""
    def commit_in_rebalance(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        """Commit from inside a rebalance callback (where kafka-python 3 allows no blocking call)."""
    def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, str] | None]: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def first_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset each partition still holds (its log start, which retention moves up)."""
    def assignment(self) -> set[TopicPartition]: ...
    def lag(self) -> dict[TopicPartition, int]: ...
    def reachable(self, timeout_s: float) -> bool | None:
        """Whether the brokers answer: the leader of an assigned partition, else of a subscribed topic's first
        partition (a ListOffsets round trip of at most ``timeout_s``; a member whose partitions an outage took is
        not an idle one). None when no partition is known at all."""
    def close(self) -> None: ...


class KafkaCommitError(RuntimeError):
    """An asynchronous commit that the group coordinator refused or that failed on the way (confluent-kafka)."""


class KafkaPythonSource:
    """kafka-python ``KafkaConsumer``; rebalance callbacks via ``ConsumerRebalanceListener``."""

    def __init__(self, bootstrap_servers: str, group_id: str, topics: Sequence[str], pattern: str | None,
                 on_assign: AssignCallback, on_revoke: RebalanceCallback, *, on_lost: RebalanceCallback | None = None,
                 security: Mapping | None = None,
                 session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 3000,
                 auto_offset_reset: str = "earliest", max_partition_fetch_bytes: int = 4 << 20,
                 fetch_min_bytes: int = FETCH_MIN_BYTES, fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
                 metadata_max_age_ms: int = METADATA_MAX_AGE_MS, **extra: Any) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer
        from kafka.structs import OffsetAndMetadata
        from kafka.structs import TopicPartition as KTP

        self._KTP, self._OAM = KTP, OffsetAndMetadata
        with kafka_python_bootstrap(bootstrap_servers, security):  # its timeout says why: credentials or network
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False,
                auto_offset_reset=auto_offset_reset, session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=heartbeat_interval_ms, max_partition_fetch_bytes=max_partition_fetch_bytes,
                fetch_max_bytes=64 << 20, fetch_min_bytes=fetch_min_bytes, fetch_max_wait_ms=fetch_max_wait_ms,
                metadata_max_age_ms=metadata_max_age_ms, reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                **client_security_config("kafka-python", security), **extra,
            )

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):  # noqa: N805 - kafka-python's signature
                on_revoke([(tp.topic, tp.partition) for tp in revoked])

            def on_partitions_assigned(self, assigned):  # noqa: N805
                on_assign([(tp.topic, tp.partition) for tp in assigned])

            def on_partitions_lost(self, lost):  # noqa: N805 - the member was evicted: nothing to commit
                (on_lost or on_revoke)([(tp.topic, tp.partition) for tp in lost])

        if pattern:  # validated as a regex by the config
            self._consumer.subscribe(pattern=pattern, listener=_Listener())
        else:
            self._consumer.subscribe(topics=list(topics), listener=_Listener())
        self._coordinator = _finish_interrupted_joins(self._consumer)  # None: a kafka-python without them
        _metadata_before_first_join(self._consumer)

    def poll(self, max_records: int, timeout_ms: int) -> RecordBatch:
        if self._coordinator is not None and self._coordinator._join_task is not None:
            # A group join is in flight: wait for it here rather than let it finish between two polls, which
            # kafka-python answers with a fresh JoinGroup (another generation). Nothing is assigned meanwhile.
            timeout_ms = max(timeout_ms, _JOIN_WAIT_MS)
        got = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if not got:
            return RecordBatch.empty()
        records = [r for recs in got.values() for r in recs]
        n = len(records)
        return RecordBatch(
            topic=[r.topic for r in records],
            partition=np.fromiter((r.partition for r in records), np.int32, n),
            offset=np.fromiter((r.offset for r in records), np.int64, n),
            timestamp=np.fromiter((r.timestamp for r in records), np.int64, n),
            key=[r.key for r in records],
            value=[r.value if r.value is not None else b"" for r in records],
            headers_of=lambda i: list(records[i].headers or []),
        )

    def commit(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        if offsets:
            self._consumer.commit(self._offsets(offsets))

    def commit_async(self, offsets: Mapping[TopicPartition, tuple[int, str]], done: CommitDone) -> None:
        def finished(_offsets: Any, response: Any) -> None:  # an OffsetCommitResponse, or the exception
            done(response if isinstance(response, BaseException) else None)

        self._consumer.commit_async(self._offsets(offsets), callback=finished)

    def commit_in_rebalance(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        """Queued on the client's IO loop; it is sent before the group's new generation starts."""
        if offsets:
            self._consumer.commit_async(self._offsets(offsets))

    def _offsets(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> dict:
        """With a NUL after the metadata, as confluent-kafka writes it: its reader takes metadata up to a NUL, and
        read past the end of metadata without one (garbage or a UnicodeDecodeError) in a group that used both."""
        return {self._KTP(t, p): self._OAM(o, m + METADATA_END, -1) for (t, p), (o, m) in offsets.items()}

    def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, str] | None]:
        out: dict[TopicPartition, tuple[int, str] | None] = {}
        for t, p in tps:
            oam = self._consumer.committed(self._KTP(t, p), metadata=True)
            out[(t, p)] = None if oam is None or oam.offset < 0 else (oam.offset, oam.metadata or "")
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(self._KTP(*tp), offset)

    def first_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        got = self._consumer.beginning_offsets([self._KTP(t, p) for t, p in tps], timeout_ms=10_000)
        return {(tp.topic, tp.partition): int(off) for tp, off in got.items()}

    def assignment(self) -> set[TopicPartition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def reachable(self, timeout_s: float) -> bool | None:
        assigned = self._consumer.assignment()
        parts = [min(assigned)] if assigned else []
        if not parts:  # the subscribed topics' partitions from the cached metadata
            known = [(t, min(ps)) for t in sorted(self._consumer.subscription() or ())
                     if (ps := self._consumer.partitions_for_topic(t))]
            parts = [self._KTP(*known[0])] if known else []
        if not parts:
            return None
        try:
            self._consumer.end_offsets(parts, timeout_ms=int(timeout_s * 1000))
        except Exception:  # KafkaTimeoutError, a connection error: not reachable now
            return False
        return True

    def lag(self) -> dict[TopicPartition, int]:
        """Lag per assigned partition from the high watermarks of the latest fetch responses (never a broker
        round trip: a blocking ``end_offsets`` took ~0.4 s inside the loop); partitions not fetched from yet are
        left out."""
        out = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            if end is None:
                continue
            try:  # the position it holds: with no timeout, position() waits on the coordinator (a broker outage
                at = self._consumer.position(tp, timeout_ms=0)  # held the loop for over a minute)
            except Exception:  # noqa: BLE001 - a partition just revoked, a timeout: left out this time
                continue
            if at is not None:
                out[(tp.topic, tp.partition)] = max(0, end - at)
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _metadata_before_first_join(consumer: Any, timeout_ms: int = 10_000) -> None:
    """Fetch every topic's metadata (which also resolves a pattern) before the first poll joins the group.

    A leader that assigns before the subscribed topics' metadata has arrived assigns nothing, and the metadata
    that follows makes kafka-python rebalance again: a poll that waits for the second join (up to 1 s) and a
    replay of every window (2 of 3 fresh consumers of new topics here; benchmarks/RESULTS.md, item 49). This is
    what ``KafkaConsumer.topics()`` does, with a deadline (that one waits for ever); a kafka-python without these
    internals, or a timeout, only leaves that extra rebalance possible."""
    net, manager, cluster = (getattr(consumer, name, None) for name in ("_net", "_manager", "_cluster"))
    if net is None or manager is None or not hasattr(cluster, "need_all_topic_metadata"):
        return
    stash = cluster.need_all_topic_metadata
    cluster.need_all_topic_metadata = True
    try:
        net.run(manager.wait_for, cluster.request_update(), timeout_ms)
    except Exception as exc:  # noqa: BLE001 - the first poll fetches metadata anyway
        log.warning("topic metadata not fetched before joining the group (%s); the group may rebalance twice", exc)
    finally:
        cluster.need_all_topic_metadata = stash


def _finish_interrupted_joins(consumer: Any) -> Any | None:
    """Make kafka-python always finish a group join that a short poll gave up on.

    kafka-python 3.0.12 leaves a JoinGroup -> SyncGroup task running when ``poll``'s timeout ends first, and
    re-awaits it on the next poll only while ``need_rejoin()`` is true. For a rejoin that the leader starts
    because the topics' metadata changed (a fresh consumer's first join, made before the metadata arrived;
    partitions added later), ``need_rejoin()`` turns false as soon as the background task has computed the new
    assignment, so the assignment is never applied: the member keeps no partitions and, with its heartbeat
    still disabled for the join, is evicted from the group. Reporting a rejoin as needed while a join task
    exists makes the next poll take the join up again (one that already finished is sent again, which is why
    :meth:`KafkaPythonSource.poll` waits for a join in flight). Returns the patched coordinator; versions
    without these internals are left as they are (None).
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_join_task"):
        return None
    upstream = coordinator.need_rejoin

    def need_rejoin() -> bool:
        return coordinator._join_task is not None or upstream()

    coordinator.need_rejoin = need_rejoin
    return coordinator


class ConfluentSource:
    """confluent-kafka ``Consumer`` (librdkafka); same semantics as :class:`KafkaPythonSource`."""

    def __init__(self, bootstrap_servers: str, group_id: str, topics: Sequence[str], pattern: str | None,
                 on_assign: AssignCallback, on_revoke: RebalanceCallback, *, on_lost: RebalanceCallback | None = None,
                 security: Mapping | None = None,
                 session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 3000,
                 auto_offset_reset: str = "earliest", max_partition_fetch_bytes: int = 4 << 20,
                 fetch_min_bytes: int = FETCH_MIN_BYTES, fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
                 metadata_max_age_ms: int = METADATA_MAX_AGE_MS, **extra: Any) -> None:
        from confluent_kafka import Consumer  # noqa: N817
        from confluent_kafka import TopicPartition as CTP

        self._CTP = CTP
        self._refused: Exception | None = None  # set by librdkafka's error callback, raised by the next poll
        self._sent: list[tuple[frozenset, CommitDone]] = []  # asynchronous commits without an answer, oldest first
        self._sent_lock = threading.Lock()  # on_commit runs on whichever thread polls
        self._where, self._security = bootstrap_servers, security
        conf = {
            "bootstrap.servers": bootstrap_servers, "group.id": group_id, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": auto_offset_reset,
            "session.timeout.ms": session_timeout_ms, "heartbeat.interval.ms": heartbeat_interval_ms,
            "max.partition.fetch.bytes": max_partition_fetch_bytes, "fetch.min.bytes": fetch_min_bytes,
            "fetch.wait.max.ms": fetch_max_wait_ms, "topic.metadata.refresh.interval.ms": metadata_max_age_ms,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS, "error_cb": self._on_error,
            "on_commit": self._on_commit,
            **client_security_config("confluent", security), **extra,
        }
        self._consumer = Consumer(conf)
        self._columns = _confluent_columns()
        subs = ["^" + pattern.lstrip("^")] if pattern else list(topics)  # librdkafka: a leading ^ marks a regex
        self._topics = [] if pattern else sorted(topics)

        def _assign(consumer, parts):
            on_assign([(p.topic, p.partition) for p in parts])

        def _revoke(consumer, parts):
            on_revoke([(p.topic, p.partition) for p in parts])

        def _lost(consumer, parts):  # the session timed out: nothing to commit
            (on_lost or on_revoke)([(p.topic, p.partition) for p in parts])

        self._consumer.subscribe(subs, on_assign=_assign, on_revoke=_revoke, on_lost=_lost)

    def _on_error(self, err: Any) -> None:
        """librdkafka's error callback (served inside poll). It retries every error for ever, a refused login and
        a failed TLS handshake too; those are configuration problems, and the next poll raises them."""
        self._refused = self._refused or confluent_refusal(err, self._where, self._security)

    def poll(self, max_records: int, timeout_ms: int) -> RecordBatch:
        # Wait for the first message only, then take what is already fetched: consume(n, timeout) would wait the
        # whole timeout unless n messages arrive, which adds latency at low load.
        first = self._consumer.poll(timeout_ms / 1000.0)
        if self._refused is not None:
            raise self._refused
        if first is None:
            return RecordBatch.empty()
        msgs = [first] + (self._consumer.consume(num_messages=max_records - 1, timeout=0) if max_records > 1 else [])
        return RecordBatch(*self._columns(msgs), _ConfluentHeaders(msgs))  # failed messages left out of the columns

    def commit(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        if offsets:
            parts = [self._CTP(t, p, o, metadata=m) for (t, p), (o, m) in offsets.items()]
            self._consumer.commit(offsets=parts, asynchronous=False)

    def commit_async(self, offsets: Mapping[TopicPartition, tuple[int, str]], done: CommitDone) -> None:
        """librdkafka answers every commit, a synchronous one too, through ``on_commit`` with the offsets it sent:
        the first commit sent with the same offsets takes the answer."""
        entry = (frozenset((t, p, o) for (t, p), (o, _m) in offsets.items()), done)
        with self._sent_lock:  # before the commit: with poll ahead, the answer may come on the helper thread
            self._sent.append(entry)
        try:
            self._consumer.commit(offsets=[self._CTP(t, p, o, metadata=m) for (t, p), (o, m) in offsets.items()],
                                  asynchronous=True)
        except BaseException:
            with self._sent_lock:
                self._sent.remove(entry)
            raise

    def _on_commit(self, err: Any, parts: list) -> None:
        """librdkafka's commit callback (served inside poll): the error of the commit, else of a partition."""
        key = frozenset((p.topic, p.partition, p.offset) for p in parts)
        with self._sent_lock:
            i = next((i for i, (sent, _) in enumerate(self._sent) if sent == key), None)
            if i is None:  # a synchronous commit's answer
                return
            _, done = self._sent.pop(i)
        failed = err if err is not None else next((p.error for p in parts if p.error is not None), None)
        done(None if failed is None else KafkaCommitError(f"offset commit failed: {failed}"))

    def commit_in_rebalance(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> None:
        self.commit(offsets)  # librdkafka allows a synchronous commit in its rebalance callbacks

    def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, str] | None]:
        for attempt in range(3):
            try:
                got = self._consumer.committed([self._CTP(t, p) for t, p in tps], timeout=10)
                break
            except UnicodeDecodeError as exc:  # metadata without a NUL, by an older anomalyd with kafka-python: it
                if attempt == 2:  # reads past its end (KafkaPythonSource._offsets); the bytes vary from read to read
                    raise RuntimeError(
                        f"confluent-kafka cannot read the committed offsets' metadata of {sorted(tps)} (written by an "
                        "older anomalyd with kafka.client kafka-python): run this version once with kafka-python, "
                        "which rewrites it at its first commit") from exc
        return {(p.topic, p.partition): (None if p.offset < 0 else (p.offset, p.metadata or "")) for p in got}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(self._CTP(tp[0], tp[1], offset))

    def first_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {(t, p): int(self._consumer.get_watermark_offsets(self._CTP(t, p), timeout=10, cached=False)[0])
                for t, p in tps}

    def assignment(self) -> set[TopicPartition]:
        return {(p.topic, p.partition) for p in self._consumer.assignment()}

    def reachable(self, timeout_s: float) -> bool | None:
        parts = self._consumer.assignment()
        try:
            if parts:
                self._consumer.get_watermark_offsets(min(parts, key=lambda p: (p.topic, p.partition)),
                                                     timeout=timeout_s, cached=False)
            elif self._topics:  # nothing assigned: a metadata request for a subscribed topic
                self._consumer.list_topics(self._topics[0], timeout=timeout_s)
            else:  # a pattern: the whole metadata
                self._consumer.list_topics(timeout=timeout_s)
        except Exception:  # KafkaException(_TIMED_OUT, _TRANSPORT, ...): not reachable now
            return False
        return True

    def lag(self) -> dict[TopicPartition, int]:
        """Lag per assigned partition from librdkafka's cached high watermarks (updated by fetch responses;
        never a broker round trip); partitions not fetched from yet are left out."""
        parts = self._consumer.assignment()
        if not parts:
            return {}
        out = {}
        for pos in self._consumer.position(parts):
            _, high = self._consumer.get_watermark_offsets(pos, cached=True)
            if high < 0:  # nothing fetched from this partition yet
                continue
            out[(pos.topic, pos.partition)] = max(0, high - pos.offset) if pos.offset >= 0 else high
        return out

    def close(self) -> None:
        self._consumer.close()


def make_source(client: str, **kwargs: Any) -> Source:
    if client == "kafka-python":
        return KafkaPythonSource(**kwargs)
    if client == "confluent":
        return ConfluentSource(**kwargs)
    raise ValueError(f"kafka.client must be 'kafka-python' or 'confluent', got {client!r}")


class _ConfluentHeaders:
    """``headers_of`` for a confluent-kafka poll: the messages' headers by column position. The columns leave
    failed messages out, so the messages that made them are found on the first call only (a dead letter)."""

    def __init__(self, messages: list) -> None:
        self._messages: list | None = messages
        self._kept: list = []

    def __call__(self, i: int) -> list[tuple[str, bytes]]:
        if self._messages is not None:
            self._kept, self._messages = [m for m in self._messages if m.error() is None], None
        return list(self._kept[i].headers() or [])


def _confluent_columns() -> Callable[[list], tuple]:
    """The columns of a confluent-kafka poll in one native pass (``message_columns`` of the native decoder's
    extension: 0.34-0.37 against 0.50 us per message in Python, benchmarks/RESULTS.md item 52), else in Python."""
    from .native_decode import load

    return getattr(load(), "message_columns", None) or confluent_columns_py


def confluent_columns_py(messages: list) -> tuple:
    """``(topics, partitions int32, offsets int64, timestamps int64, keys, values)`` of the messages whose
    ``error()`` is None, a None value as b"": what the native ``message_columns`` returns."""
    kept = [m for m in messages if m.error() is None]
    n = len(kept)
    return ([m.topic() for m in kept], np.fromiter((m.partition() for m in kept), np.int32, n),
            np.fromiter((m.offset() for m in kept), np.int64, n),
            np.fromiter((m.timestamp()[1] for m in kept), np.int64, n),
            [m.key() for m in kept], [m.value() or b"" for m in kept])
