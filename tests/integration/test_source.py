"""Both Kafka sources against a real broker: poll columns, consumer lag from cached high watermarks."""

from __future__ import annotations

import time

import pytest

from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from pipelines.source import RecordBatch, Source, make_source

CLIENTS = ["kafka-python", "confluent"]
_GIVE_UP_S = 60.0  # a hang guard only


def _poll_until(source: Source, total: int, max_records: int) -> int:
    """Poll (at most ``max_records`` per call) until ``total`` records in all; returns how many came."""
    got = 0
    give_up = time.monotonic() + _GIVE_UP_S
    while got < total and time.monotonic() < give_up:
        got += len(source.poll(min(max_records, total - got), 500))
    return got


def _source_of_a_filled_topic(bootstrap: str, topic: str, client: str, n: int) -> Source:
    """A one-partition ``topic`` with ``n`` records, and a ``client`` source subscribed to it (group ``topic``)."""
    create_topic(bootstrap, topic, partitions=1)
    producer = make_producer(client, bootstrap)
    for i in range(n):
        producer.produce(topic, f'{{"stream":"s","ts":{i},"values":[{i}]}}'.encode())
    producer.flush(30)
    producer.close()
    return make_source(client, bootstrap_servers=bootstrap, group_id=topic, topics=[topic], pattern=None,
                       on_assign=lambda _tps: None, on_revoke=lambda _tps: None)


@pytest.mark.parametrize("client", CLIENTS)
def test_lag_follows_the_position(kafka_bootstrap: str, topic_name: str, client: str) -> None:
    source = _source_of_a_filled_topic(kafka_bootstrap, topic_name, client, 300)
    try:
        assert _poll_until(source, 100, 50) == 100
        assert source.lag() == {(topic_name, 0): 200}
        assert _poll_until(source, 200, 1000) == 200
        assert source.lag() == {(topic_name, 0): 0}
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_caught_up_partition_has_no_lag_after_a_restart(kafka_bootstrap: str, topic_name: str,
                                                          client: str) -> None:
    """librdkafka's position stays invalid until a message of the partition is consumed, a seek included: the lag
    of a caught-up partition was its whole log (300 here) after every restart, until new records came."""
    first = _source_of_a_filled_topic(kafka_bootstrap, topic_name, client, 300)
    tp = (topic_name, 0)
    try:
        assert _poll_until(first, 300, 1000) == 300
        first.commit({tp: (300, "")})
    finally:
        first.close()
    source = make_source(client, bootstrap_servers=kafka_bootstrap, group_id=topic_name, topics=[topic_name],
                         pattern=None, on_assign=lambda _tps: None, on_revoke=lambda _tps: None)
    try:
        _poll_until_assigned(source, {tp})
        assert source.committed([tp])[tp][0] == 300
        source.seek(tp, 300)  # as Positions.position_new does
        give_up = time.monotonic() + _GIVE_UP_S
        while tp not in source.lag() and time.monotonic() < give_up:  # until a fetch brought the high watermark
            assert len(source.poll(100, 100)) == 0
        assert source.lag() == {tp: 0}
    finally:
        source.close()


def test_confluent_lag_forgets_an_offset_sought_in_an_earlier_assignment(kafka_bootstrap: str,
                                                                         topic_name: str) -> None:
    """librdkafka's position is invalid until a message is consumed, so lag falls back to the offset sought. That
    offset outlived the assignment: a partition assigned again and not sought showed the lag of the old seek."""
    from confluent_kafka import TopicPartition as CTP

    source = _source_of_a_filled_topic(kafka_bootstrap, topic_name, "confluent", 300)
    tp = (topic_name, 0)
    try:
        _poll_until_assigned(source, {tp})
        source.seek(tp, 100)
        give_up = time.monotonic() + _GIVE_UP_S
        while tp not in source.lag() and time.monotonic() < give_up:  # until a fetch brought the high watermark
            time.sleep(0.05)
        assert source.lag() == {tp: 200}  # from the offset sought
        source._revoked(None, [CTP(*tp)])  # the rebalance callbacks as librdkafka calls them
        source._assigned(None, [CTP(*tp)])
        assert tp not in source.lag()  # not sought since: unknown, not 200
    finally:
        source.close()


