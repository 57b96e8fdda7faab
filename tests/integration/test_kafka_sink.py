"""KafkaAlertSink with both producer backends against a real broker: delivery, rejection, re-send."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType

from pipelines.alert_message import FIRING, RESOLVED, Alert
from pipelines.alerts import AlertTracker
from pipelines.kafka_io import KafkaDeliveryError, make_producer
from pipelines.kafka_local import create_topic
from pipelines.sinks import KafkaAlertSink, SinkError

CLIENTS = ["kafka-python", "confluent"]
_GIVE_UP_S = 60.0  # a hang guard only: reading stops as soon as the expected messages are in


def _incident(stream: str = "pump-3") -> list[Alert]:
    """The firing and resolved alerts of one real incident (k=n=m=1)."""
    tracker = AlertTracker(k=1, n=1, m=1)
    return tracker.observe(
        np.array([0, 0]), np.array([4.0, 0.1]), np.array([True, False]), np.array([1000, 2000]), "sensors",
        np.array([0, 0]), np.array([7, 8]), np.array([[1.0, 3.0], [1.0, 1.0]]), ["temp", "flow"],
        model="sensors-gru", model_version="2", stream_names=[stream],
    )  # fmt: skip


def _read(bootstrap: str, topic: str, count: int) -> list:
    """The first ``count`` records of ``topic`` (a plain kafka-python consumer, no group)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    records: list = []
    give_up = time.monotonic() + _GIVE_UP_S
    try:
        while len(records) < count and time.monotonic() < give_up:
            for batch in consumer.poll(timeout_ms=500).values():
                records += batch
        end = consumer.end_offsets(list(consumer.assignment()))
    finally:
        consumer.close()
    assert sum(end.values()) == count, f"expected exactly {count} records in {topic}, end offsets {end}"
    return records


@pytest.mark.parametrize("client", CLIENTS)
def test_alerts_reach_the_topic_with_key_and_headers(kafka_bootstrap: str, topic_name: str, client: str) -> None:
    create_topic(kafka_bootstrap, topic_name)
    producer = make_producer(client, kafka_bootstrap)
    try:
        sink = KafkaAlertSink(producer, topic_name)
        alerts = _incident()
        assert [a.status for a in alerts] == [FIRING, RESOLVED]
        sink.add(alerts)
        sink.flush(30.0)
    finally:
        producer.close()
    records = _read(kafka_bootstrap, topic_name, 2)
    assert [r.key for r in records] == [b"pump-3", b"pump-3"]
    assert [Alert.from_dict(json.loads(r.value)) for r in records] == alerts
    for record, alert in zip(records, alerts, strict=True):
        assert dict(record.headers) == {"alert-id": alert.id.encode(), "alert-status": alert.status.encode()}


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_rejection_fails_flush_and_the_alert_is_resent(
    kafka_bootstrap: str, topic_name: str, client: str
) -> None:
    create_topic(kafka_bootstrap, topic_name, config={"max.message.bytes": "300"})
    alert = _incident(stream="pump-" + "x" * 600)[0]  # ~1.5 kB: the broker refuses it
    producer = make_producer(client, kafka_bootstrap)
    try:
        sink = KafkaAlertSink(producer, topic_name)
        sink.add([alert])
        with pytest.raises(SinkError, match="1 alerts not delivered") as err:
            sink.flush(30.0)
        assert isinstance(err.value.__cause__, KafkaDeliveryError)

        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            resource = ConfigResource(ConfigResourceType.TOPIC, topic_name, configs={"max.message.bytes": "100000"})
            admin.alter_configs([resource])
        finally:
            admin.close()
        # the broker applies a topic's new config asynchronously: a resend just after alter_configs may still be
        # refused, and the sink keeps the alert for the next flush, as the daemon's loop would flush again
        deadline = time.monotonic() + 60
        while True:
            try:
                sink.flush(30.0)  # produces the unacknowledged alert again
                break
            except SinkError as exc:
                if "MSG_SIZE_TOO_LARGE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        sink.flush(30.0)  # nothing left: no duplicate
    finally:
        producer.close()
    (record,) = _read(kafka_bootstrap, topic_name, 1)
    assert Alert.from_dict(json.loads(record.value)) == alert


def test_sends_that_find_no_metadata_wait_once_per_flush(own_broker, topic_name: str) -> None:
    """kafka-python's send waits max_block_ms (10 s) for its topic's metadata. With the brokers out of reach (frozen
    here) before the topic's first message, every alert of a burst waited that long, on the scoring thread that the
    loop waits for (and again at each re-send); now the first waits and the others fail at once, until the flush
    reports them all (the sink keeps them and re-sends them at its next flush)."""
    from .conftest import freeze, thaw

    producer = make_producer("kafka-python", own_broker.bootstrap)
    freeze(own_broker)
    try:
        t0 = time.monotonic()
        for i in range(5):
            producer.produce(topic_name, b"alert %d" % i)
        took = time.monotonic() - t0
        with pytest.raises(KafkaDeliveryError, match="5 of 5 Kafka messages not delivered"):
            producer.flush(1)
    finally:
        thaw(own_broker)
    producer.close()
    assert took < 25, f"5 sends took {took:.0f} s"


def test_a_dead_letter_producer_gives_up_once_too_many_messages_found_no_metadata(own_broker, topic_name: str,
                                                                                   monkeypatch) -> None:
    """The dead-letter producer keeps messages whose topic has no metadata, for as long as the brokers are away.
    kafka-python reports a topic that does not exist (auto-create off, or deleted) the same way, so the daemon held
    its offsets, and the messages, for ever. Past MAX_UNSENT the flush fails for good: the daemon stops uncommitted.
    No metadata here comes from a frozen broker."""
    from pipelines import kafka_io
    from pipelines.kafka_io import KafkaDeliveryPending

    from .conftest import freeze, thaw

    monkeypatch.setattr(kafka_io, "MAX_UNSENT", 20)
    producer = make_producer("kafka-python", own_broker.bootstrap, never_give_up=True)
    freeze(own_broker)
    try:
        for i in range(20):
            producer.produce(topic_name, b"bad %d" % i)
        with pytest.raises(KafkaDeliveryPending):
            producer.flush(1)
        producer.produce(topic_name, b"one more")
        with pytest.raises(KafkaDeliveryError, match="21 messages found no metadata") as failed:
            producer.flush(1)
        assert not isinstance(failed.value, KafkaDeliveryPending)
    finally:
        thaw(own_broker)
    producer.close(1)


def test_closing_a_producer_with_messages_the_brokers_did_not_take_does_not_raise(own_broker, topic_name: str) -> None:
    """kafka-python's close flushes, and raises KafkaTimeoutError when messages are left: the daemon's exit stack
    closes its producers after a shutdown whose deliveries failed (exit code 1), and that raised a traceback out of
    ``Daemon.run`` instead."""
    from .conftest import freeze, thaw

    create_topic(own_broker.bootstrap, topic_name)
    producer = make_producer("kafka-python", own_broker.bootstrap, never_give_up=True)
    producer.produce(topic_name, b"first")
    producer.flush(30)  # the topic's metadata is known now
    freeze(own_broker)
    try:
        producer.produce(topic_name, b"second")
        producer.close(1)
    finally:
        thaw(own_broker)
