"""Daemon lifecycle against a real broker: window rebuild after restart, model hot swap, Alertmanager, train."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from pipelines.model_store import ModelStore
from pipelines.produce import produce_live

from .daemon_support import (
    HISTORY,
    INTERVAL_MS,
    N_STREAMS,
    WINDOW,
    committed_offsets,
    config_dict,
    end_offsets,
    fleet,
    produce_with_anomalies,
    read_alerts,
    write_config,
)


@pytest.fixture
def models(daemon_models):
    return daemon_models


def _produce_clean(bootstrap: str, topic: str, steps: int, rate: float | None = None) -> int:
    f = fleet()
    data, truth = f.live(HISTORY, steps, [])
    producer = make_producer("kafka-python", bootstrap)
    try:
        t0 = int(time.time() * 1000) - (HISTORY + steps) * INTERVAL_MS  # event times end about now
        return produce_live(producer, topic, f, data, HISTORY, t0, INTERVAL_MS, rate, truth, None)
    finally:
        producer.close()


def _scored(daemon: Daemon, topic: str) -> float:
    return daemon.registry.get_sample_value("anomalyd_events_total", {"topic": topic, "outcome": "scored"}) or 0.0


@pytest.mark.parametrize(("first_client", "second_client"), [("kafka-python", "kafka-python"),
                                                              ("confluent", "kafka-python"),
                                                              ("kafka-python", "confluent")])
def test_restart_rebuilds_windows_without_blind_spot(kafka_bootstrap, topic_name, models, tmp_path, first_client,
                                                     second_client):
    """Also across clients (a switch of kafka.client, a rolling upgrade): confluent-kafka writes the commit's
    metadata with a trailing NUL, which kafka-python's reader kept (and the floor was lost), and reads it up to a
    NUL, past the end of kafka-python's metadata unless that has one too."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    n = _produce_clean(kafka_bootstrap, topic_name, 100)  # 100 steps x 4 streams
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, f"g-{topic_name}", f"{topic_name}-alerts",
                      client=first_client)
    cfg["kafka"]["poll_max_records"] = 50
    path = write_config(tmp_path / "c.yaml", cfg)
    first = Daemon(load_config(path))
    assert first.run(count=n // 2, timeout=60) == 0
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {0: n // 2}
    assert _scored(first, topic_name) == n // 2 - N_STREAMS * (WINDOW - 1)

    cfg["kafka"]["client"] = second_client
    second = Daemon(load_config(write_config(path, cfg)))
    done = threading.Thread(target=second.run, kwargs={"timeout": 60})
    done.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) != {0: n}:
        time.sleep(0.3)
    second.request_stop()
    done.join(timeout=30)
    # every event after the restart is scored at once: the windows were rebuilt from the replayed records
    assert _scored(second, topic_name) == n - n // 2
    assert second.events_seen > n - n // 2  # the replay itself, counted as such and nothing else
    outcome = lambda o: second.registry.get_sample_value("anomalyd_events_total",  # noqa: E731
                                                         {"topic": topic_name, "outcome": o})
    assert outcome("replayed") == second.events_seen - (n - n // 2) and outcome("warming") == 0


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
def test_a_stream_gone_silent_is_forgotten_by_the_running_daemon(kafka_bootstrap, topic_name, models, tmp_path,
                                                                 background):
    import json

    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    _produce_clean(kafka_bootstrap, topic_name, 40)  # every stream
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, processing={
        "max_delay_ms": 20, "max_batch_windows": 512, "score_in_background": background,
        "stream_idle_timeout_s": 4})  # the others send every 0.2 s
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    done = threading.Thread(target=daemon.run, kwargs={"timeout": 60})
    done.start()
    f = fleet()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(daemon.routes[0].stream_index) < N_STREAMS:
            time.sleep(0.1)
        assert len(daemon.routes[0].stream_index) == N_STREAMS
        producer = make_producer("kafka-python", kafka_bootstrap)
        try:  # pump-0 falls silent; the others keep sending
            while time.monotonic() < deadline and "pump-0" in daemon.routes[0].stream_index:
                for name in f.names[1:]:
                    producer.produce(topic_name, json.dumps({"stream": name, "ts": int(time.time() * 1000),
                                                             "values": [0.0] * 4}).encode())
                producer.flush(10)
                time.sleep(0.2)
        finally:
            producer.close()
        kept = set(daemon.routes[0].stream_index)  # before the stop, whose revoke forgets every stream
    finally:
        daemon.request_stop()
        done.join(timeout=30)
    assert kept == set(f.names[1:])


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_replica_beyond_the_partition_count_is_ready_and_idle(kafka_bootstrap, topic_name, models, tmp_path,
                                                               client):
    """Readiness is models loaded and the group joined: an idle replica (no partition) must not look unready, or a
    PodDisruptionBudget and a rolling update wait on it for ever."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    daemons = [Daemon(load_config(write_config(tmp_path / f"c{i}.yaml", cfg))) for i in range(2)]
    threads = [threading.Thread(target=d.run, kwargs={"timeout": 60}) for d in daemons]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not (all(d.is_ready() for d in daemons)
                                                   and sum(len(d.positions.assigned) for d in daemons) == 1):
            time.sleep(0.2)
        assert sorted(len(d.positions.assigned) for d in daemons) == [0, 1]
        assert all(d.is_ready() for d in daemons)
    finally:
        for d in daemons:
            d.request_stop()
        for t in threads:
            t.join(timeout=30)


def _delete_records_before(bootstrap: str, topic: str, offset: int) -> None:
    """Move partition 0's log start to ``offset``, as retention does (confluent-kafka's admin client)."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, offset)], request_timeout=30).values():
        future.result(timeout=30)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_restart_after_retention_removed_the_rebuild_floor_resumes_at_the_commit(kafka_bootstrap, topic_name,
                                                                                 models, tmp_path, client):
    """The commit's rebuild floor is gone (retention): the replay starts at the log start instead. Seeking to the
    floor itself would reset the position by auto_offset_reset, and with ``latest`` skip every uncommitted record."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    n = _produce_clean(kafka_bootstrap, topic_name, 100)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client, kafka__poll_max_records=50)
    first = Daemon(load_config(write_config(tmp_path / "c1.yaml", cfg)))
    assert first.run(count=n // 2, timeout=60) == 0
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {0: n // 2}
    _delete_records_before(kafka_bootstrap, topic_name, n // 2 - 10)  # inside the windows' floor, below the commit
    cfg["kafka"]["auto_offset_reset"] = "latest"
    second = Daemon(load_config(write_config(tmp_path / "c2.yaml", cfg)))
    assert second.run(count=n - n // 2 + 10, timeout=60) == 0
    assert second.events_seen == n - n // 2 + 10  # the 10 retained below the commit, then every uncommitted one
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {0: n}


def test_new_model_version_is_swapped_in_without_dropping_events(kafka_bootstrap, topic_name, models, tmp_path):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    store = ModelStore(models_dir)
    old_version = store.resolve(names[0])
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, f"g-{topic_name}", f"{topic_name}-alerts")
    cfg["models"]["watch_interval_s"] = 0.2
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    runner = threading.Thread(target=daemon.run, kwargs={"timeout": 90})
    runner.start()
    n = 200 * N_STREAMS
    new_path = None
    try:
        deadline = time.monotonic() + 60
        while not daemon.is_ready():
            assert runner.is_alive() and time.monotonic() < deadline, "the daemon did not become ready"
            time.sleep(0.1)
        producer = threading.Thread(target=_produce_clean, args=(kafka_bootstrap, topic_name, 200, 100.0))
        producer.start()
        # the old version has scored some of the stream, and some of it is still to come
        deadline = time.monotonic() + 60
        while not (_scored(daemon, topic_name) > 0 and 0 < daemon.events_seen < n):
            assert daemon.events_seen < n, "every event was consumed before the old version scored any"
            assert runner.is_alive() and time.monotonic() < deadline, "the old version scored nothing"
            time.sleep(0.02)
        seen_before = daemon.events_seen
        new_path = store.save(names[0], store.load(names[0]).detector)  # a new version appears mid-stream
        deadline = time.monotonic() + 60
        while daemon.models.loaded[names[0]].version != new_path.name:
            assert runner.is_alive() and time.monotonic() < deadline, "the new version was not swapped in"
            time.sleep(0.02)
        seen_at_swap = daemon.events_seen
        print(f"events seen: {seen_before} when the new version was saved, {seen_at_swap} when it was in, of {n}")
        producer.join(timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and committed_offsets(kafka_bootstrap, f"g-{topic_name}",
                                                                topic_name) != {0: n}:
            time.sleep(0.3)
        daemon.request_stop()
        runner.join(timeout=60)
        info = {s.labels["version"] for m in daemon.registry.collect() for s in m.samples
                if s.name == "anomalyd_model_info" and s.labels["model"] == names[0]}
        assert info == {new_path.name} and new_path.name != old_version
        assert daemon.models.loaded[names[0]].version == new_path.name
        # events scored by both versions: some before the new one was saved, some after it was swapped in
        assert 0 < seen_before <= seen_at_swap < n, (seen_before, seen_at_swap, n)
        assert _scored(daemon, topic_name) == n - N_STREAMS * (WINDOW - 1)  # nothing dropped across the swap
    finally:  # on a failed assert too: no daemon left running, and the session-shared store as it was
        daemon.request_stop()
        runner.join(timeout=60)
        if new_path is not None:
            new_path.rename(new_path.parent / f".removed-{new_path.name}")


def test_alertmanager_receives_firing_then_resolved_from_the_daemon(kafka_bootstrap, topic_name, models, tmp_path,
                                                                    alertmanager):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    run = uuid.uuid4().hex[:12]
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, f"g-{topic_name}", f"{topic_name}-alerts")
    cfg["sinks"]["alertmanager"] = {"enabled": True, "url": alertmanager.url, "labels": {"test_run": run}}
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    runner = threading.Thread(target=daemon.run, kwargs={"timeout": 120})
    runner.start()
    holder = {}
    producer = threading.Thread(target=lambda: holder.update(r=produce_with_anomalies(
        kafka_bootstrap, topic_name, 200, ("level_shift",), rate=200.0)))
    producer.start()
    seen_active: set[str] = set()
    poll_errors: list[Exception] = []
    done = threading.Event()

    def watch_alertmanager() -> None:
        """Alertmanager's active alerts of this run, until the daemon has committed every event: it may post the
        firing alert (and resolve it) well after production ended, when it is behind."""
        while not done.is_set():
            try:
                for a in alertmanager.alerts():
                    if a["labels"].get("test_run") == run and a["status"]["state"] == "active":
                        seen_active.add(a["annotations"]["alert_id"])
            except OSError as exc:
                poll_errors.append(exc)
                return
            done.wait(0.1)

    watcher = threading.Thread(target=watch_alertmanager, daemon=True)
    watcher.start()
    try:
        producer.join(timeout=120)
        assert not producer.is_alive(), "production did not end"
        n = holder["r"][1]
        deadline = time.monotonic() + 120  # every alert is posted before its events' offsets are committed
        while time.monotonic() < deadline and committed_offsets(kafka_bootstrap, f"g-{topic_name}",
                                                                topic_name) != {0: n}:
            assert watcher.is_alive(), poll_errors
            time.sleep(0.3)
    finally:
        done.set()
        watcher.join(timeout=30)
        daemon.request_stop()
        runner.join(timeout=30)
    assert not poll_errors, poll_errors
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == {0: n}
    alerts = read_alerts(kafka_bootstrap, f"{topic_name}-alerts")
    firing = [a["id"] for a in alerts if a["status"] == "firing" and a["stream"] == holder["r"][0][0]["stream"]]
    resolved = [a["id"] for a in alerts if a["status"] == "resolved"]
    assert firing and firing[0] in resolved  # the incident fired, then resolved
    assert firing[0] in seen_active, alertmanager.log_tail()  # Alertmanager held it as active ...
    still = [a for a in alertmanager.alerts() if a["annotations"].get("alert_id") == firing[0]]
    assert not still, still  # ... and then resolved


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
def test_an_open_incident_stays_active_in_alertmanager_while_the_topic_is_quiet(kafka_bootstrap, topic_name, models,
                                                                                tmp_path, alertmanager, background):
    """A firing alert's endsAt is 4 re-post intervals ahead and the re-posts came only with a flush, which a quiet
    topic did not bring: Alertmanager resolved the incident while the daemon held it open (and it fired again
    when data came back). The daemon now flushes the sinks for their re-posts."""
    from datetime import UTC, datetime, timedelta

    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    run = uuid.uuid4().hex[:12]
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, f"g-{topic_name}", f"{topic_name}-alerts",
                      processing__score_in_background=background)
    cfg["sinks"]["alertmanager"] = {"enabled": True, "url": alertmanager.url, "labels": {"test_run": run},
                                    "resend_interval_s": 1}  # endsAt 4 s ahead
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    runner = threading.Thread(target=daemon.run, kwargs={"timeout": 120})
    runner.start()
    try:
        # ending inside the anomaly (steps 100-125): the incident stays open, and then nothing more comes
        produce_with_anomalies(kafka_bootstrap, topic_name, 200, ("level_shift",), first_steps=118)

        def ours() -> list[dict]:
            return [a for a in alertmanager.alerts() if a["labels"].get("test_run") == run]

        deadline = time.monotonic() + 90
        while not ours():
            assert runner.is_alive() and time.monotonic() < deadline, "no alert reached Alertmanager"
            time.sleep(0.2)
        first_end = datetime.fromisoformat(ours()[0]["endsAt"])
        # the topic quiet: active at every look, past twice the endsAt margin (without a re-post it would resolve
        # at first_end), until a re-post has moved endsAt on by 5 s
        deadline = time.monotonic() + 60
        while True:
            held = ours()
            assert [a["status"]["state"] for a in held] == ["active"], alertmanager.log_tail()
            moved = (datetime.fromisoformat(held[0]["endsAt"]) - first_end).total_seconds()
            if moved >= 5 and datetime.now(UTC) >= first_end + timedelta(seconds=4):
                break
            assert runner.is_alive() and time.monotonic() < deadline, f"endsAt moved {moved} s, not re-posted"
            time.sleep(0.2)
    finally:
        daemon.request_stop()
        runner.join(timeout=30)


def test_train_selects_by_event_time_when_events_run_ahead_of_the_broker_clock(kafka_bootstrap, topic_name,
                                                                                tmp_path):
    """As ``anomalyd produce`` does: event time 100x faster than the broker's clock. Seeking by the broker's
    timestamps to --from-ms skipped every event produced before the broker's clock reached it. Also: feature
    names come from the streams trained on, and a stream too short to train on is left out, not fatal."""
    import json

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    f = fleet()
    data, _ = f.live(HISTORY, 300, [])  # (streams, steps, F)
    t0 = int(time.time() * 1000)
    producer = make_producer("kafka-python", kafka_bootstrap)
    try:
        producer.produce(topic_name, json.dumps({"stream": "fan-1", "ts": t0, "values": {"rpm": 1.0}}).encode())
        for step in range(300):
            for s, name in enumerate(f.names):
                producer.produce(topic_name, json.dumps({"stream": name, "ts": t0 + step * 1000, "values": dict(
                    zip(f.feature_names, data[s, step].tolist(), strict=True))}).encode())
            producer.flush(10)
            time.sleep(0.01)  # about 10 ms of broker time per 1,000 ms of event time
        for step in range(295, 300):  # a stream that began just before the end: too short, left out
            producer.produce(topic_name, json.dumps({"stream": "pump-late", "ts": t0 + step * 1000, "values": dict(
                zip(f.feature_names, data[0, step].tolist(), strict=True))}).encode())
        producer.flush(10)
    finally:
        producer.close()
    code = cli_main(["train", "--kafka-topic", topic_name, "--bootstrap", kafka_bootstrap, "--from-ms", str(t0 + 2000),
                     "--streams", "pump-*",  # the first message, fan-1's, has other features
                     "--name", "m", "--models-dir", str(tmp_path), "--kind", "gru", "--window", "8", "--hidden", "8",
                     "--epochs", "1", "--threshold", "quantile", "--device", "cpu"])
    assert code == 0
    summary = ModelStore(tmp_path).load("m").detector.summary
    assert summary["n_series"] == N_STREAMS
    assert summary["n_train_rows"] + summary["n_val_rows"] == N_STREAMS * 298  # steps 2..299 of every stream


def test_train_from_a_kafka_topic_time_range(kafka_bootstrap, topic_name, tmp_path):
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    _produce_clean(kafka_bootstrap, topic_name, 300)
    t0 = int(time.time() * 1000) - (HISTORY + 300) * INTERVAL_MS
    code = cli_main(["train", "--kafka-topic", topic_name, "--bootstrap", kafka_bootstrap, "--streams", "pump-*",
                     "--from-ms", str(t0 + (HISTORY + 10) * INTERVAL_MS - 60_000), "--name", "from-kafka",
                     "--models-dir", str(tmp_path), "--kind", "lstm", "--window", "8", "--hidden", "8",
                     "--epochs", "2", "--threshold", "quantile", "--device", "cpu"])
    assert code == 0
    loaded = ModelStore(tmp_path).load("from-kafka")
    assert loaded.detector.kind == "lstm" and loaded.detector.feature_names == fleet().feature_names
    assert loaded.detector.summary["n_series"] == N_STREAMS
    assert end_offsets(kafka_bootstrap, topic_name)  # the topic really held the data


def test_train_goes_on_from_the_log_start_when_records_are_deleted_while_it_reads(kafka_bootstrap, topic_name,
                                                                                   monkeypatch, capsys):
    """Retention deleting the records being read: the next fetch is out of range, and the consumer, on kafka-python's
    default auto_offset_reset='latest', jumped to the partition's end, training on what it had read so far without a
    word. Now it goes on from the new log start and says how many offsets it skipped."""
    import json

    from kafka import KafkaAdminClient, TopicPartition

    from pipelines import train_topic

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    t0, n, cut = int(time.time() * 1000), 3000, 2500  # 1 KiB messages: a fetch (1 MiB a partition) takes ~1000
    producer = make_producer("kafka-python", kafka_bootstrap)
    try:
        for i in range(n):
            producer.produce(topic_name, json.dumps({"stream": "p-1", "ts": t0 + i, "values": {"a": i},
                                                     "pad": "x" * 1000}).encode())
        producer.flush(30)
    finally:
        producer.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    add, polls = train_topic._Selection.add, []

    def add_then_delete(self, records):
        if not polls:  # after the first poll: the log start moves to `cut`, past what the read has fetched
            assert len(records) < cut
            admin.delete_records({TopicPartition(topic_name, 0): cut})
        polls.append(len(records))
        add(self, records)

    monkeypatch.setattr(train_topic._Selection, "add", add_then_delete)
    try:
        series, names = train_topic.read_topic_series(kafka_bootstrap, topic_name, None, None, "*", None, timeout_s=20)
    finally:
        admin.close()
    read = series[0][:, 0].astype(int).tolist()
    assert names == ["a"] and read[-1] == n - 1 and read[-(n - cut):] == list(range(cut, n))
    skipped = n - len(read)
    assert skipped > 0
    assert (f"warning: partition 0 of {topic_name!r}: the read skipped {skipped} offsets whose records it never got"
            in capsys.readouterr().out)
