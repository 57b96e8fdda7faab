"""The confluent-kafka (librdkafka) consumer behind :class:`pipelines.source.Source`; a poll's columns in one
native pass where the native decoder is built."""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .dead_letters import HEADER_HEADERS_UNREADABLE
from .kafka_io import LIBRDKAFKA_LOG
from .kafka_security import client_security_config, confluent_refusal
from .source import (
    FETCH_MAX_WAIT_MS,
    FETCH_MIN_BYTES,
    LOOKUP_TIMEOUT_S,
    METADATA_MAX_AGE_MS,
    AssignCallback,
    CommitDone,
    CommittedUnreadable,
    KafkaCommitError,
    RebalanceCallback,
    RecordBatch,
    TopicPartition,
)

log = logging.getLogger(__name__)
ERROR_LOG_EVERY_S = 60.0  # a consumer error of one kind is logged at most this often

# librdkafka stops fetching a partition whose prefetch queue is over its thresholds (queued.min.messages, 100,000
# messages) and looks again only after this long; its default, 1 s, left a consumer that drains 100,000 messages
# in well under a second with nothing to read for up to a second at a time (librdkafka issue #2879; the
# setting is in librdkafka 2.3 and later; benchmarks/RESULTS.md, item 23)
FETCH_QUEUE_BACKOFF_MS = 50

__all__ = ["ConfluentSource", "confluent_columns_py"]

REFUSED_LOOKUPS = ("GROUP_AUTHORIZATION_FAILED", "TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED")


