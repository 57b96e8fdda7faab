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



BAD = 6  # records for the dead-letter topic while its broker is frozen


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_dead_letter_the_brokers_cannot_take_yet_holds_the_commit_back_and_goes_out_later(
        kafka_bootstrap, topic_name, models, tmp_path, client, monkeypatch, own_broker):
    """Dead letters go to a second broker here, which is frozen (SIGSTOP) when the bad record comes: brokers out of
    reach, as in an outage or while a partition has no leader. A flush that timed out had stopped the daemon (exit
    1, and a restart loop for as long as the trouble lasted); now the producer keeps the dead letter and retries,
    the offsets wait, and once the broker answers the dead letter goes out and the records are committed."""
    import threading
    import time

    from pipelines import daemon as daemon_module

    from .conftest import freeze, thaw

    dead_letters_at = own_broker.bootstrap

    def producer_for(client_name, bootstrap, security=None, *, never_give_up=False, **options):
        return make_producer(client_name, dead_letters_at if never_give_up else bootstrap, security,
                             never_give_up=never_give_up, **options)

    monkeypatch.setattr(daemon_module, "make_producer", producer_for)
    models_dir, names = models
    dlq = f"{topic_name}-dlq"
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    create_topic(dead_letters_at, dlq)
    _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 60, ("level_shift",))
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client,
                      sinks={"kafka": {"enabled": False}, "log": {"enabled": False}})
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    thread = threading.Thread(target=daemon.run, kwargs={"timeout": 240}, daemon=True)
    thread.start()
    try:
        group = f"g-{topic_name}"
        deadline = time.monotonic() + 60
        while committed_offsets(kafka_bootstrap, group, topic_name) != {0: n}:
            assert thread.is_alive() and time.monotonic() < deadline, "the good records were not committed"
            time.sleep(0.2)
        freeze(own_broker)
        bad = [b"{not json %d" % i for i in range(BAD)]
        _produce(kafka_bootstrap, topic_name, bad)
        deadline, longest = time.monotonic() + 30, 0.0
        while daemon.registry.get_sample_value("anomalyd_dead_letters_total",
                                               {"topic": topic_name, "reason": "bad_json"}) != BAD:
            assert thread.is_alive() and time.monotonic() < deadline, "the bad records were not dead-lettered"
            longest = max(longest, time.monotonic() - daemon._heartbeat)
            time.sleep(0.2)
        held = time.monotonic()
        while time.monotonic() - held < 25:  # flushes that find the dead letters unacknowledged
            assert thread.is_alive(), "the daemon stopped on a dead letter the brokers had not acknowledged yet"
            assert committed_offsets(kafka_bootstrap, group, topic_name) == {0: n}  # not past the bad records
            longest = max(longest, time.monotonic() - daemon._heartbeat)
            time.sleep(0.5)
        thaw(own_broker)
        print(f"{client}: the loop's longest pause while dead letters could not go out: {longest:.1f} s")
        # kafka-python's send waits max_block_ms for the topic's metadata: 10 s for each dead letter (its /healthz
        # failed after six), and again for the first one at each flush
        assert longest < 20, f"the loop stood still for {longest:.1f} s"
        deadline = time.monotonic() + 90
        while committed_offsets(kafka_bootstrap, group, topic_name) != {0: n + BAD}:
            assert thread.is_alive() and time.monotonic() < deadline, "not committed once the dead letter went out"
            time.sleep(0.5)
        # at least once: a produce request that timed out while the broker was frozen may have been written
        # before it froze, and kafka-python's producer (idempotence off, pipelines/kafka_io.py) sends it again
        assert {r.value for r in read_topic(dead_letters_at, dlq)} == set(bad)
        daemon.request_stop()
        thread.join(60)
        assert not thread.is_alive()
    finally:  # on a failed assert too: no daemon left polling while later tests run
        thaw(own_broker)  # frozen still if an assert failed while it was
        daemon.request_stop()
        thread.join(60)


def test_alerts_go_out_while_a_dead_letter_waits_for_the_brokers(kafka_bootstrap, topic_name, models, tmp_path,
                                                                  monkeypatch, own_broker, alertmanager):
    """Scoring on the loop thread (``processing.score_in_background: false``): a dead letter the brokers had not
    acknowledged yet held the sinks' flush back, so Alertmanager got no alert for as long as the trouble lasted.
    Now only the offsets wait. Dead letters go to a second broker, frozen, as above."""
    import threading
    import time
    import uuid

    from pipelines import daemon as daemon_module

    from .conftest import freeze, thaw

    def producer_for(client_name, bootstrap, security=None, *, never_give_up=False, **options):
        return make_producer(client_name, own_broker.bootstrap if never_give_up else bootstrap, security,
                             never_give_up=never_give_up, **options)

    monkeypatch.setattr(daemon_module, "make_producer", producer_for)
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    create_topic(own_broker.bootstrap, f"{topic_name}-dlq")
    run = uuid.uuid4().hex[:12]
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client="kafka-python",
                      processing__score_in_background=False, kafka__poll_max_records=20_000,  # few loop turns:
                      # each waits 10 s for the dead letter
                      sinks={"kafka": {"enabled": False}, "log": {"enabled": False},
                             "alertmanager": {"enabled": True, "url": alertmanager.url, "labels": {"test_run": run}}})
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    thread = threading.Thread(target=daemon.run, kwargs={"timeout": 240}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not daemon.is_ready():
            assert thread.is_alive() and time.monotonic() < deadline, "the daemon did not become ready"
            time.sleep(0.2)
        freeze(own_broker)
        try:
            _produce(kafka_bootstrap, topic_name, [b"{not json"])
            # ending inside the anomaly (steps 100-125): its incident stays open, so Alertmanager holds it as active
            _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 200, ("level_shift",), first_steps=118)
            deadline = time.monotonic() + 90
            while not [a for a in alertmanager.alerts() if a["labels"].get("test_run") == run]:
                assert thread.is_alive() and time.monotonic() < deadline, "no alert reached Alertmanager"
                time.sleep(0.5)
            assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {}  # the dead letter waits
        finally:
            thaw(own_broker)
        deadline = time.monotonic() + 90
        while committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) != {0: n + 1}:
            assert thread.is_alive() and time.monotonic() < deadline, "not committed once the dead letter went out"
            time.sleep(0.5)
        daemon.request_stop()
        thread.join(60)
        assert not thread.is_alive()
    finally:  # on a failed assert too: no daemon left polling while later tests run
        daemon.request_stop()
        thread.join(60)