def test_a_confluent_partition_error_on_the_committed_offsets_is_not_read_as_no_commit(kafka_bootstrap: str,
                                                                                       topic_name: str) -> None:
    """librdkafka puts an error of one partition on it (offset invalid) and raises nothing: a topic's refusal was
    read as "never committed" (replayed, or skipped with auto_offset_reset latest). Now a refusal stops the
    daemon, as kafka-python's does, and another error is asked again after the next poll."""
    from types import SimpleNamespace

    from confluent_kafka import KafkaError

    from pipelines.positions import Positions
    from pipelines.source import CommittedUnreadable

    source = _source_of_a_filled_topic(kafka_bootstrap, topic_name, "confluent", 1)
    consumer = source._consumer

    class Answering:  # the client, whose committed() answers with ``error`` on the partition
        def __init__(self, code: int) -> None:
            self.code = code

        def committed(self, parts, **_kw):
            return [SimpleNamespace(topic=p.topic, partition=p.partition, offset=-1001, metadata=None,
                                    error=KafkaError(self.code)) for p in parts]

        def __getattr__(self, name: str):
            return getattr(consumer, name)

    try:
        source._consumer = Answering(KafkaError.TOPIC_AUTHORIZATION_FAILED)
        with pytest.raises(CommittedUnreadable, match="TOPIC_AUTHORIZATION_FAILED"):
            source.committed([(topic_name, 0)])
        source._consumer = Answering(KafkaError.UNKNOWN_TOPIC_OR_PART)  # as kafka-python: no commit
        assert source.committed([(topic_name, 0)]) == {(topic_name, 0): None}
        source._consumer = Answering(KafkaError.UNSTABLE_OFFSET_COMMIT)
        positions = Positions()
        positions.assign([(topic_name, 0)])
        positions.position_new(source, RecordBatch.empty())
        assert positions.needs_positioning  # asked again after the next poll, not positioned as uncommitted
    finally:
        source._consumer = consumer
        source.close(5)


def _poll_until_assigned(source: Source, want: set[tuple[str, int]]) -> None:
    """Poll for 1 ms, then work for 20 ms (the daemon's loop between polls), until ``want`` is assigned."""
    give_up = time.monotonic() + 30.0  # a join takes tens of ms, the metadata refresh 0.5 s; a hang guard
    while source.assignment() != want and time.monotonic() < give_up:
        source.poll(100, 1)
        time.sleep(0.02)


