"""A broker outage on a quiet topic makes the daemon not ready, and it recovers when the broker is back.

A consumer whose brokers are gone sees only empty polls, as on a quiet topic; without the probe of
pipelines/kafka_probe.py, /readyz, anomalyd_ready and every alert rule stayed green through the outage.
The broker here is the test's own (``own_broker``: stopped and started again on the same ports and data dir, or
frozen), not the session's.
"""

from __future__ import annotations

import json
import threading
import time
from functools import partial

import pytest

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from pipelines.kafka_probe import KafkaProbe

from .conftest import freeze, thaw
from .daemon_support import committed_offsets, config_dict, end_offsets, produce_with_anomalies, write_config


def _stopped(daemon: Daemon, thread: threading.Thread, timeout_s: float = 60) -> None:
    """Stop the daemon; if it does not end in time, fail with every thread's stack (where it waits)."""
    import sys
    import traceback

    daemon.request_stop()
    thread.join(timeout_s)
    if thread.is_alive():
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = "\n".join(f"--- {names.get(tid, tid)}\n" + "".join(traceback.format_stack(frame)[-12:])
                           for tid, frame in sys._current_frames().items())
        pytest.fail(f"the daemon did not stop within {timeout_s:g}s:\n{stacks}")


def _produce_pump_events(producer, topic: str, first: int, n: int) -> None:
    """Events ``first`` .. ``first + n - 1`` of stream pump-0, one second apart, flushed."""
    for i in range(first, first + n):
        event = {"stream": "pump-0", "ts": 1764180000000 + i * 1000, "values": [0.1] * 4}
        producer.produce(topic, json.dumps(event).encode())
    producer.flush(30)


def _until(what: str, check, deadline_s: float, daemon_thread: threading.Thread) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        assert daemon_thread.is_alive(), f"the daemon stopped while waiting for: {what}"
        assert time.monotonic() < deadline, f"not within {deadline_s:g}s: {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_broker_outage_on_a_quiet_topic_makes_the_daemon_not_ready_until_it_is_back(daemon_models, topic_name,
                                                                                      tmp_path, client, own_broker):
    broker, bootstrap = own_broker, own_broker.bootstrap
    models_dir, names = daemon_models
    create_topic(bootstrap, topic_name, partitions=1)
    producer = make_producer("kafka-python", bootstrap)
    event = {"stream": "pump-0", "ts": 1764180000000, "values": [0.1] * 4}
    producer.produce(topic_name, json.dumps(event).encode())
    producer.flush(30)
    producer.close()
    cfg = config_dict(bootstrap, topic_name, models_dir, names, client=client)
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    daemon.kafka = KafkaProbe(daemon.metrics.kafka_reachable, interval_s=1.0, timeout_s=1.0)
    thread = threading.Thread(target=daemon.run, kwargs={"timeout": 240}, daemon=True)
    thread.start()
    try:
        reachable = lambda: daemon.registry.get_sample_value("anomalyd_kafka_reachable")  # noqa: E731
        _until("ready with the first record consumed", lambda: daemon.is_ready() and daemon.events_seen, 60, thread)
        time.sleep(3)  # quiet: probes that the broker answers
        assert daemon.is_ready() and reachable() == 1

        ready_gauge = lambda: daemon.registry.get_sample_value("anomalyd_ready")  # noqa: E731 - set by the loop
        broker.stop()
        _until("not ready once the broker is gone", lambda: ready_gauge() == 0, 30, thread)
        assert reachable() == 0 and not daemon.is_ready()
        # past the session timeout (15 s): a client that drops the partitions leaves nothing assigned, which is
        # still an outage, not an idle member
        gone = time.monotonic()
        while time.monotonic() - gone < 20:
            assert ready_gauge() == 0 and thread.is_alive()
            time.sleep(0.5)

        broker.start(timeout_s=120)
        back = time.monotonic()
        _until("ready again once the broker is back", lambda: ready_gauge() == 1, 60, thread)
        assert reachable() == 1 and daemon.is_ready()
        print(f"{client}: ready {time.monotonic() - back:.1f}s after the broker was back")
        daemon.request_stop()
        assert not daemon.is_ready()  # from the stop on, while the shutdown drains: a Service sends no new work
        _stopped(daemon, thread)
        assert not daemon.is_ready()
    finally:  # on a failed assert too: no daemon left polling while later tests run
        daemon.request_stop()
        thread.join(60)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_hung_broker_does_not_stop_the_loop_and_the_commit_lands_once_it_answers(daemon_models, topic_name,
                                                                                  tmp_path, client, own_broker):
    """A broker that stops answering without closing its connections (a frozen process here; a network that
    drops packets alike) held a synchronous offset commit, and the loop with it: for 30 s (kafka-python), or until
    the broker woke up (confluent-kafka). Meanwhile the probe could not run, so /readyz stayed green, and /healthz
    went red after 60 s. The loop's commits are asynchronous now (pipelines/commits.py)."""
    bootstrap = own_broker.bootstrap
    models_dir, names = daemon_models
    create_topic(bootstrap, topic_name, partitions=1)
    producer = make_producer("kafka-python", bootstrap)
    produce = partial(_produce_pump_events, producer, topic_name)
    produce(0, 10)
    # the idle commit comes 3 s after the last record; none while busy (the first flush commits at once)
    cfg = config_dict(bootstrap, topic_name, models_dir, names, client=client, kafka__poll_timeout_ms=3000,
                      kafka__commit_interval_ms=600_000,
                      sinks={"kafka": {"enabled": False}, "log": {"enabled": False}})  # the commit alone
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    daemon.kafka = KafkaProbe(daemon.metrics.kafka_reachable, interval_s=1.0, timeout_s=1.0)
    thread = threading.Thread(target=daemon.run, kwargs={"timeout": 300}, daemon=True)
    thread.start()
    try:
        group = cfg["kafka"]["group_id"]
        _until("the first records committed", lambda: committed_offsets(bootstrap, group, topic_name) == {0: 10},
               60, thread)
        produce(10, 10)
        producer.close()
        _until("the second records consumed", lambda: daemon.events_seen >= 20, 30, thread)
        freeze(own_broker)  # before the idle commit of records 10-19
        try:
            frozen, longest, ready_seen = time.monotonic(), 0.0, []
            while time.monotonic() - frozen < 40:
                longest = max(longest, time.monotonic() - daemon._heartbeat)
                ready_seen.append(daemon.registry.get_sample_value("anomalyd_ready"))
                assert thread.is_alive() and daemon.is_alive()
                time.sleep(0.2)
        finally:
            thaw(own_broker)
        print(f"{client}: the loop's longest pause while the broker was frozen: {longest:.1f} s")
        assert longest < 15, f"the loop stood still for {longest:.1f} s while the broker was frozen"
        assert 0 in ready_seen, "the probe never reported the frozen broker"
        _until("records 10-19 committed once the broker answers",
               lambda: committed_offsets(bootstrap, group, topic_name) == {0: 20}, 120, thread)
        _stopped(daemon, thread)
    finally:  # on a failed assert too: no daemon left polling while later tests run
        daemon.request_stop()
        thread.join(60)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_stop_while_the_broker_hangs_ends_within_the_grace_period(daemon_models, topic_name, tmp_path, client,
                                                                     own_broker):
    """The shutdown's commit and the consumer's close wait for a broker that hangs no longer than
    shutdown.grace_period_s (and a second for each client closed after it): they waited 30 s (kafka-python) and
    until the broker woke up (confluent-kafka: its synchronous commit and its close have no timeout), past the pod's
    terminationGracePeriodSeconds. The records processed since the last commit are not committed: exit code 1. The
    grace period outlasts the group session (15 s): the lost-partitions callback that librdkafka serves while the
    commit waits had dropped the uncommitted offsets, and the failed shutdown exited 0."""
    bootstrap, grace = own_broker.bootstrap, 18
    models_dir, names = daemon_models
    create_topic(bootstrap, topic_name, partitions=1)
    producer = make_producer("kafka-python", bootstrap)
    produce = partial(_produce_pump_events, producer, topic_name)
    produce(0, 10)  # committed at the first flush; the next ten only by the shutdown
    cfg = config_dict(bootstrap, topic_name, models_dir, names, client=client, kafka__poll_timeout_ms=3000,
                      kafka__commit_interval_ms=600_000, shutdown={"grace_period_s": grace},
                      sinks={"kafka": {"enabled": False}, "log": {"enabled": False}})
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(daemon.run(timeout=300)), daemon=True)
    thread.start()
    try:
        _until("the first records committed",
               lambda: committed_offsets(bootstrap, cfg["kafka"]["group_id"], topic_name) == {0: 10}, 60, thread)
        produce(10, 10)
        producer.close()
        _until("every record consumed", lambda: daemon.events_seen >= 20, 30, thread)
        freeze(own_broker)
        try:
            asked = time.monotonic()
            daemon.request_stop()
            thread.join(grace + 30)
            took = time.monotonic() - asked
        finally:
            thaw(own_broker)
        print(f"{client}: stopped {took:.1f} s after it was asked to, with the broker frozen")
        assert not thread.is_alive(), f"still not stopped {took:.0f} s after it was asked to"
        assert took < grace + 8, f"stopped {took:.1f} s after it was asked to, grace period {grace} s"
        assert exit_code == [1]
    finally:  # on a failed assert too: no daemon left polling while later tests run
        daemon.request_stop()
        thread.join(60)


