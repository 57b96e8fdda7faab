"""The daemon's second half: due micro-batches scored, their alerts delivered, then their offsets committed.

:class:`pipelines.daemon.Daemon` polls, decodes and fills the window buffers; :class:`DeliveryStage` (a base class
of it) decides when the pending windows are due, scores them (on the loop thread, or on the scoring thread with
``processing.score_in_background``), hands the alerts to the sinks, delivers the dead letters and alerts, and only
then commits the offsets they freed (:mod:`pipelines.commits`).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np

from detector.engine import InferenceEngine

from .alert_message import Alert
from .alerts import AlertTracker
from .commits import Committer
from .config import Config
from .intake import Intake
from .kafka_io import KafkaDeliveryPending, Producer
from .metrics import Metrics
from .positions import Positions
from .routes import RouteState
from .scoring_threads import ScoringThreads
from .scoring_worker import ScoringWorker
from .sinks import FanoutSink, SinkError

__all__ = ["RETRIED", "DeliveryStage", "left"]

log = logging.getLogger("anomalyd")

# deliveries that are kept and retried while their offsets wait (backpressure): alerts a sink could not deliver,
# dead letters the brokers have not acknowledged yet (slow, or out of reach)
RETRIED = (SinkError, KafkaDeliveryPending)


def left(by: float) -> float:
    """Seconds left until the monotonic deadline ``by``, at least one (each step that waits gets that much)."""
    return max(1.0, by - time.monotonic())


class DeliveryStage:
    """Score -> deliver -> commit, for :class:`pipelines.daemon.Daemon`, which sets these attributes."""

    cfg: Config
    metrics: Metrics
    engine: InferenceEngine
    scoring_threads: ScoringThreads | None
    routes: list[RouteState]
    positions: Positions
    commits: Committer
    producer: Producer  # dead letters
    sinks: FanoutSink
    intake: Intake
    _worker: ScoringWorker | None
    _oldest_pending: float | None  # monotonic time the oldest window still pending was queued
    _last_retry_warning: float  # monotonic time of the loop's last delivery warning
    _last_idle_check: float  # monotonic time streams were last checked for silence

    def _maybe_flush(self, quiet: bool, now: float) -> None:
        """Flush when the micro-batch is full, its oldest window has waited max_delay_ms, or the topic is idle
        (``quiet`` with records still to commit).
        With the scoring thread, a due batch that finds the thread busy keeps growing (the loop goes on polling)
        until the thread is free, so neither thread waits for the other; only a full batch waits. That holds when
        idle too (a busy topic looks idle while a fetch is slow to come back): the thread scores, and the commit
        follows once it is done."""
        p = self.cfg.processing
        if self._worker is not None and self._worker.done():
            self._finish_background(10.0)  # commits what the scoring thread delivered
        self.commits.collect()  # the answers of commits sent before
        idle = quiet and bool(self.positions.uncommitted)  # after that commit, which may have been the idle one
        pending = sum(r.pending_windows for r in self.routes)
        waited = (time.monotonic() - self._oldest_pending) * 1000 if self._oldest_pending else 0.0
        full = pending >= p.max_batch_windows
        if not (full or waited >= p.max_delay_ms or idle or self._sinks_due(now)):
            return
        commit = idle or (now - self.commits.last_commit) * 1000 >= self.cfg.kafka.commit_interval_ms
        if self._worker is None:
            self._flush_and_commit(timeout_s=10.0, commit=commit)
        elif not self._worker.busy or full:
            self._flush_in_background(timeout_s=10.0, commit=commit, windows=pending)

    def _warn_retry(self, exc: Exception) -> None:
        """The loop's delivery warning, at most every 10 s (a sink backing off fails every loop turn at once)."""
        now = time.monotonic()
        if now - self._last_retry_warning >= 10.0:
            self._last_retry_warning = now
            log.warning("delivery not complete, offsets not committed, will retry: %s", exc)
        else:
            log.debug("delivery not complete, offsets not committed, will retry: %s", exc)

    def _sinks_due(self, now: float) -> bool:
        """A sink has work of its own (Alertmanager's re-post of open incidents), asked only while the scoring
        thread, which flushes the sinks, is idle."""
        return (self._worker is None or not self._worker.busy) and self.sinks.flush_due(now)

    # -- processing ------------------------------------------------------------------------------------
    def flush(self) -> list:
        """Score all pending windows, hand alerts to the sinks (not flushed). Returns the alerts."""
        return self._score(self._take_pending())

    def _take_pending(self) -> list[tuple[RouteState, list]]:
        """Every route's pending micro-batch, taken on the loop thread."""
        self._oldest_pending = None
        return [(route, route.take_pending()) for route in self.routes]

    def _score(self, taken: list[tuple[RouteState, list]]) -> list:
        """Score taken micro-batches, update alert state and metrics, hand alerts to the sinks."""
        alerts = []
        dev = str(self.engine.device)
        for route, parts in taken:
            timings: dict[str, float] = {}
            out = route.score(parts, self.engine, timings)
            if out is None:
                continue
            if self.scoring_threads:
                self.scoring_threads.add_model_seconds(sum(timings.values()))
            self.metrics.observe_scored(out, timings, dev)
            alerts.extend(out.alerts)
        if alerts:
            self.sinks.add(alerts)
        self._set_stream_gauges()
        return alerts

    def _set_stream_gauges(self) -> None:
        """Open incidents, streams held and their window bytes: after scoring, and after streams are forgotten."""
        self.metrics.open_incidents.set(sum(r.tracker.open_incidents for r in self.routes))
        self.metrics.set_buffers(sum(len(r.stream_index) for r in self.routes),
                                 sum(r.buffer.memory_bytes() for r in self.routes))

    def _flush_and_commit(self, timeout_s: float = 30.0, in_rebalance: bool = False, commit: bool = True,
                          wait: bool = False) -> None:
        """Score what is pending, deliver dead letters and alerts, then (``commit``) commit what is processed
        (asynchronously unless ``in_rebalance`` or ``wait``: :mod:`pipelines.commits`); within ``timeout_s``, each
        step that waits given what is left of it (at least a second)."""
        by = time.monotonic() + timeout_s
        try:
            self._finish_background(left(by), in_rebalance)
        except RETRIED:
            if not (in_rebalance or wait):
                raise
            # The last flush (a revoke, the shutdown) goes on: the failed micro-batch's alerts are still queued in
            # the sinks and its dead letters in the producer, both tried again below, at once (its failure may
            # have started a backoff after the caller's retry_now), and its offsets are in the last commit.
            self.sinks.retry_now()
        self.flush()
        handover = None
        if commit and (in_rebalance or wait):  # the handover: what it cannot carry resolves now, delivered below
            handover = self._handover()
        waiting = None
        try:
            self.producer.flush(left(by))  # dead letters
        except KafkaDeliveryPending as exc:  # the alerts still go out (a refused dead letter stops the daemon)
            waiting = exc
        self.sinks.flush(left(by), self.metrics.observe_sink_flush)  # raises SinkError: nothing is committed
        if waiting is not None:  # nothing is committed either
            raise waiting
        if commit and (self.positions.uncommitted or in_rebalance or wait):  # the last commit: open incidents too
            offsets = self.commits.offsets(self.routes, handover)
            self.commits.commit(offsets, in_rebalance, wait, left(by) if wait else None)

    # -- scoring on a second thread (processing.score_in_background) ---------------------------------------
    def _flush_in_background(self, timeout_s: float, commit: bool, windows: int) -> None:
        """Wait for the micro-batch in flight, hand the pending one (``windows`` windows) to the scoring thread,
        which scores it, updates alert state and delivers its alerts while this thread polls and decodes, then
        commit what the one before freed (so the scoring thread does not wait for that commit). Offsets are
        committed only after delivery, as in the serial path."""
        freed = self._worker.wait()
        self._maybe_forget_idle(time.monotonic())  # the scoring thread is idle: names and alert state are ours
        taken = self._take_pending()
        offsets = self.commits.offsets(self.routes) if commit and self.positions.uncommitted else None
        self._worker.submit(partial(self._score_and_deliver, taken, timeout_s), windows, offsets)
        self._commit_delivered(freed, timeout_s)

    def _score_and_deliver(self, taken: list[tuple[RouteState, list]], timeout_s: float) -> None:
        self._score(taken)
        self.sinks.flush(timeout_s, self.metrics.observe_sink_flush)

    def _finish_background(self, timeout_s: float, in_rebalance: bool = False) -> None:
        """Wait for the micro-batch in flight; raises its SinkError (nothing committed), else commits."""
        if self._worker is not None:
            self._commit_delivered(self._worker.wait(), timeout_s, in_rebalance)

    def _commit_delivered(self, offsets: dict | None, timeout_s: float, in_rebalance: bool = False) -> None:
        """Commit the offsets a scored micro-batch freed, once the dead letters of those records are delivered."""
        if offsets:
            self.producer.flush(timeout_s)
            self.commits.commit(offsets, in_rebalance)

    def _handover(self) -> dict[int, list[dict]]:
        """The open incidents to hand over with the partitions (tp id -> states). Those the handover commit's metadata
        cannot carry (``kafka.commit_metadata_max_bytes``; about 8 per partition) resolve now: the next owner cannot
        continue them, and their ids would stay open for ever on the alerts topic. Their ``resolved`` alerts end at
        their latest window and go with this flush (if it fails, they stay queued and go with a later one); the
        next owner detects the incidents afresh if they go on. If the handover is not committed, the next owner
        repeats the records: the same incident may fire again after its resolve."""
        handover, beyond = self.commits.handover(self.routes)
        if beyond:
            self._resolve_beyond(beyond)
        return handover

    def _resolve_beyond(self, beyond: dict[int, list[dict]]) -> None:
        by_route: dict[str, list[dict]] = {}
        for states in beyond.values():
            for state in states:
                by_route.setdefault(state["route"], []).append(state)
        resolved = []
        for route in self.routes:
            states = [s for s in by_route.get(route.spec.label, ()) if s["stream"] in route.stream_index]
            if states:
                idx = np.array([route.stream_index[s["stream"]] for s in states], dtype=np.int64)
                resolved += route.tracker.resolve_streams(idx, np.array([s["last_ts"] for s in states], np.int64))
        for alert in resolved:
            self.metrics.alert(alert.model, alert.status)
        self.sinks.add(resolved)
        log.warning("resolved %d open incidents that the commit metadata handing partitions %s over could not "
                    "carry (kafka.commit_metadata_max_bytes); their next owner detects them afresh if they go on",
                    len(resolved), ", ".join(sorted(f"{t}/{p}" for t, p in (self.positions.tps[i] for i in beyond))))
        self._set_stream_gauges()

    def _adopt_handed_over(self) -> None:
        """Continue the open incidents that the previous owners of newly assigned partitions handed over in their
        last commit (a clean shutdown or a revoke): each resolves here, with its own id, and is not fired again;
        sinks that re-send active alerts (Alertmanager) keep it active. An incident whose stream now has another
        route is resolved now (its ``resolved`` alert goes out: its id does not stay open on the alerts topic), and
        detected afresh if it goes on; a state not understood is skipped (said)."""
        handed = self.positions.take_handed_over()
        if not handed:
            return
        try:
            self._finish_background(10.0)  # the scoring thread reads alert state
        except RETRIED as exc:  # kept and retried; those offsets wait
            log.warning("delivery not complete, offsets not committed, will retry: %s", exc)
        adopted, resolved, skipped, rerouted = [], [], [], []
        for tp, states in handed.items():
            tp_id = self.positions.id_of(tp)
            for state in states:
                stream = state.get("stream")
                r = self.intake.router.route_of(stream) if isinstance(stream, str) else -1
                route = self.routes[r] if 0 <= r < len(self.routes) else None
                try:
                    if route is None or route.spec.label != state.get("route"):
                        resolved.append(_resolved_elsewhere(state, self.cfg.alerts.top_features))
                        rerouted.append(f"{stream!r} (was {state.get('route')!r})")
                        continue
                    alert, ended = route.adopt(state, tp_id)
                except (KeyError, TypeError, ValueError, OverflowError) as exc:
                    skipped.append(f"{tp}: {type(exc).__name__}: {exc}")
                    continue
                adopted += [alert] if alert is not None else []
                resolved += ended
        if adopted or resolved:
            log.info("continuing %d open incidents handed over with partitions %s", len(adopted), sorted(handed))
            if rerouted:
                log.info("resolved %d handed-over incidents of streams routed elsewhere here (detected afresh if they "
                         "go on): %s", len(rerouted), ", ".join(rerouted[:5]))
            if len(resolved) > len(rerouted):  # a stream whose key moved: an incident handed over with each of two
                log.info("resolved %d handed-over incidents of streams that have a later one",  # partitions
                         len(resolved) - len(rerouted))
            self.sinks.adopt(adopted)
            for a in resolved:
                self.metrics.alert(a.model, a.status)
            self.sinks.add(resolved)  # delivered with the next flush
            self._set_stream_gauges()
        if skipped:
            log.warning("%d open incidents handed over not continued (detected afresh if still anomalous): %s",
                        len(skipped), "; ".join(skipped[:5]))

    def _maybe_forget_idle(self, now: float) -> None:
        """Once a minute (or per timeout, if shorter), forget streams idle for processing.stream_idle_timeout_s and
        resolve their incidents (never while the scoring thread reads stream names and alert state)."""
        idle_s = self.cfg.processing.stream_idle_timeout_s
        if not idle_s or now - self._last_idle_check < min(60.0, idle_s):
            return
        self._last_idle_check = now
        resolved = []
        for route in self.routes:
            gone, alerts = route.forget_idle(idle_s, now)
            if gone:
                log.info("route %s: forgot %d streams silent for %gs (%d open incidents resolved)", route.spec.label,
                         len(gone), idle_s, len(alerts))
                for a in alerts:
                    self.metrics.alert(route.spec.label, a.status)
                self.sinks.add(alerts)
                self.sinks.forget_streams(gone)
                self.metrics.forget_streams(gone)
                resolved += alerts
                self._set_stream_gauges()
        if resolved:  # now: a quiet topic may not flush for a long time
            try:
                self.sinks.flush(10.0, self.metrics.observe_sink_flush)
            except SinkError as exc:  # kept and retried by the next flush
                log.warning("alert delivery failed, will retry: %s", exc)


def _resolved_elsewhere(state: dict, top_features: int) -> Alert:
    """The ``resolved`` alert of a handed-over incident whose stream this config routes elsewhere, ended at its
    latest window; its features are those the state names (its route's models are not served here, say)."""
    shares = state.get("shares")
    names = tuple(str(f) for f in shares) if isinstance(shares, dict) else ()
    return AlertTracker(top_features=top_features).resolved(state, names)