@pytest.mark.parametrize("client", CLIENTS)
def test_rejoin_for_added_partitions_completes_between_short_polls(kafka_bootstrap: str, topic_name: str,
                                                                     client: str) -> None:
    """A consumer that polls for 1 ms at a time gets its partitions, and the ones added to its topic later.

    A partition added to the topic (or a fresh consumer's first join, made before the metadata arrived) makes
    the group leader rejoin; the 1 ms poll gives up while that JoinGroup is in flight and its response arrives
    while the caller works. kafka-python 3.0.12 then computed the new assignment in the background and never
    applied it: the member kept no partitions, stopped heartbeating and was evicted (the daemon restart test's
    intermittent failure). Restarting the finished join at the next poll instead would repeat for ever.
    """
    from kafka import KafkaAdminClient

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    assigned: list[list[tuple[str, int]]] = []
    source = make_source(client, bootstrap_servers=kafka_bootstrap, group_id=topic_name, topics=[topic_name],
                         pattern=None, on_assign=assigned.append, on_revoke=lambda _tps: None,
                         metadata_max_age_ms=500)
    try:
        _poll_until_assigned(source, {(topic_name, 0)})
        assert source.assignment() == {(topic_name, 0)}
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.create_partitions({topic_name: 2})
        finally:
            admin.close()
        want = {(topic_name, 0), (topic_name, 1)}
        _poll_until_assigned(source, want)
        assert source.assignment() == want
        assert set(assigned[-1]) == want  # the daemon's rebalance callback saw it too
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_fresh_consumer_of_a_new_topic_joins_once(kafka_bootstrap: str, topic_name: str, client: str) -> None:
    """The first join already sees every partition: no empty assignment and no second rebalance after it.

    kafka-python joined before the topic's metadata had arrived in most tries: its leader assigned nothing, the
    metadata that followed made it rebalance again, and the poll waiting for that join stalled the daemon for up
    to a second (then every window was replayed). Three topics, each new, each with a new group."""
    for i in range(3):
        topic = f"{topic_name}-{i}"
        create_topic(kafka_bootstrap, topic, partitions=4)
        assigned: list[int] = []
        source = make_source(client, bootstrap_servers=kafka_bootstrap, group_id=topic, topics=[topic], pattern=None,
                             on_assign=lambda tps, got=assigned: got.append(len(tps)), on_revoke=lambda _tps: None)
        try:
            _poll_until_assigned(source, {(topic, p) for p in range(4)})
            settle = time.monotonic() + 1.5  # a second join would follow within the metadata's round trip
            while time.monotonic() < settle:
                source.poll(100, 100)
        finally:
            source.close()
        assert assigned == [4], f"try {i}: assignments of {assigned} partitions"


