"""The daemon's offset commits: what is processed, each with its partition's window-rebuild floor in the metadata.

The floor is the lowest source offset still inside some stream's window on the partition; the member that gets
the partition next seeks there and replays up to the committed offset (:mod:`pipelines.positions`).

The loop's commits are asynchronous: a broker that hangs (a frozen process, a network that drops packets)
held a synchronous commit, and with it the loop, its probe and its liveness, for 30 s (kafka-python) or until
the broker woke up (confluent-kafka). One is in flight at a time (per group generation: after a new assignment the
old one's answer is not waited for); its answer arrives through a later poll and
:meth:`Committer.collect` applies it. The commits in a rebalance and at shutdown stay synchronous: the
partitions or the process go right after them (the shutdown's within its grace period). Except kafka-python's in a
rebalance, where it allows no blocking call: only sent there (:meth:`Committer._send_in_rebalance`).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Sequence
from functools import partial

import numpy as np

from .metrics import Metrics
from .poll_ahead import PollAhead
from .positions import Positions, without_incidents
from .routes import RouteState
from .source import CommitDone, Source, TopicPartition

__all__ = ["Committer", "Offsets"]

log = logging.getLogger("anomalyd")

Offsets = dict[TopicPartition, tuple[int, str]]  # {tp: (next offset, metadata)}
ANSWER_WAIT_S = 30.0  # a commit unanswered this long is given up: the next one is sent (both go, in order)
RETRY_AFTER_S = 5.0  # after a failed commit, the next one waits this long (a broker outage fails them at once)


def _metadata_too_large(exc: BaseException) -> bool:
    """The brokers' answer to metadata over their offset.metadata.max.bytes (kafka-python's OffsetMetadataTooLargeError,
    librdkafka's OFFSET_METADATA_TOO_LARGE)."""
    return "METADATATOOLARGE" in str(exc).upper().replace("_", "") or "METADATATOOLARGE" in type(exc).__name__.upper()


