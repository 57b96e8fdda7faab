"""End-to-end checks of the local Kafka broker: real produce/consume/commit with both Python clients."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipelines.kafka_local import LocalKafka, api_versions_ok, create_topic, free_port

N_MESSAGES = 1000
PARTITIONS = 3
N_KEYS = 7
_GIVE_UP_S = 90.0  # a hang guard only: the loops end as soon as all messages are in


def _key(i: int) -> bytes:
    return f"k{i % N_KEYS}".encode()


def _roundtrip_kafka_python(bootstrap: str, topic: str, group: str) -> list[tuple[bytes, int]]:
    """Produce N_MESSAGES with kafka-python, consume them in ``group`` and commit manually."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [producer.send(topic, key=_key(i), value=str(i).encode()) for i in range(N_MESSAGES)]
    producer.flush()
    for fut in futures:
        fut.get(timeout=30)
    producer.close()

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000,
                             heartbeat_interval_ms=1000)
    seen: list[tuple[bytes, int]] = []
    give_up = time.monotonic() + _GIVE_UP_S
    while len(seen) < N_MESSAGES and time.monotonic() < give_up:
        for records in consumer.poll(timeout_ms=500).values():
            seen += [(r.key, int(r.value)) for r in records]
    consumer.commit()
    consumer.close()
    return seen


def _roundtrip_confluent(bootstrap: str, topic: str, group: str) -> list[tuple[bytes, int]]:
    """Produce N_MESSAGES with confluent-kafka, consume them in ``group`` and commit synchronously."""
    import confluent_kafka
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(N_MESSAGES):
        producer.produce(topic, key=_key(i), value=str(i).encode())
    assert producer.flush(30) == 0, "confluent-kafka producer could not deliver every message"

    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
    })
    consumer.subscribe([topic])
    seen: list[tuple[bytes, int]] = []
    give_up = time.monotonic() + _GIVE_UP_S
    while len(seen) < N_MESSAGES and time.monotonic() < give_up:
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            assert msg.error() is None, msg.error()
            seen.append((msg.key(), int(msg.value())))
    consumer.commit(asynchronous=False)
    consumer.close()
    return seen


_ROUNDTRIPS = {"kafka-python": _roundtrip_kafka_python, "confluent-kafka": _roundtrip_confluent}


@pytest.mark.parametrize("client", sorted(_ROUNDTRIPS))
def test_produce_consume_commit(client: str, kafka_bootstrap: str, topic_name: str) -> None:
    create_topic(kafka_bootstrap, topic_name, partitions=PARTITIONS)
    group = f"g-{uuid.uuid4().hex[:10]}"

    seen = _ROUNDTRIPS[client](kafka_bootstrap, topic_name, group)

    assert sorted(v for _, v in seen) == list(range(N_MESSAGES))
    for k in range(N_KEYS):  # one key lives in one partition, so its messages keep their order
        values = [v for key, v in seen if key == _key(k)]
        assert values == sorted(values)

    # Read back what the broker stored for the group with a fresh, independent client.
    checker = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic_name, p) for p in range(PARTITIONS)]
    committed = {tp.partition: checker.committed(tp) for tp in tps}
    ends = {tp.partition: off for tp, off in checker.end_offsets(tps).items()}
    checker.close()
    assert committed == ends
    assert sum(ends.values()) == N_MESSAGES


def test_status_and_reuse(kafka_broker: LocalKafka) -> None:
    status = kafka_broker.status()
    assert status.state == "running"
    assert status.pid is not None and status.bootstrap == kafka_broker.bootstrap
    assert api_versions_ok("127.0.0.1", kafka_broker.port)

    again = LocalKafka(port=kafka_broker.port)
    assert again.start(timeout_s=30) == kafka_broker.bootstrap
    assert again.launched is False  # the running broker was reused, not a second one started
    assert again.status().pid == status.pid


def test_status_of_unused_port_is_stopped() -> None:
    port = free_port()
    assert LocalKafka(port=port).status().state == "stopped"
    assert not api_versions_ok("127.0.0.1", port, timeout_s=0.5)
