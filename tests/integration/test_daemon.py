"""The daemon against a real Kafka broker: detection end to end, bad input, crash, rebalance, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipelines import native_decode
from pipelines.child_process import exit_with_parent
from pipelines.config import load_config
from pipelines.daemon import Daemon
from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from pipelines.scoring_threads import ScoringThreads
from pipelines.source import make_source
from tests.needs import unavailable

from .daemon_support import (
    SLACK_MS,
    WINDOW,
    committed_offsets,
    config_dict,
    end_offsets,
    firing_per_anomaly,
    produce_with_anomalies,
    read_alerts,
    read_topic,
    write_config,
)

KINDS = ("spike", "level_shift", "correlation")
ASSIGNED = r"partitions assigned: \[\("  # the daemon's log once it has partitions
FALSE_ALARM_BUDGET = 1  # firing alerts per run not explained by an injected anomaly


@pytest.fixture
def models(daemon_models):
    return daemon_models


def _start(cmd_cfg, log_path=None) -> subprocess.Popen:
    """``anomalyd run`` in a child process, its log in ``log_path`` (default: beside the config)."""
    log_path = log_path or cmd_cfg.with_suffix(f".{time.monotonic_ns()}.log")
    out = open(log_path, "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--log-level", "INFO", "run", "-c", str(cmd_cfg)],
                            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                            preexec_fn=exit_with_parent(signal.SIGKILL))
    proc.log_path = log_path
    return proc


def _log(proc) -> str:
    return proc.log_path.read_text(errors="replace")


def _wait_log(proc, pattern: str, timeout_s: float = 180) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, _log(proc)):
            return True
        time.sleep(0.2)
    return False


def _wait_committed(bootstrap, group, topic, target: dict[int, int], timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    got = {}
    while time.monotonic() < deadline:
        got = committed_offsets(bootstrap, group, topic)
        if all(got.get(p, -1) >= off for p, off in target.items()):
            return got
        time.sleep(0.5)
    return got


def _check_detection(truth, alerts):
    per = firing_per_anomaly(truth, alerts, SLACK_MS)
    for t, hits in zip(truth, per, strict=True):
        assert len(hits) == 1, f"{t['kind']} on {t['stream']}: {len(hits)} distinct firing alerts"
    explained = {a["id"] for hits in per for a in hits}
    other = {a["id"] for a in alerts if a["status"] == "firing"} - explained
    assert len(other) <= FALSE_ALARM_BUDGET, f"{len(other)} false alarms"


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_end_to_end_every_anomaly_alerted_once(kafka_bootstrap, topic_name, models, tmp_path, client, background):
    if native_decode.load() is None:  # built on CI: the counts below are the native decoder's
        why = native_decode._STATE.get("error") or f"ANOMALYD_NATIVE_DECODE={native_decode.mode()}"
        unavailable(f"native JSON decoder unavailable: {why}")
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    # polls of 100: most come back full, so confluent's next poll runs ahead (kafka.poll_ahead) as each is processed
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client, kafka__poll_max_records=100)
    cfg["processing"]["score_in_background"] = background
    truth, n = produce_with_anomalies(kafka_bootstrap, topic_name, 300, KINDS)
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=n, timeout=120) == 0
    alerts = read_alerts(kafka_bootstrap, f"{topic_name}-alerts")
    _check_detection(truth, alerts)
    for a in alerts:
        assert a["model"] == "+".join(names) and a["top_features"] and a["source"]["topic"] == topic_name
    assert committed_offsets(kafka_bootstrap, f"g-{topic_name}", topic_name) == end_offsets(kafka_bootstrap, topic_name)
    reg = daemon.registry
    assert reg.get_sample_value("anomalyd_alerts_total", {"model": "+".join(names), "status": "firing"}) >= 3
    assert reg.get_sample_value("anomalyd_events_total", {"topic": topic_name, "outcome": "scored"}) > 0
    # anomalyd produce's shape: every message decoded natively, none left to the Python decoder
    assert reg.get_sample_value("anomalyd_decoded_messages_total", {"decoder": "native"}) == n
    assert reg.get_sample_value("anomalyd_decoded_messages_total", {"decoder": "python"}) == 0


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_commits_are_spaced_while_busy_and_complete_at_the_end(kafka_bootstrap, topic_name, models, tmp_path,
                                                               client):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 720, KINDS[:1])
    commits = {}
    for interval in (0, 600_000):
        group = f"g-{interval}-{topic_name}"
        # the topic counts as idle (a commit) after a whole kafka.poll_timeout_ms without a record: 5 s, so that a
        # slow broker on a busy machine, which leaves a poll of the pre-filled topic empty now and then, does not
        # add idle commits to the count below
        cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, group=group, client=client,
                          kafka__poll_max_records=32, kafka__commit_interval_ms=interval, kafka__poll_timeout_ms=5000,
                          processing={"max_delay_ms": 0, "max_batch_windows": 16})
        daemon = Daemon(load_config(write_config(tmp_path / f"c{interval}.yaml", cfg)))
        assert daemon.run(count=n, timeout=120) == 0
        assert committed_offsets(kafka_bootstrap, group, topic_name) == end_offsets(kafka_bootstrap, topic_name)
        commits[interval] = daemon.registry.get_sample_value("anomalyd_commit_seconds_count")
    print(f"{client}: commits with kafka.commit_interval_ms 0 / 600000: {commits[0]:g} / {commits[600_000]:g}")
    # interval 0: a commit after every micro-batch whose previous commit was answered (one is in flight at a
    # time: pipelines/commits.py), many over the run's 90 micro-batches
    assert commits[0] >= 8, commits
    # busy: only the first micro-batch and shutdown (and one more should the topic look idle for 5 s)
    assert commits[600_000] <= 3 and commits[600_000] < commits[0], commits


def test_poll_waits_no_longer_than_the_oldest_pending_window_may(kafka_bootstrap, topic_name, models, tmp_path):
    """A long kafka.poll_timeout_ms must not hold a due micro-batch back: while windows are pending, each poll
    waits at most what is left of processing.max_delay_ms."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 120, KINDS[:1])
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, kafka__poll_max_records=32,
                      kafka__poll_timeout_ms=10_000, processing={"max_delay_ms": 40, "max_batch_windows": 4096})
    polls: list[tuple[int, bool]] = []  # (timeout_ms, windows pending when poll was called)

    def source_factory(**kwargs):
        source = make_source(**kwargs)
        real_poll = source.poll

        def poll(max_records, timeout_ms):
            polls.append((timeout_ms, daemon._oldest_pending is not None))
            return real_poll(max_records, timeout_ms)

        source.poll = poll
        return source

    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)), source_factory=source_factory)
    assert daemon.run(count=n, timeout=120) == 0
    pending = [t for t, p in polls if p]
    assert pending and max(pending) <= 40, polls
    assert 10_000 in [t for t, p in polls if not p]  # nothing pending: the configured timeout


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_bad_input_goes_to_dead_letter_topic(kafka_bootstrap, topic_name, models, tmp_path, client):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    good = [{"stream": "pump-0", "ts": 1764180000000 + i * 1000, "values": [0.1, 0.2, 0.3, 0.4]} for i in range(40)]
    bad = [b"{not json", b"[1,2]", json.dumps({"ts": 5, "values": [1, 2, 3, 4]}).encode(),
           json.dumps({"stream": "pump-1", "values": ["a", 2, 3, 4]}).encode(),
           json.dumps({"stream": "pump-1", "values": {"nope": 1.0}}).encode(),
           b'{"stream": "pump-1", "values": [NaN, 1, 2, 3]}', b"\xff\xfe", b"x" * 70000]
    producer = make_producer("kafka-python", kafka_bootstrap, max_request_size=200000)
    for i, msg in enumerate(good):
        producer.produce(topic_name, json.dumps(msg).encode())
        if i < len(bad):
            producer.produce(topic_name, bad[i], headers=[("trace-id", b"t-%d" % i)] if i % 2 else None)
    producer.flush(30)
    producer.close()
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=len(good) + len(bad), timeout=60) == 0
    dlq = read_topic(kafka_bootstrap, f"{topic_name}-dlq")
    assert sorted(r.value for r in dlq) == sorted(bad)
    for r in dlq:  # the original's headers come first, then anomalyd's
        i = bad.index(r.value)
        assert [k for k, _ in r.headers][: 2 if i % 2 else 1] == (["trace-id"] if i % 2 else []) + [
            "anomalyd-error-reason"], r.headers
        assert dict(r.headers).get("trace-id") == (b"t-%d" % i if i % 2 else None)
    reasons = {dict(r.headers)["anomalyd-error-reason"].decode() for r in dlq}
    assert {"bad_json", "not_an_object", "missing_stream", "bad_value_type", "unknown_feature", "non_finite",
            "bad_encoding", "oversized"} <= reasons
    scored = daemon.registry.get_sample_value("anomalyd_events_total", {"topic": topic_name, "outcome": "scored"})
    assert scored == len(good) - WINDOW + 1


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_bad_message_with_a_null_header_is_dead_lettered_not_a_crash(kafka_bootstrap, topic_name, models, tmp_path,
                                                                       client):
    """Kafka headers may have no value; kafka-python's consumer gives it as None, which its producer refuses: the
    dead letter failed, and the daemon stopped (exit 1) on that record after every restart."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    producer = make_producer("confluent", kafka_bootstrap)  # kafka-python's producer cannot send a null header
    producer.produce(topic_name, b"{not json", headers=[("tenant", None), ("trace-id", b"t-1")])
    producer.flush(30)
    producer.close()
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=1, timeout=60) == 0
    [dead] = read_topic(kafka_bootstrap, f"{topic_name}-dlq")
    assert dead.value == b"{not json"
    assert [(k, v or b"") for k, v in dead.headers][:3] == [("tenant", b""), ("trace-id", b"t-1"),
                                                            ("anomalyd-error-reason", b"bad_json")]


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_message_too_large_for_the_producer_is_dead_lettered_cut_not_a_crash(kafka_bootstrap, topic_name, models,
                                                                               tmp_path, client):
    """A 1.5 MB message on a topic that allows it is oversized for the daemon and too large for a dead letter
    (the producers' 1 MB limit): the dead letter carries its first 900,000 bytes and its size, and the daemon
    goes on (it used to stop, and stop again on the same record after every restart)."""
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=1, config={"max.message.bytes": "3000000"})
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    good = [json.dumps({"stream": "pump-0", "ts": 1764180000000 + i * 1000, "values": [0.1, 0.2, 0.3, 0.4]}).encode()
            for i in range(20)]
    huge = b'{"stream": "pump-1", "pad": "' + b"x" * 1_500_000 + b'"}'
    producer = make_producer("kafka-python", kafka_bootstrap, max_request_size=3_000_000)
    for msg in [*good[:10], huge, *good[10:]]:
        producer.produce(topic_name, msg, key=b"k" * 20_000 if msg is huge else None)
    producer.flush(30)
    producer.close()
    daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
    assert daemon.run(count=len(good) + 1, timeout=60) == 0
    [dead] = read_topic(kafka_bootstrap, f"{topic_name}-dlq")
    headers = dict(dead.headers)
    assert headers["anomalyd-error-reason"] == b"oversized"
    assert dead.value == huge[:900_000] and headers["anomalyd-original-value-bytes"] == str(len(huge)).encode()
    assert dead.key == b"k" * 16_384 and headers["anomalyd-original-key-bytes"] == b"20000"
    assert headers["anomalyd-source-offset"] == b"10"
    [source] = [r for r in read_topic(kafka_bootstrap, topic_name) if r.offset == 10]  # the record's own time
    assert source.timestamp > 0 and headers["anomalyd-source-timestamp"] == str(source.timestamp).encode()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_sigterm_exits_zero_with_offsets_committed(kafka_bootstrap, topic_name, models, tmp_path, client):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    group = f"g-{topic_name}"
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    _, n = produce_with_anomalies(kafka_bootstrap, topic_name, 200, KINDS[:1])
    proc = _start(write_config(tmp_path / "c.yaml", cfg))
    try:
        ends = end_offsets(kafka_bootstrap, topic_name)
        got = _wait_committed(kafka_bootstrap, group, topic_name, ends, 180)
        assert got == ends, _log(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert committed_offsets(kafka_bootstrap, group, topic_name) == ends


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_kill_9_and_restart_misses_no_anomaly(kafka_bootstrap, topic_name, models, tmp_path, client, background):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    group = f"g-{topic_name}"
    alerts_topic = f"{topic_name}-alerts"
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client, kafka__poll_max_records=50,
                      processing={"max_delay_ms": 20, "max_batch_windows": 64, "score_in_background": background})
    # polls of 50: the restart catches up in full polls, so confluent polls ahead while it rebuilds and scores
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    proc = _start(cfg_path)
    # traffic only once the daemon has its partitions (a slow start on a busy machine must not let it all arrive
    # before the first commit): ~12 s of it, so the kill lands mid-stream
    assert _wait_log(proc, ASSIGNED), _log(proc)
    assert "fast paths: models on cpu in float32; fused CPU kernels" in _log(proc)  # logged at start
    holder = {}
    producer = threading.Thread(target=lambda: holder.update(r=produce_with_anomalies(
        kafka_bootstrap, topic_name, 300, KINDS, rate=100.0)))
    producer.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(committed_offsets(kafka_bootstrap, group, topic_name).values()):
        time.sleep(0.2)
    proc.kill()  # SIGKILL mid-stream: no flush, no commit
    proc.wait(timeout=10)
    producer.join(timeout=60)
    assert not producer.is_alive(), "production did not end"
    truth, n = holder["r"]
    at_kill = committed_offsets(kafka_bootstrap, group, topic_name)  # a dead member commits nothing more
    assert 0 < sum(at_kill.values()) < n, (at_kill, n, _log(proc))  # killed mid-stream: the restart resumes there
    proc = _start(cfg_path)
    try:
        ends = end_offsets(kafka_bootstrap, topic_name)
        assert _wait_log(proc, ASSIGNED), _log(proc)
        assert _wait_committed(kafka_bootstrap, group, topic_name, ends, 180) == ends, _log(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, _log(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    alerts = read_alerts(kafka_bootstrap, alerts_topic)
    per = firing_per_anomaly(truth, alerts, SLACK_MS)
    assert all(hits for hits in per), [t["kind"] for t, h in zip(truth, per, strict=True) if not h]


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_rebalance_two_members_share_partitions(kafka_bootstrap, topic_name, models, tmp_path, client):
    models_dir, names = models
    create_topic(kafka_bootstrap, topic_name, partitions=4)
    group = f"g-{topic_name}"
    alerts_topic = f"{topic_name}-alerts"
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names, client=client)
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    a = _start(cfg_path)
    try:
        assert _wait_log(a, r"partitions assigned: \[\("), _log(a)
        b = _start(cfg_path)
        assert _wait_log(b, r"partitions assigned: \[\("), _log(b)  # the group now spans both members
        truth, _ = produce_with_anomalies(kafka_bootstrap, topic_name, 300, KINDS)
        ends = end_offsets(kafka_bootstrap, topic_name)
        half = {p: off // 2 for p, off in ends.items()}
        got = _wait_committed(kafka_bootstrap, group, topic_name, half, 180)
        # every partition half done, b's too, before b is stopped: both members processed their share
        assert all(got.get(p, -1) >= off for p, off in half.items()), (got, half, _log(a), _log(b))
        b.send_signal(signal.SIGTERM)  # hands its partitions over to a
        assert b.wait(timeout=30) == 0
        assert _wait_committed(kafka_bootstrap, group, topic_name, ends, 180) == ends
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=30) == 0
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
    # after b left, a was assigned all four partitions (b's handed over)
    assert re.search(r"partitions assigned: \[(\('[^']+', \d\)(, )?){4}\]", _log(a)), _log(a)
    alerts = read_alerts(kafka_bootstrap, alerts_topic)
    per = firing_per_anomaly(truth, alerts, SLACK_MS)
    assert all(hits for hits in per), [t["kind"] for t, h in zip(truth, per, strict=True) if not h]


@pytest.mark.parametrize(("model_threads", "background", "adaptive"),
                         [(0, True, True), (1, True, False), (3, True, False), (0, False, False)])
def test_inference_threads_adapt_only_when_left_to_the_daemon(models, tmp_path, monkeypatch, model_threads, background,
                                                              adaptive):
    """model_threads 0 with the scoring thread: 1 to every CPU, as busy as the thread is; else fixed."""
    import torch

    models_dir, names = models
    monkeypatch.setattr("pipelines.scoring_threads.inference_threads", lambda requested: requested or 4)  # 4 CPUs
    cfg = config_dict("localhost:9", "t", models_dir, names)  # nothing connects before run()
    cfg["processing"].update(model_threads=model_threads, score_in_background=background)
    before = torch.get_num_threads()
    try:
        daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
        fixed = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert (daemon.scoring_threads is not None) == adaptive
    assert fixed == (model_threads or 4)  # the loop thread's own count (serial flushes at shutdown, rebalances)
    gauge = daemon.registry.get_sample_value("anomalyd_inference_threads")
    if adaptive:
        assert daemon.scoring_threads.most == 4 and daemon.scoring_threads.threads == 1 and gauge == 1
    else:
        assert gauge == fixed


def test_a_loop_waiting_for_the_scoring_thread_gives_it_every_thread(kafka_bootstrap, topic_name, models, tmp_path,
                                                                      monkeypatch):
    """The adaptive count end to end: a model that needs 20 ms more per micro-batch (as a larger one would),
    polls of 20 records and micro-batches due at 8 windows, so the loop waits for the scoring thread; that thread
    goes from 1 intra-op thread to all of them (here 2), and the gauge follows. Detection does not depend on it."""
    import torch

    models_dir, names = models
    monkeypatch.setattr("pipelines.scoring_threads.inference_threads", lambda requested: requested or 2)
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names)
    cfg["processing"].update(max_batch_windows=8, model_threads=0, score_in_background=True)
    cfg["kafka"]["poll_max_records"] = 20  # many small micro-batches
    truth, n = produce_with_anomalies(kafka_bootstrap, topic_name, 300, KINDS)
    before = torch.get_num_threads()
    try:
        daemon = Daemon(load_config(write_config(tmp_path / "c.yaml", cfg)))
        assert daemon.scoring_threads.most == 2 and daemon.registry.get_sample_value("anomalyd_inference_threads") == 1
        changes = []

        def changed(k: int) -> None:
            changes.append(k)
            daemon.metrics.inference_threads.set(k)

        daemon.scoring_threads = ScoringThreads(2, period_s=0.05, on_change=changed)  # decisions every 50 ms
        score = daemon.engine.score

        def slower_score(*args, **kwargs):
            time.sleep(0.02)
            return score(*args, **kwargs)

        monkeypatch.setattr(daemon.engine, "score", slower_score)
        assert daemon.run(count=n, timeout=120) == 0
    finally:
        torch.set_num_threads(before)
    assert changes[:1] == [2], changes
    assert daemon.registry.get_sample_value("anomalyd_inference_threads") == changes[-1]
    _check_detection(truth, read_alerts(kafka_bootstrap, f"{topic_name}-alerts"))
