"""Per-partition bookkeeping of the daemon: what is assigned, what to commit, and the window-rebuild replay.

Each commit carries ``{"rebuild_from": N}`` in its metadata: the lowest source offset still inside some
stream's window on that partition. A member newly assigned the partition seeks to N and replays up to the
committed offset into the window buffers without scoring (``replay_mask``), so detection resumes with full
windows after a restart, a crash or a rebalance.

The last commit before the partitions go (a revoke, the shutdown: everything read is scored and its alerts delivered)
also carries the open incidents of the partition's streams, ``{"rebuild_from": N, "incidents": [...]}``, as many as
fit in :data:`MAX_METADATA_BYTES`; the next owner continues them (:meth:`Positions.take_handed_over`), so an incident
open across a rolling restart or a rebalance neither fires again nor loses its ``resolved`` alert.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np

from detector.windows import sorted_groups

from .source import CommittedUnreadable, RecordBatch, Source, TopicPartition

__all__ = ["MAX_METADATA_BYTES", "MAX_REBUILD_RECORDS", "Positions", "WindowOffsets", "replay_start",
           "without_incidents"]

log = logging.getLogger("anomalyd")


MAX_REBUILD_RECORDS = 2_000_000
"""The longest rebuild replay per partition (records). A stream that has gone quiet keeps its window's offsets in
every later commit's floor, which would otherwise make each restart replay everything since (or, once retention has
deleted that offset, reset the position by ``auto_offset_reset``). Streams whose window begins further back restart
with a partial window (their first windows wait to fill up)."""


MAX_METADATA_BYTES = 3500
"""The most bytes of a commit's metadata anomalyd writes by default (``kafka.commit_metadata_max_bytes``): brokers
refuse a commit whose metadata is longer than their ``offset.metadata.max.bytes`` (4,096 by default). Incidents beyond
it are not handed over (and said)."""


def replay_start(committed: int, floor: int, log_start: int, max_replay: int = MAX_REBUILD_RECORDS) -> int:
    """Where a newly assigned partition starts: at the commit's rebuild ``floor`` (-1: none), but never below the
    partition's first retained offset ``log_start`` nor ``max_replay`` records below the ``committed`` offset."""
    if not 0 <= floor < committed:
        return committed
    return max(floor, log_start, committed - max_replay)


def _without(batch: RecordBatch, tps: set[TopicPartition]) -> RecordBatch:
    """``batch`` without the records of partitions ``tps`` (itself when it has none)."""
    if not tps:
        return batch
    keep = np.flatnonzero([(t, p) not in tps for t, p in zip(batch.topic, batch.partition.tolist(), strict=True)])
    return batch if len(keep) == len(batch) else batch.select(keep)


def _metadata_doc(metadata: str) -> dict:
    """A commit's metadata as a dict, {} if it is none of ours. What follows the JSON object is ignored:
    confluent-kafka writes metadata with a trailing NUL (and kafka-python's commits add one, see
    pipelines.source_kafka_python)."""
    try:
        doc = json.JSONDecoder().raw_decode(metadata.lstrip())[0] if metadata else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _rebuild_floor(metadata: str) -> int:
    """``rebuild_from`` of a commit's metadata, -1 if none."""
    try:
        return int(_metadata_doc(metadata).get("rebuild_from", -1))
    except (ValueError, TypeError):
        return -1


def _handed_over(metadata: str) -> list[dict]:
    """The open incidents a commit's metadata hands over ([] if none)."""
    got = _metadata_doc(metadata).get("incidents", [])
    return [i for i in got if isinstance(i, dict)] if isinstance(got, list) else []


def _fitting(floor: int, incidents: list[dict], limit: int) -> list[dict]:
    """As many of ``incidents`` as fit in a commit's metadata of ``limit`` bytes beside the rebuild floor, the
    oldest first (the longest-known incidents)."""
    doc: dict = {"rebuild_from": floor} if floor >= 0 else {}
    size = lambda d: len(json.dumps(d, separators=(",", ":")))  # noqa: E731 - ASCII (escaped): bytes = characters
    kept: list[dict] = []
    room = limit - size({**doc, "incidents": []})
    for inc in sorted(incidents, key=lambda i: i["started"]):
        cost = size(inc) + 1  # and its comma
        if cost <= room:
            kept.append(inc)
            room -= cost
    return kept