@pytest.mark.parametrize("client", CLIENTS)
def test_commits_with_a_timeout_and_an_asynchronous_one_after_the_same_offsets_are_answered(
        kafka_bootstrap: str, topic_name: str, client: str) -> None:
    """A synchronous commit given a timeout lands (confluent-kafka: sent asynchronously, its answer served by polls
    with the partitions paused), and an asynchronous commit of the same offsets after it is answered: confluent-kafka
    hands a synchronous commit's answer to its caller only, so one registered for ``on_commit`` was never taken and
    took the answer of the next commit of the same offsets, whose caller then waited for ever."""
    source = _source_of_a_filled_topic(kafka_bootstrap, topic_name, client, 10)
    tp = (topic_name, 0)
    try:
        assert _poll_until(source, 10, 100) == 10
        source.commit({tp: (4, "a")})
        source.commit({tp: (7, "b")}, timeout_s=10)
        assert source.committed([tp])[tp][0] == 7
        answers: list[BaseException | None] = []
        source.commit_async({tp: (7, "b")}, answers.append)
        give_up = time.monotonic() + 30
        while not answers and time.monotonic() < give_up:
            source.poll(100, 100)
        assert answers == [None]
    finally:
        source.close(timeout_s=10)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_rebalance_commit_refused_as_too_large_leaves_the_offsets_committed_without_the_incidents(
        kafka_bootstrap: str, topic_name: str, client: str, caplog: pytest.LogCaptureFixture) -> None:
    """The brokers refuse metadata over offset.metadata.max.bytes (4096 by default). kafka-python's rebalance
    commit is only sent (no blocking call in its callbacks): without a callback its refusal went unseen, nothing
    was committed and the next owner replayed everything since the commit before. Its offsets now go without the
    incidents first; confluent-kafka's commit is synchronous and sent again without them."""
    import json
    import logging

    from prometheus_client import CollectorRegistry

    from pipelines.commits import Committer
    from pipelines.metrics import Metrics
    from pipelines.positions import Positions

    tp = (topic_name, 0)
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    incidents = [{"stream": f"s{i}", "opened": "x" * 100} for i in range(60)]  # about 7 kB
    big = json.dumps({"rebuild_from": 3, "incidents": incidents})
    registry = CollectorRegistry()
    committer = Committer(Positions(), Metrics(registry, process_metrics=False))
    first = make_source(client, bootstrap_servers=kafka_bootstrap, group_id=topic_name, topics=[topic_name],
                        pattern=None, on_assign=lambda _tps: None,
                        on_revoke=lambda tps: committer.commit({tp: (5, big)} if tps else {}, in_rebalance=True))
    committer.source = first
    second = None
    try:
        _poll_until_assigned(first, {tp})
        second = make_source(client, bootstrap_servers=kafka_bootstrap, group_id=topic_name, topics=[topic_name],
                             pattern=None, on_assign=lambda _tps: None, on_revoke=lambda _tps: None)
        with caplog.at_level(logging.WARNING, logger="anomalyd"):
            give_up = time.monotonic() + 60.0
            while time.monotonic() < give_up:  # both poll through the rebalance; the answers come in later polls
                first.poll(100, 50)
                second.poll(100, 50)
                if registry.get_sample_value("anomalyd_commit_seconds_count") and "commit_metadata_max" in caplog.text:
                    break
        offset, metadata = second.committed([tp])[tp]
        assert offset == 5 and json.loads(metadata.rstrip("\0")) == {"rebuild_from": 3}, metadata
        assert "kafka.commit_metadata_max_bytes to the brokers' offset.metadata.max.bytes" in caplog.text
        assert registry.get_sample_value("anomalyd_commit_failures_total") == 0
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_subscribed_topic_that_does_not_exist_is_logged(kafka_bootstrap: str, topic_name: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka reports it once, as an errored message of a poll; the columns leave such messages out, and the
    member, joined with nothing assigned, looked like an idle spare replica with nothing in its log."""
    import logging

    source = make_source("confluent", bootstrap_servers=kafka_bootstrap, group_id=topic_name, topics=[topic_name],
                         pattern=None, on_assign=lambda _tps: None, on_revoke=lambda _tps: None)
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.source_confluent"):
            give_up = time.monotonic() + 30.0
            while "UNKNOWN_TOPIC_OR_PART" not in caplog.text and time.monotonic() < give_up:
                assert len(source.poll(100, 200)) == 0
        assert "Kafka consumer error (UNKNOWN_TOPIC_OR_PART)" in caplog.text and topic_name in caplog.text
    finally:
        source.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_committed_offsets_refused_for_a_missing_acl_are_not_asked_again(kafka_bootstrap: str, topic_name: str,
                                                                         client: str) -> None:
    """An ACL missing (the client refused): the partitions' committed offsets were asked again after every poll, for
    ever, the partitions never read, behind a warning. Now CommittedUnreadable stops the daemon; a timeout is still
    asked again. (This broker has no authorizer: the client's own refusal stands in for its answer.)"""
    from pipelines.positions import Positions
    from pipelines.source import CommittedUnreadable

    source = _source_of_a_filled_topic(kafka_bootstrap, topic_name, client, 1)
    if client == "kafka-python":
        from kafka.errors import GroupAuthorizationFailedError, KafkaTimeoutError

        refusal, timeout = GroupAuthorizationFailedError("group anomalyd"), KafkaTimeoutError("10 s")
    else:
        from confluent_kafka import KafkaError, KafkaException

        refusal, timeout = (KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)),
                            KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    consumer = source._consumer

    class Refusing:  # the client, whose committed() raises ``error`` (confluent's methods cannot be replaced)
        def __init__(self, error: Exception) -> None:
            self.error = error

        def committed(self, *_args, **_kw):
            raise self.error

        def __getattr__(self, name: str):
            return getattr(consumer, name)

    try:
        for error, raised in ((refusal, CommittedUnreadable), (timeout, type(timeout))):
            source._consumer = Refusing(error)
            with pytest.raises(raised) as info:
                source.committed([(topic_name, 0)])
            positions = Positions()
            positions.assign([(topic_name, 0)])
            if raised is CommittedUnreadable:
                assert "AUTHORIZATION" in str(info.value).upper()  # the client's reason, named
                with pytest.raises(CommittedUnreadable):
                    positions.position_new(source, RecordBatch.empty())
            else:
                positions.position_new(source, RecordBatch.empty())
                assert positions.needs_positioning  # asked again after the next poll
    finally:
        source._consumer = consumer
        source.close(5)
