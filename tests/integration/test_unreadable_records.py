"""Records a Kafka client cannot read, against a real broker: a header name that is not UTF-8, as a producer that
writes header names as bytes (Go's, C's) may send it. kafka-python raised CorruptRecordError out of every poll
(the partition stood still, the daemon stopped at every start); confluent-kafka raised reading the headers of
such a message to dead-letter it. Now the record is dead-lettered and reading goes on."""

from __future__ import annotations

import json

import pytest

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_local import create_topic

from .daemon_support import committed_offsets, config_dict, read_topic, write_config


@pytest.fixture
def models(daemon_models):
    return daemon_models


class _NotUtf8(str):
    """A header name kafka-python's producer writes as bytes that are not UTF-8 (it calls ``str.encode``)."""

    def encode(self, *_args, **_kwargs) -> bytes:
        return b"tenant-\xff\xfe"


def _produce_one_per_batch(bootstrap: str, topic: str, messages: list[tuple[bytes, list | None]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for value, headers in messages:
            producer.send(topic, value=value, headers=headers or []).get(timeout=10)  # each in a batch of its own
    finally:
        producer.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_record_whose_header_name_is_not_utf8_is_dead_lettered_and_reading_goes_on(kafka_bootstrap, topic_name,
                                                                                     models, tmp_path, client):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    good = [json.dumps({"stream": "pump-0", "ts": 1764180000000 + i * 1000, "values": [0.1, 0.2, 0.3, 0.4]}).encode()
            for i in range(12)]
    bad = [(_NotUtf8("tenant"), b"a")]
    # 30 dead letters with readable headers first: Python specialises the warm call site that reads them, and a
    # specialised call left confluent-kafka's error for the later bad name to surface elsewhere (CI, the suite run)
    warm = [(b"{warm %d" % i, [("tenant", b"a")]) for i in range(30)]
    messages = [(good[0], None), *warm, (b"{not json", bad), (good[1], bad), *[(g, None) for g in good[2:]]]
    first_bad = 1 + len(warm)
    _produce_one_per_batch(kafka_bootstrap, topic_name, messages)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=len(messages), timeout=60) == 0
    dead = [(d.value, dict(d.headers)) for d in read_topic(kafka_bootstrap, f"{topic_name}-dlq")]
    assert [h["anomalyd-error-reason"] for _, h in dead[: len(warm)]] == [b"bad_json"] * len(warm)
    dead = dead[len(warm):]
    if client == "kafka-python":  # it reads neither record: both dead-lettered empty, naming where they are
        assert [(v, h["anomalyd-error-reason"], h["anomalyd-source-offset"]) for v, h in dead] == [
            (b"", b"unreadable_record", b"%d" % first_bad), (b"", b"unreadable_record", b"%d" % (first_bad + 1))]
        assert b"kafka-python cannot read" in dead[0][1]["anomalyd-error-detail"]
    else:  # it reads the values, not the headers: the bad JSON is dead-lettered, its headers' loss said
        [(value, headers)] = dead
        assert value == b"{not json" and headers["anomalyd-error-reason"] == b"bad_json"
        assert b"confluent-kafka cannot read them" in headers["anomalyd-original-headers-unreadable"]
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {0: len(messages)}
    got = daemon.registry.get_sample_value
    assert got("anomalyd_dead_letters_total", {"topic": topic_name, "reason": "unreadable_record"}) == (
        2 if client == "kafka-python" else None)