def _error_name(exc: BaseException) -> str | None:
    """The librdkafka error's name of a KafkaException (``GROUP_AUTHORIZATION_FAILED``), else None."""
    err = exc.args[0] if exc.args else None
    return err.name() if callable(getattr(err, "name", None)) else None


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
        self._sought: dict[TopicPartition, int] = {}  # the last offset sought per partition (lag's fallback)
        self._refused: Exception | None = None  # set by librdkafka's error callback, raised by the next poll
        self._errors_logged: dict[int, float] = {}  # error code -> monotonic time last logged
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
            "on_commit": self._on_commit, "logger": LIBRDKAFKA_LOG,
            **client_security_config("confluent", security), **extra,
        }
        self._consumer = Consumer(conf)
        self._columns = _confluent_columns()
        subs = ["^" + pattern.lstrip("^")] if pattern else list(topics)  # librdkafka: a leading ^ marks a regex
        self._topics = [] if pattern else sorted(topics)

        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost or on_revoke
        self._consumer.subscribe(subs, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _assigned(self, consumer: Any, parts: list) -> None:
        self._on_assign(self._rebalanced(parts))

    def _revoked(self, consumer: Any, parts: list) -> None:
        self._on_revoke(self._rebalanced(parts))

    def _lost(self, consumer: Any, parts: list) -> None:  # the session timed out: nothing to commit
        self._on_lost(self._rebalanced(parts))

    def _rebalanced(self, parts: list) -> list[TopicPartition]:
        """The partitions of a rebalance callback; lag's fallback forgets the offsets sought before it (a
        partition assigned again and not sought showed the lag from a seek of its earlier assignment)."""
        tps = [(p.topic, p.partition) for p in parts]
        for tp in tps:
            self._sought.pop(tp, None)
        return tps

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
        columns = self._columns(msgs)  # failed messages left out
        if len(columns[1]) < len(msgs):
            self._report_errors(msgs)
        return RecordBatch(*columns, _ConfluentHeaders(msgs))

    def _report_errors(self, msgs: list) -> None:
        """Log the consumer errors librdkafka hands over as messages (a subscribed topic that does not exist, a
        missing READ ACL, a poll interval exceeded), each kind once per ERROR_LOG_EVERY_S: the member joins with
        nothing assigned otherwise, and looks like an idle spare replica."""
        now = time.monotonic()
        for m in msgs:
            err = m.error()
            if err is not None and now - self._errors_logged.get(err.code(), -ERROR_LOG_EVERY_S) >= ERROR_LOG_EVERY_S:
                self._errors_logged[err.code()] = now
                log.warning("Kafka consumer error (%s): %s", err.name(), err.str())

    def commit(self, offsets: Mapping[TopicPartition, tuple[int, str]], timeout_s: float | None = None) -> None:
        """librdkafka's synchronous commit waits for its answer for ever (a broker that hangs held the shutdown
        until it woke up); with ``timeout_s`` the commit is sent asynchronously and polls with every partition
        paused serve callbacks, its answer among them, until it comes or the time is up."""
        if not offsets:
            return
        if timeout_s is None:  # its answer is the return value (confluent-kafka never hands it to on_commit)
            self._consumer.commit(offsets=self._parts(offsets), asynchronous=False)
            return
        answers: list[BaseException | None] = []
        deadline = time.monotonic() + timeout_s
        paused = self._consumer.assignment()
        self._consumer.pause(paused)
        try:
            self.commit_async(offsets, answers.append)
            while not answers and (left := deadline - time.monotonic()) > 0:
                self._consumer.poll(min(left, 0.01))  # returns at its timeout (no message comes while paused;
                # one fetched before the pause is left uncommitted), having served the answer
        finally:
            self._consumer.resume(paused)
        if not answers:
            raise KafkaCommitError(f"offset commit not answered within {timeout_s:g}s (are the brokers reachable?)")
        if answers[0] is not None:
            raise answers[0]

    def commit_async(self, offsets: Mapping[TopicPartition, tuple[int, str]], done: CommitDone) -> None:
        """librdkafka answers an asynchronous commit through ``on_commit`` (served by a later poll) with the offsets
        it sent, in the order sent: the oldest commit sent with those offsets takes an answer."""
        entry = (frozenset((t, p, o) for (t, p), (o, _m) in offsets.items()), done)
        with self._sent_lock:  # before the commit: with poll ahead, the answer may come on the helper thread
            self._sent.append(entry)
        try:
            self._consumer.commit(offsets=self._parts(offsets), asynchronous=True)
        except BaseException:
            with self._sent_lock:
                self._sent.remove(entry)
            raise

    def _parts(self, offsets: Mapping[TopicPartition, tuple[int, str]]) -> list:
        return [self._CTP(t, p, o, metadata=m) for (t, p), (o, m) in offsets.items()]

    def _on_commit(self, err: Any, parts: list) -> None:
        """librdkafka's commit callback (served inside poll): the error of the commit, else of a partition."""
        key = frozenset((p.topic, p.partition, p.offset) for p in parts)
        with self._sent_lock:
            i = next((i for i, (sent, _) in enumerate(self._sent) if sent == key), None)
            if i is None:
                return
            _, done = self._sent.pop(i)
        failed = err if err is not None else next((p.error for p in parts if p.error is not None), None)
        done(None if failed is None else KafkaCommitError(f"offset commit failed: {failed}"))

    rebalance_commit_answered_later = False  # librdkafka allows a synchronous commit in its rebalance callbacks

    def commit_in_rebalance(self, offsets: Mapping[TopicPartition, tuple[int, str]], answered: CommitDone) -> None:
        self.commit(offsets)

    def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, str] | None]:
        for attempt in range(3):
            try:
                got = self._consumer.committed([self._CTP(t, p) for t, p in tps], timeout=LOOKUP_TIMEOUT_S)
                break
            except UnicodeDecodeError as exc:  # metadata without a NUL, by an older anomalyd with kafka-python: it
                if attempt == 2:  # reads past its end (KafkaPythonSource._offsets); the bytes vary from read to read
                    raise CommittedUnreadable(
                        f"confluent-kafka cannot read the committed offsets' metadata of {sorted(tps)} (written by an "
                        "older anomalyd with kafka.client kafka-python): run this version once with kafka-python, "
                        "which rewrites it at its first commit") from exc
            except Exception as exc:  # KafkaException: a missing ACL is not asked again
                if (name := _error_name(exc)) in REFUSED_LOOKUPS:
                    raise CommittedUnreadable(f"the committed offsets of {sorted(tps)} cannot be read: {name}: "
                                              f"{exc.args[0].str()}") from exc
                raise
        # an error of one partition comes on it, with no offset (the call itself succeeds): not "never committed",
        # but for a partition the broker does not know (yet), which kafka-python takes as no commit too
        if failed := [(p.topic, p.partition, p.error) for p in got
                      if p.error is not None and p.error.name() != "UNKNOWN_TOPIC_OR_PART"]:
            reasons = "; ".join(f"{t}:{p}: {err.name()}: {err.str()}" for t, p, err in failed)
            if any(err.name() in REFUSED_LOOKUPS for _, _, err in failed):
                raise CommittedUnreadable(f"the committed offsets of {sorted(tps)} cannot be read: {reasons}")
            raise RuntimeError(f"the committed offsets of {sorted(tps)} were not read: {reasons}")  # asked again
        return {(p.topic, p.partition): (None if p.offset < 0 else (p.offset, p.metadata or "")) for p in got}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(self._CTP(tp[0], tp[1], offset))
        self._sought[tp] = offset  # for lag() until a message of the partition is consumed

    def first_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """One ListOffsets round trip per partition, all within LOOKUP_TIMEOUT_S (each had 10 s of its own: N
        partitions held the loop for up to N x 10 s); one that fails or times out is left out."""
        out, deadline = {}, time.monotonic() + LOOKUP_TIMEOUT_S
        for t, p in tps:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                out[(t, p)] = int(self._consumer.get_watermark_offsets(self._CTP(t, p), timeout=left, cached=False)[0])
            except Exception as exc:  # KafkaException(_TIMED_OUT, ...): this partition's start stays unknown
                log.debug("first offset of %s:%d not read: %s", t, p, exc)
        return out

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
            tp = (pos.topic, pos.partition)
            # librdkafka's position stays invalid (-1001) until a message of the partition is consumed, a seek
            # included: reported as the whole log, a caught-up partition showed its high watermark as lag after
            # every restart (AnomalydNoEventsScored on an idle topic). Then the offset sought, else left out.
            at = pos.offset if pos.offset >= 0 else self._sought.get(tp, -1)
            if high >= 0 and at >= 0:  # high < 0: nothing fetched from this partition yet
                out[tp] = max(0, high - at)
        return out

    def close(self, timeout_s: float | None = None) -> None:
        """librdkafka's close has no timeout (it waits for brokers that hang to answer the group's leave): with
        ``timeout_s`` it runs on a thread of its own, given up (and never touched again) when the time is up."""
        if timeout_s is None:
            self._consumer.close()
            return
        failed: list[BaseException] = []

        def close() -> None:
            try:
                self._consumer.close()
            except BaseException as exc:  # noqa: BLE001 - raised below, or logged when given up
                failed.append(exc)
                if not done.is_set():
                    return
                log.warning("the Kafka consumer's close failed after it was given up: %s", exc)

        done = threading.Event()  # set when the caller has stopped waiting
        closing = threading.Thread(target=close, name="anomalyd-consumer-close", daemon=True)
        closing.start()
        closing.join(timeout_s)
        done.set()
        if closing.is_alive():
            log.warning("the Kafka consumer did not close within %gs (are the brokers reachable?); left behind, "
                        "it goes with the process", timeout_s)
        elif failed:
            raise failed[0]


_HEADERS = operator.methodcaller("headers")  # Message.headers()


class _ConfluentHeaders:
    """``headers_of`` for a confluent-kafka poll: the messages' headers by column position. The columns leave
    failed messages out, so the messages that made them are found on the first call only (a dead letter)."""

    def __init__(self, messages: list) -> None:
        self._messages: list | None = messages
        self._kept: list = []

    def __call__(self, i: int) -> list[tuple[str, bytes]]:
        if self._messages is not None:
            self._kept, self._messages = [m for m in self._messages if m.error() is None], None
        try:  # called from C (methodcaller), which checks the call's error: called from Python, a warm call site
            # is specialised without that check, and the error of a name not UTF-8 surfaced later, elsewhere
            return list(_HEADERS(self._kept[i]) or [])
        except (SystemError, UnicodeDecodeError) as exc:  # a header name not UTF-8 (a producer that writes bytes):
            # confluent-kafka cannot read any of them, and the dead letter failed, at every start, the daemon
            why = exc.__cause__ or exc.__context__ or exc
            return [(HEADER_HEADERS_UNREADABLE, f"confluent-kafka cannot read them: {why}".encode("utf-8",
                                                                                              "backslashreplace"))]


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