def _metadata(tp: TopicPartition, floor: int, incidents: list[dict] | None, limit: int = MAX_METADATA_BYTES) -> str:
    """A commit's metadata: the rebuild floor (-1: none) and as many of ``incidents`` as fit in ``limit`` bytes (the
    rest said, not handed over: the next owner detects them afresh; the daemon resolves those first,
    :meth:`Positions.split_handover`)."""
    doc: dict = {"rebuild_from": floor} if floor >= 0 else {}
    if not incidents:
        return json.dumps(doc) if doc else ""
    kept = _fitting(floor, incidents, limit)
    if len(kept) < len(incidents):
        log.warning("%s: %d of %d open incidents handed over to the partition's next owner (the commit metadata's "
                    "limit, %d bytes); it detects the others afresh (a second firing alert, another id)", tp,
                    len(kept), len(incidents), limit)
    if kept:
        doc["incidents"] = kept
    return json.dumps(doc, separators=(",", ":")) if doc else ""


def without_incidents(offsets: dict[TopicPartition, tuple[int, str]]) -> dict[TopicPartition, tuple[int, str]]:
    """``{tp: (next offset, metadata)}`` with only the rebuild floor in each metadata (open incidents left out)."""
    out = {}
    for tp, (nxt, meta) in offsets.items():
        doc = _metadata_doc(meta)
        out[tp] = (nxt, _metadata(tp, _rebuild_floor(meta), None)) if "incidents" in doc else (nxt, meta)
    return out


class WindowOffsets:
    """Per stream, a source offset at or below the oldest event still in its window: where a replay must start.

    Exact bookkeeping would keep the offsets of each stream's last ``W`` events (``W`` int64 per stream). This
    keeps two: the offsets of the first events of the stream's current and previous *block* of ``W`` events
    (events ``1..W`` form block 0, ``W+1..2W`` block 1, ...). A window's oldest event is never older than the
    previous block's first event (the current one's when that block is complete), so replaying from there
    rebuilds the window; it costs at most ``W - 1`` extra events per stream and 24 bytes per stream instead of
    ``8 W``. Only events the window buffer accepted are added (a late one is in no window, and replayed it could be
    accepted where the event that made it late is no longer replayed).
    """

    def __init__(self, window: int, capacity: int = 1024) -> None:
        self.window = int(window)
        self.marks = np.full((capacity, 2), -1, dtype=np.int64)  # (S, 2) first offsets of previous, current block
        self.count = np.zeros(capacity, dtype=np.int64)  # (S,) events seen

    def ensure_capacity(self, n: int) -> None:
        cap = len(self.count)
        if n > cap:
            new = max(n, 2 * cap)
            self.marks = np.concatenate([self.marks, np.full((new - cap, 2), -1, dtype=np.int64)])
            self.count = np.concatenate([self.count, np.zeros(new - cap, dtype=np.int64)])

    def add(self, stream: np.ndarray, offset: np.ndarray) -> None:
        """Record events (N,) in partition order: ``stream`` indices and their source offsets."""
        if len(stream) == 0:
            return
        self.ensure_capacity(int(stream.max()) + 1)
        order = np.argsort(stream, kind="stable")
        s, o = stream[order], offset[order]  # grouped by stream, arrival order kept
        starts, gid = sorted_groups(s)
        sizes = np.diff(np.r_[starts, len(s)])
        rank = np.arange(len(s)) - starts[gid]  # position within its stream's events
        starts_block = (self.count[s] + rank) % self.window == 0  # (N,) first event of a block
        bs, bo = s[starts_block], o[starts_block]  # block starts, grouped by stream
        if len(bs):
            last = np.flatnonzero(np.r_[bs[1:] != bs[:-1], True])  # each stream's last block start
            streams = bs[last]
            before = np.maximum(last - 1, 0)
            two = (last > 0) & (bs[before] == streams)  # a second block start of the stream in this batch
            self.marks[streams, 0] = np.where(two, bo[before], self.marks[streams, 1])
            self.marks[streams, 1] = bo[last]
        self.count[s[starts]] += sizes

    def floor(self, n: int) -> np.ndarray:
        """(n,) replay start of streams ``0..n-1`` (-1: no event seen)."""
        self.ensure_capacity(n)
        prev, cur = self.marks[:n, 0], self.marks[:n, 1]
        full_block = self.count[:n] % self.window == 0  # the current block is exactly the window
        return np.where((prev >= 0) & ~full_block, prev, cur)

    def reset(self, streams: np.ndarray) -> None:
        streams = streams[streams < len(self.count)]  # beyond the capacity: nothing recorded (a new buffer)
        self.marks[streams] = -1
        self.count[streams] = 0


