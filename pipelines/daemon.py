"""The daemon loop: poll -> decode -> window buffers -> batched models -> alert state -> sinks -> commit.

At-least-once: offsets are committed only after the dead-letter producer and every sink have acknowledged
everything produced from the records being committed. A crash can repeat alerts (same ids), never lose them.

Window state after a restart or rebalance is rebuilt by *seeking back*: every commit carries, in its metadata,
the lowest source offset that is still inside some stream's window on that partition. A member that gets the
partition seeks there and replays up to the committed offset into the window buffers without scoring or
alerting, so detection resumes with full windows.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from prometheus_client import CollectorRegistry

from detector.device import resolve_device
from detector.engine import InferenceEngine

from .allocator import tune_process_memory
from .commits import Committer
from .config import Config, ConfigError, check_model_files
from .daemon_delivery import RETRIED, DeliveryStage, left
from .httpserver import HealthServer
from .intake import TOO_MANY_STREAMS, Intake
from .kafka_io import Producer, make_producer
from .kafka_probe import KafkaProbe
from .kafka_security import wait_for_a_broker
from .metrics import Metrics
from .model_store import LoadedModel
from .poll_ahead import PollAhead
from .positions import Positions
from .routes import RouteState
from .scoring_threads import ScoringThreads
from .scoring_worker import ScoringWorker
from .served_models import ServedModels
from .sinks import FanoutSink, build_sinks
from .source import RecordBatch, Source, TopicPartition, make_source

__all__ = ["Daemon"]

log = logging.getLogger("anomalyd")

class Daemon(DeliveryStage):
    """``Daemon(cfg).run(count=None, timeout=None)``; runnable to completion from a test (``count`` events)."""

    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None,
                 source_factory: Callable[..., Source] | None = None,
                 stop_event: threading.Event | None = None) -> None:
        check_model_files(cfg)  # a missing model is a config error naming models.served[i] and the path
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, top_k_streams=cfg.metrics.top_k_streams)
        try:
            resolve_device(cfg.models.device)
        except ValueError as exc:  # a device this machine does not have (cuda without CUDA, mps off macOS)
            raise ConfigError([f"{cfg.where('models.device')}: models.device: {exc}"]) from exc
        self.engine = InferenceEngine(cfg.models.device, cfg.models.precision,
                                      max_batch=max(cfg.processing.max_batch_windows, 1024))
        # A revoke's last flush: kafka-python runs its rebalance listener on its IO thread, which sends no heartbeat
        # meanwhile, so the listener's own flush and commit take at most a third of the session (the micro-batch in
        # flight, which it waits for first, keeps its 10 s: a shorter delivery failed every post of a slow sink).
        third = cfg.kafka.session_timeout_ms / 3000 if cfg.kafka.client == "kafka-python" else 10.0
        self._revoke_s = min(10.0, cfg.shutdown.grace_period_s, third)
        self.scoring_threads = ScoringThreads.configure(  # the adaptive intra-op thread count; None: fixed
            self.engine.device, cfg.processing.model_threads, cfg.processing.score_in_background,
            self.metrics.inference_threads.set)
        self.models = ServedModels(cfg, self.engine, self.metrics)
        self._source_factory = source_factory or make_source
        self._stop = stop_event or threading.Event()
        self._reload = threading.Event()
        self._heartbeat = time.monotonic()
        self.positions = Positions(cfg.kafka.max_rebuild_records, cfg.kafka.commit_metadata_max_bytes)
        self.commits = Committer(self.positions, self.metrics)
        self.intake = Intake(self.models.router, self.positions, self.metrics, cfg.kafka.dead_letter_topic,
                             cfg.kafka.max_message_bytes, cfg.processing.max_event_time_ahead_s,
                             cfg.processing.max_streams)
        self.metrics.streams_max.set(cfg.processing.max_streams)
        self.kafka = KafkaProbe(self.metrics.kafka_reachable)  # while the topic is quiet: do the brokers answer?
        self._leaving = False  # the loop has ended: rebalance callbacks do nothing (see run)
        self._shutdown_by: float | None = None  # monotonic deadline of the shutdown (shutdown.grace_period_s)
        self._joined = False  # an assignment came, if an empty one: the group has taken this member in
        self._lag_due = False
        self._last_lag = 0.0  # monotonic time of the last lag report
        self._last_record = 0.0  # monotonic time of the last poll that returned records
        self._worker: ScoringWorker | None = None  # processing.score_in_background: the scoring thread
        self._ahead: PollAhead | None = None  # kafka.poll_ahead (confluent): the next poll on a helper thread
        self._oldest_pending: float | None = None
        self._last_retry_warning = -1e9  # monotonic time of the loop's last delivery warning
        self._last_reload_check = self._last_idle_check = time.monotonic()
        self.events_seen = 0
        self.http_port: int | None = None
        if self.engine.device.type == "cuda":
            self.metrics.track_gpu_memory(str(self.engine.device))
        self.routes: list[RouteState] = []
        self._install(self.models.read(fallback=True))

    # -- models ----------------------------------------------------------------------------------------
    def _install(self, loaded: dict[str, LoadedModel], keep_on_failure: bool = False) -> bool:
        """Swap ``loaded`` in; ``keep_on_failure`` (a reload): a failed swap keeps the old models (False)."""
        routes = self.models.install_or_keep(loaded) if keep_on_failure else self.models.install(loaded)
        if routes is None:
            return False
        self.routes = routes
        self.intake.set_routes(routes)
        return True

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        due = now - self._last_reload_check >= self.cfg.models.watch_interval_s
        if not (self._reload.is_set() or due):
            return
        self._last_reload_check = now
        forced = self._reload.is_set()
        self._reload.clear()
        loaded = self.models.newer(forced)  # read before anything changes: a version that fails changes nothing
        if loaded is None:
            return
        try:
            self._finish_background(10.0)
        except RETRIED as exc:  # kept and retried; those offsets wait
            log.warning("delivery not complete, offsets not committed, will retry: %s", exc)
        self.flush()  # score what is pending with the old models first
        if self._install(loaded, keep_on_failure=True):
            log.info("models reloaded: %s", self.models.versions())

    # -- rebalance (both callbacks run inside poll, where kafka-python 3 allows no blocking client calls) -----
    def _on_revoke(self, tps: list[TopicPartition]) -> None:
        """Score pending windows, flush the sinks, commit, then drop the partitions' state. If delivery or the
        commit fails, the next owner re-reads from the last commit: duplicate alerts (same ids), never lost ones."""
        log.info("partitions revoked: %s", tps)
        if self._leaving:  # after a crash (no commit after a crash), or in the shutdown, which commits itself
            return
        if self._ahead is not None:
            self._ahead.take_deferred()  # still uncommitted, so in the commit below
        self.sinks.retry_now()  # the partitions' last flush here: at once, whatever backoff a failed one started
        try:  # a dead letter the brokers refused is no delivery to retry: it stops the daemon, as in the loop
            self._flush_and_commit(timeout_s=self._revoke_s, in_rebalance=True)
        except RETRIED as exc:
            log.warning("could not deliver alerts or dead letters before giving up partitions (the next owner "
                        "repeats them): %s", exc)
        self._drop_partitions(tps)

    def _on_lost(self, tps: list[TopicPartition]) -> None:
        """The group session timed out (brokers out of reach, or a loop that stood still): another member may
        own the partitions already, so nothing is committed (a commit would fail, or wait on the outage); their
        windows and alert state go, and whoever owns them next replays from the last commit."""
        log.warning("partitions lost (the group session timed out; the next owner replays them from the last "
                    "commit): %s", tps)
        if self._leaving:  # the shutdown's commit is in flight, or a crash: the state goes with the daemon
            return
        if self._ahead is not None:
            self._ahead.take_deferred()  # the other partitions' offsets are still uncommitted: in the next commit
        if self._worker is not None:
            try:  # its streams' state is about to go; what it freed is not committed
                self._worker.wait()
            except RETRIED as exc:
                log.warning("alerts or dead letters of the micro-batch in flight not delivered (the next owner "
                            "repeats them): %s", exc)
        self._drop_partitions(tps)

    def _drop_partitions(self, tps: list[TopicPartition]) -> None:
        ids = self.positions.revoke(tps)
        for route in self.routes:
            gone = route.forget_partitions(ids)
            if gone:
                self.sinks.forget_streams(gone, revoked=tps)
                self.metrics.forget_streams(gone)
        self.metrics.assigned_partitions.set(len(self.positions.assigned))
        self.metrics.forget_partitions(tps)
        self._set_stream_gauges()

    def _on_assign(self, tps: list[TopicPartition]) -> None:
        """Only bookkeeping; the loop positions the new partitions right after poll returns."""
        log.info("partitions assigned: %s", tps)
        if self._leaving:
            return
        self._joined = True
        self.kafka.assigned()
        self.metrics.rebalances.inc()
        self.positions.assign(tps)
        self.commits.new_generation()
        self._lag_due = True  # report the new partitions' lag right after this poll
        self.metrics.assigned_partitions.set(len(self.positions.assigned))
        if self.cfg.kafka.topic_pattern:  # the topics are known now: their series at 0 (kafka.topics: at start)
            self.metrics.init_topics(sorted({t for t, _ in tps}), self._dead_letter_reasons())

    def _dead_letter_reasons(self) -> list[str]:
        """Dead-letter reasons whose series exist from the start (a rule alerts on their increase())."""
        return [TOO_MANY_STREAMS] if self.cfg.processing.max_streams else []

    # -- the loop --------------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop.set()

    def request_reload(self, *_args) -> None:
        self._reload.set()

    def is_alive(self) -> bool:
        return time.monotonic() - self._heartbeat < max(60.0, 10 * self.cfg.processing.max_delay_ms / 1000)

    def is_ready(self) -> bool:
        """Models loaded, the consumer group joined and, while the topic is quiet, the brokers answering
        (:mod:`pipelines.kafka_probe`): a replica beyond the partition count is ready and idle
        (anomalyd_assigned_partitions 0), so it neither holds up a PodDisruptionBudget nor a rollout. Not once a stop
        is asked for or the loop has ended (the shutdown's grace period, a crash)."""
        return (bool(self.routes) and self._joined and self.kafka.ok and not self._stop.is_set()
                and self._shutdown_by is None)

    def run(self, count: int | None = None, timeout: float | None = None) -> int:
        """Consume until stopped, ``count`` events seen, or ``timeout`` seconds passed. Returns an exit code.

        ``count`` counts every record polled, including those replayed to rebuild windows after a restart or a
        rebalance (:attr:`events_seen`)."""
        k = self.cfg.kafka
        deadline = None if timeout is None else time.monotonic() + timeout
        self._shutdown_by = None
        with ExitStack() as stack:
            if threading.current_thread() is threading.main_thread():
                for sig, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                                     (signal.SIGHUP, self.request_reload)):
                    previous = signal.signal(sig, handler)
                    stack.callback(signal.signal, sig, previous)
            server = HealthServer(self.registry, self.cfg.http.bind, self.cfg.http.port, self.is_alive,
                                  self.is_ready)
            if self.cfg.http.port >= 0:  # first: a port that is taken stops the start before any Kafka client
                server.start()
                stack.callback(server.stop)
                self.http_port = server.port
            security = self.cfg.kafka.security.client_settings()
            if k.client == "kafka-python" and not wait_for_a_broker(k.bootstrap_servers, self._stop):
                log.info("stopped while waiting for Kafka at %s: nothing was consumed", k.bootstrap_servers)
                return 0
            # Dead letters and alerts have a producer each: a flush reports the failures of every message of its
            # producer, so one shared producer let the scoring thread's alert flush take a dead letter's failure
            # (and the loop commit past it), or the loop's dead-letter flush take an alert's (and crash).
            # dead letters: never given up while the brokers are away (flush says pending, the offsets wait)
            self.producer: Producer = make_producer(k.client, k.bootstrap_servers, security, never_give_up=True)
            stack.callback(lambda: self.producer.close(self._shutdown_left()))
            alerts_producer = make_producer(k.client, k.bootstrap_servers, security) if self.cfg.sinks.kafka.enabled \
                else None
            if alerts_producer is not None:
                stack.callback(lambda: alerts_producer.close(self._shutdown_left()))
            self.sinks: FanoutSink = build_sinks(dataclasses.asdict(self.cfg.sinks), alerts_producer)
            self.metrics.init_sinks([sink.name for sink in self.sinks.sinks])
            stack.callback(self.sinks.close)
            if self.cfg.processing.score_in_background:
                self._worker = ScoringWorker(self.scoring_threads)
                stack.callback(self._worker.close)
            self._ahead = PollAhead() if k.poll_ahead and k.client == "confluent" else None
            wrap = self._ahead.wrap if self._ahead else lambda callback: callback  # callbacks on this thread
            self.source = self._source_factory(
                client=k.client, bootstrap_servers=k.bootstrap_servers, group_id=k.group_id, topics=k.topics,
                pattern=k.topic_pattern, on_assign=wrap(self._on_assign), on_revoke=wrap(self._on_revoke),
                on_lost=wrap(self._on_lost),
                security=security,
                session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
                auto_offset_reset=k.auto_offset_reset, fetch_min_bytes=k.fetch_min_bytes,
                fetch_max_wait_ms=k.fetch_max_wait_ms)
            self.commits.source, self.commits.ahead = self.source, self._ahead
            self.metrics.init_topics(k.topics, self._dead_letter_reasons())
            self.metrics.set_state(up=True, ready=False)
            # micro-batch arrays reuse freed heap; on the CPU, the CUDA wheel's libraries leave the resident set
            tune_process_memory(models_on_cpu=self.engine.device.type == "cpu")
            gc.freeze()  # start-up objects (torch, models, clients: ~200k) out of the collector's full passes
            crashed, failed = True, None
            try:
                self._loop(count, deadline)
                crashed = False
            finally:
                self._shutdown_by = time.monotonic() + self.cfg.shutdown.grace_period_s
                self._leaving = crashed
                if self._ahead is not None:  # a batch polled ahead is not processed, so not committed
                    failed = self._ahead.close()
                self.metrics.set_state(up=False, ready=False)
                if crashed or failed is not None:
                    self._leaving = True
                    self.source.close(self._shutdown_left())  # no commit after a crash
            if failed is not None:  # the last poll, or a rebalance callback in it (its windows taken, say, then
                raise failed  # scoring failed): as a crash in the loop, whose shutdown had committed past them
            # From here the rebalance callbacks do nothing. librdkafka serves them inside the polls that wait for the
            # shutdown's commit, and in close (on a thread of its own): a lost session had dropped the uncommitted
            # offsets (exit 0 after a failed commit), a revoke had made an unbounded commit of its own, and after
            # the shutdown (which commits what it can; a refused dead letter: nothing) nothing more is committed.
            self._leaving = True
            try:
                code = self._shutdown()
            finally:
                self.source.close(self._shutdown_left())
        return code

    def _loop(self, count: int | None, deadline: float | None) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self._heartbeat = now
            if deadline is not None and now >= deadline:
                break
            if count is not None and self.events_seen >= count:
                break
            batch = self._poll()
            if len(batch):
                self.process(batch)
                self._last_record = time.monotonic()
                self.kafka.records()
            else:
                self.kafka.maybe(self.source, now, self._last_record)
            quiet_ms = (time.monotonic() - self._last_record) * 1000
            try:  # quiet: nothing for a whole poll timeout (an empty poll alone may only mean a fetch in flight)
                self._maybe_flush(quiet=quiet_ms >= self.cfg.kafka.poll_timeout_ms, now=now)
            except RETRIED as exc:  # alerts and dead letters are kept and retried; offsets wait (backpressure)
                self._warn_retry(exc)
            self.metrics.set_state(up=True, ready=self.is_ready())
            if self._worker is None or not self._worker.busy:
                self._maybe_forget_idle(now)
            self._maybe_reload()

    def _poll(self) -> RecordBatch:
        """The next batch, positioned; with poll ahead, after a full poll the one after it is started here."""
        most = self.cfg.kafka.poll_max_records
        if self._ahead is not None and self._ahead.in_flight:
            batch = self._ahead.take()
        else:
            batch = self.source.poll(most, self._poll_timeout_ms())
        batch = self.positions.drop_unassigned(batch)
        if self.scoring_threads and len(batch):  # an empty poll may only mean a fetch in flight
            self.scoring_threads.polled(len(batch) >= most)
        if self.positions.needs_positioning:  # seeks, with no poll in flight
            batch = self.positions.position_new(self.source, batch)
            self._adopt_handed_over()
        if self._ahead is not None and (offsets := self._ahead.take_deferred()):  # no poll in flight now
            self.commits.commit(offsets)
        self._maybe_report_lag()  # no poll in flight now either
        if self._ahead is not None and len(batch) >= most and not self._stop.is_set():
            self._ahead.submit(self.source.poll, most, self._poll_timeout_ms())  # a backlog: overlap processing
        return batch

    def _maybe_report_lag(self) -> None:
        """Every 15 s (every second while a partition's lag is unknown), with no poll in flight: librdkafka blocks
        ``assignment()`` while a rebalance callback runs, and a callback that a poll ahead hands to this thread
        then waits for it for ever."""
        now = time.monotonic()
        if not (now - self._last_lag > 15.0 or (self._lag_due and now - self._last_lag > 1.0)):
            return
        self._last_lag = now
        try:
            lag = self.source.lag()  # from the last fetch responses: partitions not fetched yet are missing
            self.metrics.set_consumer_lag(lag)
            self._lag_due = len(lag) < len(self.positions.assigned)  # try again in a second
        except Exception as exc:  # lag is best effort; never stop the loop for it
            log.debug("lag query failed: %s", exc)

    def _poll_timeout_ms(self) -> int:
        """kafka.poll_timeout_ms, cut to what is left of processing.max_delay_ms for the oldest pending window
        (a quiet topic must not hold a due micro-batch back for a whole poll), and to 5 ms while a due batch
        waits for the scoring thread."""
        timeout = self.cfg.kafka.poll_timeout_ms
        if self._oldest_pending is None:
            return timeout
        left = self.cfg.processing.max_delay_ms - (time.monotonic() - self._oldest_pending) * 1000
        if left <= 0 and self._worker is not None and self._worker.busy:
            return min(timeout, 5)
        return max(0, min(timeout, int(left)))

    def _shutdown(self) -> int:
        """Score, deliver and commit what is pending, within shutdown.grace_period_s. Exit code 1 when something
        was not delivered or not committed: the next owner of those records repeats them."""
        self.sinks.retry_now()  # the last flush tries at once, whatever backoff a failed one started
        self.commits.sync_error = None  # this shutdown's own commit's, not an earlier answer's
        try:
            self._flush_and_commit(timeout_s=self._shutdown_left(), wait=True)
        except RETRIED as exc:
            log.error("shutdown: delivery not complete, offsets not committed (the next run repeats it): %s", exc)
            return 1
        if self.positions.uncommitted or self.commits.sync_error is not None:  # failed, or no answer in time
            log.error("shutdown: the last commit failed (the next owner replays the offsets not committed, %s, and "
                      "detects the open incidents afresh): %s", sorted(self.positions.uncommitted.items()),
                      self.commits.sync_error or "no answer in time")
            return 1
        return 0

    def _shutdown_left(self) -> float:
        """What is left of the shutdown's grace period, at least a second (each step that waits for Kafka or a
        sink gets it); the whole period before the shutdown began."""
        if self._shutdown_by is None:
            return max(1.0, self.cfg.shutdown.grace_period_s)
        return left(self._shutdown_by)

    # -- processing: the scoring, delivery and commits that follow are in pipelines.daemon_delivery ------
    def process(self, batch: RecordBatch) -> None:
        """Decode a poll batch, route events into window buffers, queue due windows, dead-letter the bad."""
        self.events_seen += len(batch)
        self.intake.add(batch, self.producer)
        if self._oldest_pending is None and any(r.pending_windows for r in self.routes):
            self._oldest_pending = time.monotonic()
