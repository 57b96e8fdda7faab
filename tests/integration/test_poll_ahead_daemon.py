"""kafka.poll_ahead with confluent-kafka against a real broker: a rebalance in the middle of a backlog.

While the daemon is backlogged its next poll runs on the helper thread, so the rebalance callbacks that
librdkafka runs inside that poll arrive on the helper; they must run on the loop thread, and nothing may be
lost or left uncommitted across the member joining and leaving."""

from __future__ import annotations

import threading
import time

from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_local import create_topic
from pipelines.source import make_source

from .daemon_support import (
    SLACK_MS,
    committed_offsets,
    config_dict,
    end_offsets,
    firing_per_anomaly,
    produce_with_anomalies,
    read_alerts,
    write_config,
)

SLOW_PROCESS_S = 0.02  # a busy loop, so the backlog lasts across the rebalance


class _SlowDaemon(Daemon):
    """The daemon with a slower intake per poll, and a record of the thread each rebalance callback ran on."""

    ran_on: list[tuple[str, str]]

    def process(self, batch) -> None:
        time.sleep(SLOW_PROCESS_S)
        super().process(batch)

    def _on_assign(self, tps) -> None:
        self.ran_on.append(("assign", threading.current_thread().name))
        super()._on_assign(tps)

    def _on_revoke(self, tps) -> None:
        if not self._leaving:  # the revoke of the consumer's close, where the daemon does nothing, runs on the
            self.ran_on.append(("revoke", threading.current_thread().name))  # thread that closes it
        super()._on_revoke(tps)


def test_a_rebalance_during_a_backlog_runs_callbacks_on_the_loop_thread(kafka_bootstrap, topic_name, daemon_models,
                                                                        tmp_path, caplog):
    models_dir, names = daemon_models
    create_topic(kafka_bootstrap, topic_name, partitions=4)
    truth, _ = produce_with_anomalies(kafka_bootstrap, topic_name, 600, ("spike", "level_shift"))
    group = f"g-{topic_name}"
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client="confluent",
                      kafka__poll_max_records=16, kafka__poll_ahead=True)
    called_from: list[str] = []  # the threads the client ran the callbacks on

    def source_factory(**kw):
        for key in ("on_assign", "on_revoke"):
            inner = kw[key]
            kw[key] = lambda tps, inner=inner: (called_from.append(threading.current_thread().name), inner(tps))
        return make_source(**kw)

    stop = threading.Event()
    daemon = _SlowDaemon(load_config(write_config(tmp_path / "c.yaml", cfg)), source_factory=source_factory,
                         stop_event=stop)
    daemon.ran_on = []
    codes: list[int] = []
    loop = threading.Thread(target=lambda: codes.append(daemon.run(timeout=240)), name="daemon-loop")
    loop.start()
    other = None
    try:
        deadline = time.monotonic() + 60
        while daemon.events_seen < 200 and time.monotonic() < deadline:  # backlogged, polling ahead
            time.sleep(0.05)
        other = make_source("confluent", bootstrap_servers=kafka_bootstrap, group_id=group, topics=[topic_name],
                            pattern=None, on_assign=lambda tps: None, on_revoke=lambda tps: None)
        while not other.assignment() and time.monotonic() < deadline:  # joins: the daemon gives up partitions
            other.poll(1, 200)
        assert other.assignment(), "the second member got no partitions"
        other.close()  # leaves without committing: the daemon gets them back and reads them from its commits
        other = None
        ends = end_offsets(kafka_bootstrap, topic_name)
        while committed_offsets(kafka_bootstrap, group, topic_name) != ends and time.monotonic() < deadline + 120:
            time.sleep(0.2)
    finally:
        if other is not None:
            other.close()
        stop.set()
        loop.join(timeout=60)
    assert codes == [0]
    assert committed_offsets(kafka_bootstrap, group, topic_name) == ends
    # the consumer's close (on a thread of its own, given up after the grace period) ran the callback itself: handed
    # to the loop thread, which had finished, it waited for the whole grace period and left without leaving the group
    assert not [r for r in caplog.records if "did not close" in r.getMessage()], caplog.text
    assert "anomalyd-poll" in called_from, called_from  # the rebalance arrived inside a poll on the helper ...
    assert [k for k, _ in daemon.ran_on].count("assign") >= 3, daemon.ran_on  # join, share, all back
    assert {t for _, t in daemon.ran_on} == {"daemon-loop"}, daemon.ran_on  # ... and ran on the loop thread
    alerts = read_alerts(kafka_bootstrap, f"{topic_name}-alerts")
    per = firing_per_anomaly(truth, alerts, SLACK_MS)
    assert all(per), [t["kind"] for t, hits in zip(truth, per, strict=True) if not hits]
