"""The last flush before partitions go (the shutdown, a revoke) tries delivery again at once and commits what it
delivered, also after a micro-batch on the scoring thread (processing.score_in_background) failed to deliver."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from detector.synthetic import SensorModel
from pipelines.kafka_io import KafkaDeliveryError
from pipelines.scoring_worker import ScoringWorker
from pipelines.sinks import FanoutSink, Sink, SinkError
from pipelines.source import RecordBatch
from tests.test_pipeline_units import _gru_daemon

TP = ("t", 0)
EVENTS = 200


class _OutageSink(Sink):
    """Fails its first ``fail`` flushes that have alerts (a short outage), then delivers."""

    name = "outage"

    def __init__(self, fail: int) -> None:
        self.fail, self.queued, self.delivered, self.flushes = fail, [], [], 0

    def add(self, alerts) -> None:
        self.queued.extend(alerts)

    def flush(self, timeout_s: float) -> int:
        self.flushes += 1
        if self.queued and self.fail > 0:
            self.fail -= 1
            raise SinkError("outage: connection refused")
        n, self.delivered, self.queued = len(self.queued), self.delivered + self.queued, []
        return n


class _Client:
    """The Kafka consumer as the committer and the rebalance see it: nothing committed yet; records commits."""

    def __init__(self) -> None:
        self.commits: list[dict] = []
        self.rebalance_commits: list[dict] = []

    def committed(self, tps):
        return dict.fromkeys(tps)

    def first_offsets(self, tps):
        return dict.fromkeys(tps, 0)

    def seek(self, tp, offset) -> None:
        pass

    def commit(self, offsets, timeout_s=None) -> None:
        self.commits.append(dict(offsets))

    def commit_async(self, offsets, done) -> None:
        self.commits.append(dict(offsets))
        done(None)

    rebalance_commit_answered_later = False  # synchronous, as confluent-kafka's

    def commit_in_rebalance(self, offsets, answered) -> None:
        self.rebalance_commits.append(dict(offsets))


def _level_shift() -> RecordBatch:
    """One stream's records: normal, then a level shift that fires an alert."""
    t0 = int(time.time() * 1000) - EVENTS * 1000
    X = SensorModel(4, seed=1).normal(np.arange(EVENTS, dtype=np.float64))
    X[150:, 2] += 8 * X[:, 2].std()
    values = [json.dumps({"stream": "pump-1", "ts": t0 + i * 1000, "values": row.tolist()}).encode()
              for i, row in enumerate(X)]
    return RecordBatch(topic=["t"] * EVENTS, partition=np.zeros(EVENTS, np.int32),
                       offset=np.arange(EVENTS, dtype=np.int64), timestamp=np.zeros(EVENTS, np.int64),
                       key=[None] * EVENTS, value=values)


def _micro_batch_in_flight(daemon, sink: Sink) -> _Client:
    """``daemon`` (scoring in the background, max_delay_ms 0) with a level shift's micro-batch on its scoring
    thread, delivering to ``sink``; returns its client."""
    client = _Client()
    daemon.sinks = FanoutSink([sink])
    daemon.source = daemon.commits.source = client
    daemon._worker = ScoringWorker()
    daemon._on_assign([TP])
    daemon.positions.position_new(client, RecordBatch.empty())
    daemon.process(_level_shift())
    daemon._maybe_flush(quiet=False, now=time.monotonic())  # the micro-batch goes to the scoring thread
    assert daemon._worker.busy
    return client