def test_partitions_lost_while_polling_ahead_through_a_backlog_are_replayed_and_committed(daemon_models, topic_name,
                                                                                          tmp_path, own_broker):
    """confluent-kafka, polling ahead through a backlog, loses its partitions to a session timeout while the broker
    is frozen. librdkafka blocks ``assignment()`` while a rebalance callback runs; the loop asked for the lag (which
    calls it) while the helper's poll sat in the lost callback, waiting for the loop: both waited for ever (2 of 2
    runs). The lag is now read with no poll in flight; the daemon rejoins, replays and commits everything."""
    bootstrap = own_broker.bootstrap
    models_dir, names = daemon_models
    create_topic(bootstrap, topic_name, partitions=2)
    create_topic(bootstrap, f"{topic_name}-alerts", partitions=1)
    _, n = produce_with_anomalies(bootstrap, topic_name, 1500, ("spike", "level_shift"))
    end = end_offsets(bootstrap, topic_name)
    cfg = config_dict(bootstrap, topic_name, models_dir, names, client="confluent", kafka__session_timeout_ms=6000,
                      kafka__poll_max_records=100, kafka__commit_interval_ms=0)
    assert cfg["kafka"].get("poll_ahead", True)  # the default
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    thread = threading.Thread(target=daemon.run, kwargs={"timeout": 240}, daemon=True)
    thread.start()
    try:
        _until("a quarter of the backlog read", lambda: daemon.events_seen >= n // 4, 60, thread)
        freeze(own_broker)
        try:
            time.sleep(15)  # past the session timeout
        finally:
            thaw(own_broker)
        group = cfg["kafka"]["group_id"]
        _until("everything committed after the lost partitions came back",
               lambda: committed_offsets(bootstrap, group, topic_name) == end, 90, thread)
        assert time.monotonic() - daemon._heartbeat < 10
        _stopped(daemon, thread)
    finally:  # on a failed assert too: no daemon left polling while later tests run
        daemon.request_stop()
        thread.join(60)