class Positions:
    def __init__(self, max_rebuild_records: int = MAX_REBUILD_RECORDS,
                 max_metadata_bytes: int = MAX_METADATA_BYTES) -> None:
        self.max_rebuild_records, self.max_metadata_bytes = max_rebuild_records, max_metadata_bytes
        self.ids: dict[TopicPartition, int] = {}  # small integer id per topic-partition ever seen
        self.tps: list[TopicPartition] = []
        self.assigned: set[TopicPartition] = set()
        self.uncommitted: dict[TopicPartition, int] = {}  # next offset to commit
        self.processed: dict[TopicPartition, int] = {}  # next offset after what is processed (or committed before)
        self.handed_over: dict[TopicPartition, list[dict]] = {}  # open incidents from the previous owner's commit
        self._carries: set[TopicPartition] = set()  # partitions whose last commit carries incidents
        self._floor_read: dict[TopicPartition, int] = {}  # a commit's floor, until a record of ours is processed
        self._resume: dict[TopicPartition, int] = {}  # records below these offsets are a rebuild replay
        self._new: set[TopicPartition] = set()  # assigned, not yet positioned
        self._first_dropped: dict[TopicPartition, int] = {}  # first record polled before a positioning that failed
        self._read_from: dict[TopicPartition, int] = {}  # where reading started here without a commit (kept on revoke)
        self._unstarted: set[TopicPartition] = set()  # positioned without a commit, no record processed yet
        self._revoked = False  # a revoke since the last drop_unassigned

    def id_of(self, tp: TopicPartition) -> int:
        i = self.ids.get(tp)
        if i is None:
            i = self.ids[tp] = len(self.tps)
            self.tps.append(tp)
        return i

    def batch_ids(self, batch: RecordBatch) -> np.ndarray:
        """(N,) topic-partition id of each record."""
        topics = batch.topic
        if len(topics) and topics.count(topics[0]) == len(topics):  # one topic (the usual case): per partition
            partition = np.asarray(batch.partition, dtype=np.int64)
            lut = np.zeros(int(partition.max()) + 1, dtype=np.int64)  # partition -> id; no sort (np.unique's)
            parts = np.flatnonzero(np.bincount(partition, minlength=len(lut)))
            lut[parts] = [self.id_of((topics[0], p)) for p in parts.tolist()]
            return lut[partition]
        return np.fromiter((self.id_of((t, int(p))) for t, p in zip(topics, batch.partition, strict=True)),
                           np.int64, len(batch))

    # -- rebalance (called inside poll: bookkeeping only) ------------------------------------------------
    def assign(self, tps: Iterable[TopicPartition]) -> None:
        tps = set(tps)
        self.assigned |= tps
        self._new |= tps

    def revoke(self, tps: Iterable[TopicPartition]) -> list[int]:
        """Forget the partitions; returns their ids (for dropping their streams' state)."""
        tps = set(tps)
        for tp in tps:
            self.uncommitted.pop(tp, None)
            self.processed.pop(tp, None)
            self.handed_over.pop(tp, None)
            self._carries.discard(tp)
            self._floor_read.pop(tp, None)
            self._resume.pop(tp, None)
            self._first_dropped.pop(tp, None)
            self._unstarted.discard(tp)
        self.assigned -= tps
        self._new -= tps
        self._revoked = True
        return [self.ids[tp] for tp in tps if tp in self.ids]

    def drop_unassigned(self, batch: RecordBatch) -> RecordBatch:
        """``batch`` without records of partitions revoked while it was polled (confluent returns what it had
        fetched before the revoke): their state and last commit went with the partition, the next owner reads
        them. Costs nothing unless a revoke happened since the last call."""
        if not self._revoked:
            return batch
        self._revoked = False
        return _without(batch, {(t, p) for t, p in zip(batch.topic, batch.partition.tolist(), strict=True)}
                        - self.assigned)

    @property
    def needs_positioning(self) -> bool:
        return bool(self._new)

    def position_new(self, source: Source, batch: RecordBatch) -> RecordBatch:
        """Seek newly assigned partitions (after poll returned) and drop their records from ``batch``.

        With rebuild metadata in the last commit: seek to the floor and replay up to the committed offset.
        Otherwise start at the committed offset or, without a commit, at the first record this poll returned; a
        partition read here before and given back without a commit (its revoke could not deliver) starts where
        that reading started, if still retained: the poll may return records fetched before the revoke, beyond
        what was read and never delivered. Records of these partitions in ``batch`` are read again after the seek.
        """
        tps = sorted(self._new)
        self._new.clear()
        first = {tp: self._first_dropped.pop(tp) for tp in tps if tp in self._first_dropped}
        for t, p, off in zip(batch.topic, batch.partition.tolist(), batch.offset.tolist(), strict=True):
            first.setdefault((t, p), off)
        starts: dict[TopicPartition, int] = {}
        try:
            committed = source.committed(tps)
        except CommittedUnreadable:  # asking again cannot help: the daemon stops, nothing committed
            raise
        except Exception as exc:  # a timeout: the brokers are out of reach; position them after the next poll
            self._new.update(tps)
            self._first_dropped.update({tp: off for tp, off in first.items() if tp in self._new})
            log.warning("could not read the committed offsets of the partitions just assigned %s (%s); trying again "
                        "after the next poll", tps, exc)
            return _without(batch, set(tps))
        floors = {tp: _rebuild_floor(got[1]) for tp, got in committed.items() if got is not None}
        rebuild = [tp for tp, f in floors.items() if 0 <= f < committed[tp][0]]
        read_again = [tp for tp, got in committed.items() if got is None and tp in self._read_from]
        log_start = self._log_start(source, rebuild + read_again)
        if unknown := [tp for tp in rebuild if tp not in log_start]:
            log.warning("no rebuild of the windows of %s: their first retained offsets are unknown (a seek below "
                        "them would reset the position by auto_offset_reset); they start at the committed offset",
                        unknown)
        for tp, got in committed.items():
            if got is None:
                options = [first[tp]] if tp in first else []
                if tp in log_start and tp in read_again:  # the start of a reading never committed, if retained
                    options.append(max(self._read_from[tp], log_start[tp]))
                if options:  # not below a known first retained offset: that seek resets by auto_offset_reset
                    starts[tp] = max(min(options), log_start.get(tp, -1))
                    self._reading_starts(tp, starts[tp])
                else:  # no record of it in this poll: where reading starts is known from its first one processed
                    self._unstarted.add(tp)
                continue
            self._read_from.pop(tp, None)  # the group's commit says where from now
            # a log start not known: no rebuild (the floor may be gone, and auto_offset_reset latest skips the rest)
            starts[tp] = replay_start(got[0], floors[tp], log_start.get(tp, got[0]), self.max_rebuild_records)
            self.processed[tp] = got[0]
            if incidents := _handed_over(got[1]):  # continued here: the next commit takes them out of the metadata
                self.handed_over[tp] = incidents  # (else, resolved here, they were taken up again after a crash)
                self._carries.add(tp)
                self.uncommitted.setdefault(tp, got[0])
                self._floor_read[tp] = floors[tp]  # in that commit: the windows here are not rebuilt yet
            if starts[tp] < got[0]:
                self._resume[tp] = got[0]
        for tp, off in starts.items():
            source.seek(tp, off)
        if starts:
            log.info("positions after assignment: %s (replaying without scoring below %s)", starts,
                     {tp: o for tp, o in self._resume.items() if tp in starts})
        return _without(batch, set(tps))

    def _reading_starts(self, tp: TopicPartition, offset: int) -> None:
        """Reading of ``tp`` (without a commit) starts at ``offset`` here; an earlier, lower start is kept."""
        self._read_from[tp] = min(offset, self._read_from.get(tp, offset))

    @staticmethod
    def _log_start(source: Source, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """First retained offset of each partition to rebuild from; a partition the brokers did not answer for is
        left out (it starts at its committed offset, without a rebuild)."""
        if not tps:
            return {}
        try:
            return source.first_offsets(tps)
        except Exception as exc:  # a timeout: these partitions start at their commits, without a rebuild
            log.warning("could not read the first retained offsets of %s: %s", tps, exc)
            return {}

    # -- processing ----------------------------------------------------------------------------------------
    def replay_mask(self, tp_idx: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """(N,) True for records that only rebuild windows (below the committed offset after a seek-back)."""
        replay = np.zeros(len(offset), dtype=bool)
        for tp, resume_at in list(self._resume.items()):
            i = self.ids.get(tp)
            if i is None:  # no record of this partition seen yet (e.g. the first batch after a seek lacks it)
                continue
            sel = tp_idx == i
            replay |= sel & (offset < resume_at)
            if sel.any() and offset[sel].max() >= resume_at - 1:
                del self._resume[tp]
        return replay

    def advance(self, tp_idx: np.ndarray, offset: np.ndarray) -> None:
        """Mark records as processed (committable once their windows are scored and alerts delivered). Records of
        a rebuild replay are already committed: a commit in mid-replay must not move the group's offset back."""
        if self._unstarted:  # offsets come in order within a partition: the first of its first run is its lowest
            for i in np.flatnonzero(np.r_[True, tp_idx[1:] != tp_idx[:-1]]).tolist():
                if (tp := self.tps[tp_idx[i]]) in self._unstarted:
                    self._unstarted.discard(tp)
                    self._reading_starts(tp, int(offset[i]))
        last = np.r_[tp_idx[1:] != tp_idx[:-1], True]
        for i in np.flatnonzero(last).tolist():
            tp = self.tps[tp_idx[i]]
            nxt = int(offset[i]) + 1
            if nxt < self._resume.get(tp, 0):
                continue
            self.uncommitted[tp] = max(self.uncommitted.get(tp, 0), nxt)
            self.processed[tp] = max(self.processed.get(tp, 0), nxt)
            self._floor_read.pop(tp, None)

    def take_handed_over(self) -> dict[TopicPartition, list[dict]]:
        """The open incidents the previous owners of newly positioned partitions handed over (each once)."""
        got, self.handed_over = self.handed_over, {}
        return got

    def _floor(self, tp: TopicPartition, floors: np.ndarray) -> int:
        """The rebuild floor to commit for ``tp``: from ``floors`` (by tp id), or where nothing of ours was processed
        there yet, the floor of the commit it started at."""
        if tp in self._floor_read:
            return self._floor_read[tp]
        i = self.id_of(tp)
        return int(floors[i]) if i < len(floors) else -1

    def split_handover(self, floors: np.ndarray, handover: dict[int, list[dict]],
                       ) -> tuple[dict[int, list[dict]], dict[int, list[dict]]]:
        """``handover`` (tp id -> open incidents' states) split into (those a commit's metadata carries, those it
        cannot: only the partitions with some)."""
        carried, beyond = {}, {}
        for i, states in handover.items():
            carried[i] = _fitting(self._floor(self.tps[i], floors), states, self.max_metadata_bytes)
            if len(carried[i]) < len(states):
                kept = {id(s) for s in carried[i]}
                beyond[i] = [s for s in states if id(s) not in kept]
        return carried, beyond

    def commit_offsets(self, floors: np.ndarray, handover: dict[int, list[dict]] | None = None,
                       ) -> dict[TopicPartition, tuple[int, str]]:
        """``{tp: (next offset, metadata)}`` for everything processed; ``floors`` (by tp id, -1 = none). With
        ``handover`` (tp id -> open incidents' states: only when everything read is scored and delivered, before
        the partitions go), also the partitions with open incidents and nothing new to commit; and always those
        whose last commit still carries incidents (a rewrite that failed)."""
        todo = dict(self.uncommitted)
        handover = handover or {}
        for tp in [self.tps[i] for i, states in handover.items() if states] + list(self._carries):
            if tp not in todo and tp in self.processed and tp in self.assigned:
                todo[tp] = self.processed[tp]
        out = {}
        for tp, nxt in todo.items():
            i = self.id_of(tp)
            out[tp] = (nxt, meta := _metadata(tp, self._floor(tp, floors), handover.get(i), self.max_metadata_bytes))
            if '"incidents"' in meta:
                self._carries.add(tp)
            else:
                self._carries.discard(tp)
        return out