def _failed_micro_batch(trained, tmp_path, background: bool):
    """A daemon whose micro-batch failed to deliver its alerts (kept in the sink) while the loop went on."""
    daemon = _gru_daemon(trained, tmp_path, processing={"score_in_background": background},
                         alerts={"k": 1, "n": 1})
    sink, client = _OutageSink(fail=1), _Client()
    daemon.sinks = FanoutSink([sink])
    daemon.source = daemon.commits.source = client
    daemon._worker = ScoringWorker() if background else None
    daemon._on_assign([TP])
    daemon.positions.position_new(client, RecordBatch.empty())
    daemon.process(_level_shift())
    if background:  # the scoring thread's flush fails; the loop has not yet taken its outcome
        daemon._flush_in_background(10.0, commit=True, windows=sum(r.pending_windows for r in daemon.routes))
        deadline = time.monotonic() + 30
        while not daemon._worker.done() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        with pytest.raises(SinkError):
            daemon._flush_and_commit(timeout_s=10.0)
    assert sink.flushes == 1 and sink.queued and not client.commits  # kept, to be tried again
    return daemon, sink, client


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
def test_the_shutdown_delivers_what_a_failed_micro_batch_kept_and_commits(trained, tmp_path, background):
    daemon, sink, client = _failed_micro_batch(trained, tmp_path, background)
    try:
        daemon._shutdown_by = time.monotonic() + 20
        assert daemon._shutdown() == 0  # was 1, the sink untried: the micro-batch's old error ended the shutdown
        assert sink.delivered and not sink.queued
        assert client.commits[-1][TP][0] == EVENTS
    finally:
        if daemon._worker is not None:
            daemon._worker.close()


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
def test_a_revoke_delivers_what_a_failed_micro_batch_kept_and_commits_the_handover(trained, tmp_path, background):
    daemon, sink, client = _failed_micro_batch(trained, tmp_path, background)
    try:
        daemon._on_revoke([TP])
        assert sink.delivered and not sink.queued
        offset, metadata = client.rebalance_commits[-1][TP]
        assert offset == EVENTS and json.loads(metadata)["incidents"]  # the open incident goes with the partition
    finally:
        if daemon._worker is not None:
            daemon._worker.close()


@pytest.mark.parametrize(("client", "budget"), [("kafka-python", 2.0), ("confluent", 10.0)])
def test_under_kafka_python_a_revokes_own_flush_takes_a_third_of_the_session(trained, tmp_path, client, budget):
    """kafka-python runs the revoke listener on its IO thread, where it holds back the heartbeats: a revoke longer
    than kafka.session_timeout_ms got the member expelled and its revoke commit refused (the handover lost). Its own
    flush takes a third of the session. The micro-batch in flight, which it waits for first, keeps its 10 s (a
    shorter delivery failed every post of an Alertmanager slower than that, for ever): the README says so."""
    daemon = _gru_daemon(trained, tmp_path, kafka={"client": client, "session_timeout_ms": 6000,
                                                   "heartbeat_interval_ms": 1000},
                         processing={"score_in_background": True, "max_delay_ms": 0}, alerts={"k": 1, "n": 1})
    given: list[float] = []

    class Recording(_OutageSink):
        def flush(self, timeout_s: float) -> int:
            given.append(timeout_s)
            return super().flush(timeout_s)

    try:
        _micro_batch_in_flight(daemon, Recording(fail=0))
        daemon._on_revoke([TP])  # waits for it, then flushes and commits itself
        assert len(given) >= 2 and 9.5 < given[0] <= 10.0 and max(given[1:]) <= budget, given
    finally:
        daemon._worker.close()


class _RefusingProducer:
    """A dead-letter producer whose brokers refuse every message for good (as MSG_SIZE_TOO_LARGE): its flush
    raises the refusal once and forgets it, as the Kafka producers of pipelines.kafka_io do."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def produce(self, topic, value, key=None, headers=None) -> None:
        self.refused.append(f"{topic}: MSG_SIZE_TOO_LARGE")

    def flush(self, timeout_s: float) -> None:
        refused, self.refused = self.refused, []
        if refused:
            raise KafkaDeliveryError(f"{len(refused)} Kafka messages not delivered: {refused[0]}")

    def close(self, timeout_s: float = 5.0) -> None:
        pass


def test_a_dead_letter_refused_in_a_revoke_stops_the_daemon_uncommitted(trained, tmp_path):
    """A refused dead letter stops the daemon with no commit (README), in a revoke as in the loop: the revoke
    had logged it as undelivered alerts and gone on, and the shutdown after it then exited 0."""
    daemon = _gru_daemon(trained, tmp_path)
    client = _Client()
    daemon.source = daemon.commits.source = client
    daemon.producer = _RefusingProducer()
    daemon.sinks = FanoutSink([_OutageSink(fail=0)])
    daemon._on_assign([TP])
    daemon.positions.position_new(client, RecordBatch.empty())
    batch = _level_shift()
    batch.value[-1] = b"{not json"  # a dead letter
    daemon.process(batch)
    with pytest.raises(KafkaDeliveryError, match="MSG_SIZE_TOO_LARGE"):
        daemon._on_revoke([TP])  # kafka-python re-raises it from poll as a KafkaError, confluent-kafka as itself
    assert not client.rebalance_commits and not client.commits


@pytest.mark.parametrize("background", [False, True], ids=["serial", "background"])
def test_a_revoke_with_the_sink_still_down_commits_nothing_and_drops_the_partitions(trained, tmp_path, background):
    """At-least-once across owners: alerts still undelivered when the partitions go are the next owner's to repeat,
    so nothing is committed past them, and the partitions' windows and alert state go."""
    daemon, sink, client = _failed_micro_batch(trained, tmp_path, background)
    sink.fail = 99  # the outage goes on
    try:
        daemon._on_revoke([TP])
        assert not client.rebalance_commits and not client.commits
        assert TP not in daemon.positions.assigned and not daemon.positions.uncommitted
        assert all(not route.stream_index and route.pending_windows == 0 for route in daemon.routes)
    finally:
        if daemon._worker is not None:
            daemon._worker.close()


