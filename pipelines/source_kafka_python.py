"""The kafka-python consumer behind :class:`pipelines.source.Source`, with the fixes its group joins need."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from kafka.errors import (  # this module is imported only for kafka.client kafka-python
    CorruptRecordError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from .kafka_io import RECONNECT_BACKOFF_MAX_MS
from .kafka_security import client_security_config, kafka_python_bootstrap
from .source import (
    FETCH_MAX_WAIT_MS,
    FETCH_MIN_BYTES,
    LOOKUP_TIMEOUT_S,
    METADATA_END,
    METADATA_MAX_AGE_MS,
    UNREADABLE,
    AssignCallback,
    CommitDone,
    CommittedUnreadable,
    RebalanceCallback,
    RecordBatch,
    TopicPartition,
)

log = logging.getLogger(__name__)

_JOIN_WAIT_MS = 1000  # the shortest kafka-python poll while a group join is in flight

__all__ = ["KafkaPythonSource", "skip_unreadable"]


def skip_unreadable(consumer: Any, exc: CorruptRecordError, wait_ms: int) -> tuple[Any, int]:
    """Past a record kafka-python cannot parse (``exc``, raised out of every poll): the partition and offset where
    its fetcher's parse stopped (where reading stands), that failed parse drained (a later seek back to this offset,
    as positioning a newly assigned partition does, revived it, and kafka-python's poll then looped for ever), and
    the consumer sought past it. ``exc`` again where kafka-python 3's fetcher does not say where it stopped."""
    part = getattr(consumer._fetcher, "_next_partition_records", None)  # kafka-python 3's fetcher
    tp = getattr(part, "topic_partition", None)
    offset = None if tp is None else consumer.position(tp, timeout_ms=wait_ms)
    if offset is None:
        raise exc
    part.drain()
    consumer._fetcher._next_partition_records = None
    consumer.seek(tp, offset + 1)
    return tp, offset


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
        self._last_unreadable: dict[TopicPartition, int] = {}  # per partition, the last record handed over so
        _metadata_before_first_join(self._consumer)

    def poll(self, max_records: int, timeout_ms: int) -> RecordBatch:
        if self._coordinator is not None and self._coordinator._join_task is not None:
            # A group join is in flight: wait for it here rather than let it finish between two polls, which
            # kafka-python answers with a fresh JoinGroup (another generation). Nothing is assigned meanwhile.
            timeout_ms = max(timeout_ms, _JOIN_WAIT_MS)
        t0 = time.monotonic()
        try:
            got = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaConnectionError as exc:
            # kafka-python 3.0.12 now and then raises a failed metadata refresh out of poll while the brokers are
            # away; it crashed the daemon in an outage. The probe reports the outage; the next poll tries again,
            # after what is left of this one's timeout (no busy loop).
            log.debug("poll failed, brokers out of reach: %s", exc)
            time.sleep(max(0.0, timeout_ms / 1000 - (time.monotonic() - t0)))
            return RecordBatch.empty()
        except CorruptRecordError as exc:
            return self._unreadable(exc)
        if not got:
            return RecordBatch.empty()
        records = [r for recs in got.values() for r in recs]
        n = len(records)
        return RecordBatch(
            topic=[r.topic for r in records],
            partition=np.fromiter((r.partition for r in records), np.int32, n),
            offset=np.fromiter((r.offset for r in records), np.int64, n),
            timestamp=np.fromiter((-1 if r.timestamp is None else r.timestamp for r in records), np.int64, n),  # v0
            key=[r.key for r in records],
            value=[r.value if r.value is not None else b"" for r in records],
            headers_of=lambda i: list(records[i].headers or []),
        )

    def _unreadable(self, exc: CorruptRecordError) -> RecordBatch:
        """A record kafka-python cannot parse (a header name that is not UTF-8, from a producer that writes bytes; a
        failed CRC) raised out of every poll: the partition stood still and the daemon stopped, at every start. The
        fetcher's parse stopped at the partition and offset where reading stands; that record is handed over as
        unreadable (the intake dead-letters it as ``unreadable_record``, the original stays at its offset) and
        reading goes on after it. kafka-python parses a record batch from its start, so the records after a bad one
        in its batch come out unreadable too, one a poll, each named in its own dead letter."""
        tp, offset = skip_unreadable(self._consumer, exc, int(LOOKUP_TIMEOUT_S * 1000))
        following = self._last_unreadable.get((tp.topic, tp.partition)) == offset - 1  # the rest of a bad batch
        self._last_unreadable[(tp.topic, tp.partition)] = offset
        (log.debug if following else log.error)(
            "kafka-python cannot read the record at %s:%d offset %d (%s): dead-lettered as %s, reading goes on after "
            "it (the rest of its record batch likewise)", tp.topic, tp.partition, offset, exc, UNREADABLE)
        return RecordBatch([tp.topic], np.array([tp.partition], np.int32), np.array([offset], np.int64),
                           np.array([-1], np.int64), [None], [b""],
                           unreadable={0: f"kafka-python cannot read the record batch from here: {exc} (the record "
                                          "is at its source offset)"})

    def commit(self, offsets: Mapping[TopicPartition, tuple[int, str]], timeout_s: float | None = None) -> None:
        if offsets:  # without a timeout, kafka-python's request_timeout_ms (30 s)
            self._consumer.commit(self._offsets(offsets), timeout_ms=_ms(timeout_s))

    def commit_async(self, offsets: Mapping[TopicPartition, tuple[int, str]], done: CommitDone) -> None:
        def finished(_offsets: Any, response: Any) -> None:  # an OffsetCommitResponse, or the exception
            done(response if isinstance(response, BaseException) else None)

        self._consumer.commit_async(self._offsets(offsets), callback=finished)

    rebalance_commit_answered_later = True  # kafka-python 3 allows no blocking client call in its callbacks

    def commit_in_rebalance(self, offsets: Mapping[TopicPartition, tuple[int, str]], answered: CommitDone) -> None:
        """Queued on the client's IO loop, sent before the group's new generation starts; its answer comes through
        a later poll (without a callback, kafka-python's default one dropped a refusal unseen)."""
        if offsets:
            self.commit_async(offsets, answered)

    def _offsets(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> dict:
        """With a NUL after the metadata, as confluent-kafka writes it: its reader takes metadata up to a NUL, and
        read past the end of metadata without one (garbage or a UnicodeDecodeError) in a group that used both."""
        return {self._KTP(t, p): self._OAM(o, m + METADATA_END, -1) for (t, p), (o, m) in offsets.items()}

    def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, str] | None]:
        out: dict[TopicPartition, tuple[int, str] | None] = {}
        deadline = time.monotonic() + LOOKUP_TIMEOUT_S  # without one, a coordinator out of reach held the loop
        for t, p in tps:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                oam = self._consumer.committed(self._KTP(t, p), metadata=True, timeout_ms=left_ms)  # KafkaTimeoutError
            except (GroupAuthorizationFailedError, TopicAuthorizationFailedError) as exc:  # a missing ACL
                raise CommittedUnreadable(f"the committed offsets of {sorted(tps)} cannot be read: "
                                          f"{type(exc).__name__}: {exc}") from exc
            out[(t, p)] = None if oam is None or oam.offset < 0 else (oam.offset, oam.metadata or "")
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(self._KTP(*tp), offset)

    def first_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        got = self._consumer.beginning_offsets([self._KTP(t, p) for t, p in tps],
                                               timeout_ms=int(LOOKUP_TIMEOUT_S * 1000))
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

    def close(self, timeout_s: float | None = None) -> None:
        self._consumer.close(autocommit=False, timeout_ms=_ms(timeout_s))


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(seconds * 1000))


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