class Committer:
    """Commits processed offsets through ``source`` (and, with poll ahead, where librdkafka cannot hold a commit
    back for ever: :meth:`PollAhead.commit`); a failed commit is counted and logged, the records stay uncommitted."""

    def __init__(self, positions: Positions, metrics: Metrics) -> None:
        self.positions, self.metrics = positions, metrics
        self.source: Source | None = None  # set once the daemon has its consumer
        self.ahead: PollAhead | None = None
        self.last_commit = 0.0  # monotonic time of the last commit attempt
        self.sync_error: BaseException | None = None  # of the last synchronous commit (None: it succeeded)
        self._answers: queue.SimpleQueue[tuple[int, int, Offsets, float, BaseException | None]] = queue.SimpleQueue()
        self._in_flight: tuple[int, float] | None = None  # (number, monotonic time sent) of the unanswered commit
        self._sent = 0  # asynchronous commits sent
        self._retry_at = 0.0  # monotonic time before which a failed commit is not tried again
        self._generation = 0  # assignments so far: an answer from an earlier one does not pause the commits

    def offsets(self, routes: Sequence[RouteState], handover: dict[int, list[dict]] | None = None) -> Offsets:
        """Everything processed so far, with the window-rebuild floors of ``routes``; with ``handover`` (the last
        commit before the partitions go, everything read scored and delivered: tp id -> the open incidents' states,
        :meth:`handover`), those incidents too."""
        return self.positions.commit_offsets(_floors(self.positions, routes), handover or {})

    def handover(self, routes: Sequence[RouteState]) -> tuple[dict[int, list[dict]], dict[int, list[dict]]]:
        """The open incidents of ``routes`` by tp id, taken once (their states hold how long each stream has been
        silent, which changes their size): (those a handover commit carries, those it cannot)."""
        return self.positions.split_handover(_floors(self.positions, routes), _incidents(routes))

    def commit(self, offsets: Offsets, in_rebalance: bool = False, wait: bool = False,
               timeout_s: float | None = None) -> None:
        """Commit ``offsets``: synchronously in a rebalance (kafka-python: sent) or with ``wait`` (that one given
        up after ``timeout_s``), else sent unless a commit is still in flight or a failed one is waiting to be
        retried (what is not committed now is in the next commit)."""
        self.collect()
        if not offsets:
            return
        if not (in_rebalance or wait):
            now = time.monotonic()
            if now < self._retry_at:
                return
            if self._in_flight is not None:
                if now - self._in_flight[1] < ANSWER_WAIT_S:
                    return
                log.warning("offset commit sent %.0f s ago has no answer yet (are the brokers reachable?); sending "
                            "the newer offsets after it", now - self._in_flight[1])
                self._in_flight = None
        send = partial(self._commit_now, timeout_s=timeout_s) if in_rebalance or wait else self._send
        if self.ahead is not None:
            self.ahead.commit(send, offsets, in_rebalance)
        else:
            send(offsets, in_rebalance)

    def new_generation(self) -> None:
        """Partitions assigned: a commit that failed in the old generation (UNKNOWN_MEMBER_ID after a lost session,
        say), or whose failure is still to come, does not hold the new generation's first commit back."""
        self._retry_at = 0.0
        self._in_flight = None
        self._generation += 1

    def collect(self) -> None:
        """Apply the answers of asynchronous commits that have come (on the loop thread)."""
        while True:
            try:
                generation, number, offsets, seconds, error = self._answers.get_nowait()
            except queue.Empty:
                return
            if self._in_flight is not None and self._in_flight[0] == number:
                self._in_flight = None
            self._finished(offsets, seconds, error, pause=generation == self._generation)

    def _send(self, offsets: Offsets, _in_rebalance: bool = False) -> None:
        self._sent += 1
        self.last_commit, t0 = time.monotonic(), time.perf_counter()
        self._in_flight = (self._sent, self.last_commit)
        try:
            self.source.commit_async(offsets, partial(self._answered, self._generation, self._sent, offsets, t0))
        except Exception as exc:  # refused before sending (no coordinator, partitions just revoked)
            self._in_flight = None
            self._finished(offsets, time.perf_counter() - t0, exc)

    def _answered(self, generation: int, number: int, offsets: Offsets, t0: float, error: BaseException | None) -> None:
        """The client's commit callback, on the polling thread (the helper's, with poll ahead): queued only."""
        self._answers.put((generation, number, offsets, time.perf_counter() - t0, error))

    def _commit_now(self, offsets: Offsets, in_rebalance: bool = False, timeout_s: float | None = None) -> None:
        self.last_commit, t0 = time.monotonic(), time.perf_counter()
        if in_rebalance and self.source.rebalance_commit_answered_later:
            self._send_in_rebalance(offsets, t0)
            return
        try:
            if in_rebalance:
                self.source.commit_in_rebalance(offsets, lambda _error: None)  # synchronous: it raises
            else:
                self.source.commit(offsets, timeout_s)
        except Exception as exc:
            if not _metadata_too_large(exc) or (floors := without_incidents(offsets)) == offsets:
                self.sync_error = exc
                self._finished(offsets, time.perf_counter() - t0, exc)  # e.g. a rebalance: records are redelivered
                return
            log.warning("the brokers refused open incidents in the commit's metadata (%s): committing without them "
                        "(the next owner detects them afresh); lower kafka.commit_metadata_max_bytes to the brokers' "
                        "offset.metadata.max.bytes", exc)
            self._commit_now(floors, in_rebalance, timeout_s)
            return
        self.sync_error = None
        self._finished(offsets, time.perf_counter() - t0, None)

    def _send_in_rebalance(self, offsets: Offsets, t0: float) -> None:
        """A rebalance commit that is only sent (kafka-python). Its answer comes from a later poll, when the group
        may be in its next generation, where a commit sent again could overwrite the partitions' new owner's: so
        nothing is sent again. Offsets with open incidents go first without them, in order on one connection: if
        the brokers refuse the incidents' metadata as too large, those offsets stand (the synchronous fallback).
        Both answers are awaited in whatever order they are handed over (kafka-python's is last first)."""
        floors = without_incidents(offsets)
        sends = {"offsets": offsets} if floors == offsets else {"floors": floors, "offsets": offsets}
        answers: dict[str, BaseException | None] = {}  # kafka-python hands answers over last first
        for which, sent in sends.items():
            self._send_one_in_rebalance(sent, partial(self._rebalance_answered, t0, len(sends), answers, which))

    def _send_one_in_rebalance(self, offsets: Offsets, answered: CommitDone) -> None:
        try:
            self.source.commit_in_rebalance(offsets, answered)
        except Exception as exc:  # refused before sending (no coordinator)
            answered(exc)

    def _rebalance_answered(self, t0: float, expected: int, answers: dict[str, BaseException | None], which: str,
                            error: BaseException | None) -> None:
        """An answer to a rebalance commit that was only sent; once all ``expected`` have come, counted once and
        logged only (the partitions are gone)."""
        answers[which] = error
        if len(answers) < expected:
            return
        error = answers["offsets"]
        hint = ("; lower kafka.commit_metadata_max_bytes to the brokers' offset.metadata.max.bytes"
                if error is not None and _metadata_too_large(error) else "")
        if error is not None and answers.get("floors", error) is None:  # the offsets stand, without the incidents
            log.warning("the open incidents were not handed over with the partitions given up (%s): their offsets "
                        "went without them just before (the next owner detects them afresh)%s", error, hint)
            error = None
        self.metrics.observe_commit(time.perf_counter() - t0, ok=error is None)
        if error is not None:
            log.warning("offset commit of the partitions given up failed (their next owner replays from the commit "
                        "before): %s%s", error, hint)

    def _finished(self, offsets: Offsets, seconds: float, error: BaseException | None, pause: bool = True) -> None:
        """Count the commit; a failure pauses the next for RETRY_AFTER_S (``pause``: it is of this generation). A
        success of an earlier generation leaves the offsets to commit alone: an entry equal to its offset is this
        generation's (a partition assigned again and to be committed anew: see Positions.position_new)."""
        self.metrics.observe_commit(seconds, ok=error is None)
        if error is not None:
            if pause:
                self._retry_at = time.monotonic() + RETRY_AFTER_S
            log.warning("offset commit failed (the next commit includes these offsets; records since the last "
                        "commit are replayed only if none succeeds before the partitions go): %s", error)
            return
        for tp, (nxt, _meta) in offsets.items():  # records processed since stay uncommitted
            if pause and self.positions.uncommitted.get(tp) == nxt:
                del self.positions.uncommitted[tp]


def _floors(positions: Positions, routes: Sequence[RouteState]) -> np.ndarray:
    """(n_tp,) the lowest window-rebuild floor of ``routes`` per topic-partition id (-1: none)."""
    floors = np.full(len(positions.tps), -1, dtype=np.int64)
    for route in routes:
        f = route.rebuild_floor(len(positions.tps))
        floors = np.where((floors < 0) | ((f >= 0) & (f < floors)), f, floors)
    return floors


def _incidents(routes: Sequence[RouteState]) -> dict[int, list[dict]]:
    """The open incidents' states of ``routes`` by topic-partition id."""
    incidents: dict[int, list[dict]] = {}
    for route in routes:
        for tp_id, states in route.handover().items():
            incidents.setdefault(tp_id, []).extend(states)
    return incidents