def test_a_lost_session_commits_nothing_waits_for_the_micro_batch_in_flight_and_drops_the_partitions(trained,
                                                                                                        tmp_path):
    """Another member may own the partitions already: no commit (not even the micro-batch in flight's, which is
    waited for, so its thread does not score streams whose state goes), and their state goes."""
    daemon = _gru_daemon(trained, tmp_path, processing={"score_in_background": True, "max_delay_ms": 0},
                         alerts={"k": 1, "n": 1})
    sink = _OutageSink(fail=0)
    try:
        client = _micro_batch_in_flight(daemon, sink)
        daemon._on_lost([TP])
        assert not daemon._worker.busy and sink.delivered  # waited for: its alerts went out
        assert not client.rebalance_commits and not client.commits
        assert TP not in daemon.positions.assigned and not daemon.positions.uncommitted
        assert all(not route.stream_index and route.pending_windows == 0 for route in daemon.routes)
    finally:
        daemon._worker.close()


def _committed(trained, tmp_path, client: _Client, batch: RecordBatch):
    """A serial daemon (alerts k=1 of n=1) on ``client`` that processed ``batch`` and committed it, asynchronously,
    as its loop does."""
    daemon = _gru_daemon(trained, tmp_path, processing={"score_in_background": False}, alerts={"k": 1, "n": 1})
    daemon.sinks = FanoutSink([_OutageSink(fail=0)])
    daemon.source = daemon.commits.source = client
    daemon._on_assign([TP])
    daemon.positions.position_new(client, RecordBatch.empty())
    daemon.process(batch)
    daemon._flush_and_commit(timeout_s=10.0)
    daemon.commits.collect()
    return daemon


def test_a_shutdown_whose_handover_commit_fails_exits_1_though_every_offset_was_committed(trained, tmp_path):
    """The loop's commits covered every record, then the shutdown's own commit, the one that hands the open
    incident over, was refused: logged, and exit code 0, as if the incident had gone to the next owner."""

    class RefusingShutdownCommit(_Client):
        def commit(self, offsets, timeout_s=None) -> None:  # the shutdown's synchronous commit
            raise RuntimeError("COORDINATOR_NOT_AVAILABLE")

    client = RefusingShutdownCommit()
    daemon = _committed(trained, tmp_path, client, _level_shift())
    assert client.commits[-1][TP][0] == EVENTS and not daemon.positions.uncommitted
    assert sum(r.tracker.open_incidents for r in daemon.routes) == 1
    daemon._shutdown_by = time.monotonic() + 5
    assert daemon._shutdown() == 1


def test_an_earlier_commits_failed_answer_does_not_fail_a_clean_shutdown(trained, tmp_path):
    """The shutdown is judged by its own commit: an answer of an earlier asynchronous commit (an older generation's,
    since superseded), collected during the shutdown, had it exit 1 with nothing of its own to commit."""
    from pipelines.source import KafkaCommitError

    client, normal = _Client(), _level_shift()
    normal = RecordBatch(*(column[:140] for column in (normal.topic, normal.partition, normal.offset,
                                                       normal.timestamp, normal.key, normal.value)))
    daemon = _committed(trained, tmp_path, client, normal)  # normal readings only: no incident open
    assert not daemon.positions.uncommitted and sum(r.tracker.open_incidents for r in daemon.routes) == 0
    daemon.commits._answers.put((daemon.commits._generation - 1, 0, {TP: (10, "")}, 0.01,
                                 KafkaCommitError("offset commit failed: REBALANCE_IN_PROGRESS")))
    commits = len(client.commits)
    daemon._shutdown_by = time.monotonic() + 5
    assert daemon._shutdown() == 0 and len(client.commits) == commits  # nothing of its own to commit
