"""Both Kafka sources against a real broker: poll columns, consumer lag from cached high watermarks."""

from __future__ import annotations

import time

import pytest

from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from pipelines.source import Source, make_source

CLIENTS = ["kafka-python", "confluent"]
_GIVE_UP_S = 60.0  # a hang guard only


def _poll_until(source: Source, total: int, max_records: int) -> int:
    """Poll (at most ``max_records`` per call) until ``total`` records in all; returns how many came."""
    got = 0
    give_up = time.monotonic() + _GIVE_UP_S
    while got < total and time.monotonic() < give_up:
        got += len(source.poll(min(max_records, total - got), 500))
    return got


@pytest.mark.parametrize("client", CLIENTS)
def test_lag_follows_the_position(kafka_bootstrap: str, topic_name: str, client: str) -> None:
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    producer = make_producer(client, kafka_bootstrap)
    for i in range(300):
        producer.produce(topic_name, f'{{"stream":"s","ts":{i},"values":[{i}]}}'.encode())
    producer.flush(30)
    producer.close()
    source = make_source(client, bootstrap_servers=kafka_bootstrap, group_id=topic_name, topics=[topic_name],
                         pattern=None, on_assign=lambda _tps: None, on_revoke=lambda _tps: None)
    try:
        assert _poll_until(source, 100, 50) == 100
        assert source.lag() == {(topic_name, 0): 200}
        assert _poll_until(source, 200, 1000) == 200
        assert source.lag() == {(topic_name, 0): 0}
    finally:
        source.close()
