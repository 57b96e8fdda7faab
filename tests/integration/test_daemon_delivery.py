"""Dead letters and alerts against a real broker: a refusal on one path is that path's, never the other's.

Each path has its own producer. With one shared producer, whichever thread flushed first took every failure: the
scoring thread's alert flush could take a refused dead letter's (and the loop then committed past that record),
and the loop's dead-letter flush could take a refused alert's (and the daemon crashed instead of retrying).
"""

from __future__ import annotations

import json

import pytest

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_io import KafkaDeliveryError, make_producer
from pipelines.kafka_local import create_topic

from .daemon_support import committed_offsets, config_dict, produce_with_anomalies, read_topic, write_config


@pytest.fixture
def models(daemon_models):
    return daemon_models


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer("kafka-python", bootstrap)
    try:
        for value in values:
            producer.produce(topic, value)
        producer.flush(30)
    finally:
        producer.close()


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_refused_alerts_hold_the_commits_back_and_dead_letters_still_go_out(kafka_bootstrap, topic_name, models,
                                                                             tmp_path, client, background):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    create_topic(kafka_bootstrap, f"{topic_name}-alerts", config={"max.message.bytes": "200"})  # refuses alerts
    _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 240, ("level_shift",))
    _produce(kafka_bootstrap, topic_name, [b"{not json"])
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client, shutdown={"grace_period_s": 5})
    cfg["processing"]["score_in_background"] = background
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=n + 1, timeout=90) == 1  # the alerts were never delivered: exit 1, nothing committed
    assert [r.value for r in read_topic(kafka_bootstrap, f"{topic_name}-dlq")] == [b"{not json"]
    assert read_topic(kafka_bootstrap, f"{topic_name}-alerts") == []
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {}
    assert daemon.registry.get_sample_value("anomalyd_sink_failures_total", {"sink": "kafka"}) >= 1


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_refused_dead_letter_stops_the_daemon_uncommitted_while_alerts_flow(kafka_bootstrap, topic_name, models,
                                                                              tmp_path, client):
    """Background scoring: the scoring thread delivers alerts while the loop dead-letters a record the dead-letter
    topic refuses. The loop's own flush must see that refusal: it stops without committing past the record."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    create_topic(kafka_bootstrap, f"{topic_name}-dlq", config={"max.message.bytes": "400"})
    _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 240, ("level_shift",))
    bad = json.dumps({"stream": "pump-0", "ts": 1, "values": ["x" * 1000, 1, 2, 3]}).encode()  # bad_value_type
    _produce(kafka_bootstrap, topic_name, [bad])
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client, shutdown={"grace_period_s": 5})
    cfg["processing"]["score_in_background"] = True
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    with pytest.raises(KafkaDeliveryError, match="not delivered"):
        daemon.run(count=n + 1, timeout=90)
    assert read_topic(kafka_bootstrap, f"{topic_name}-dlq") == []
    committed = committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name)
    assert committed.get(0, 0) <= n  # never past the refused record (offset n)
