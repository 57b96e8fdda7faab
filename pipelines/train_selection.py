"""The selection of ``anomalyd train --kafka-topic`` (:class:`_Selection`), without Kafka: polls of records
decoded as the daemon decodes them, and the rows of the selected streams and time range it would take kept."""

from __future__ import annotations

import fnmatch
import json
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from .config import KafkaConfig, ProcessingConfig
from .decode import DecodedBatch, DecodedGroup, FeatureSpec, _broker_ts, _check_stream, _parse_ts, _Reject, decode_batch
from .intake import _MS_LOW, reject_far_ahead
from .source import UNREADABLE


def _names_problem(names: list[str]) -> str | None:
    """What makes ``names`` unusable as a model's feature names (empty or blank, or one named twice), or None."""
    if not all(name.strip() for name in names):
        return "feature names must be non-empty"
    if twice := sorted({name for name in names if names.count(name) > 1}):
        return f"feature {twice[0]!r} is named twice"
    return None


def _in_range(ts: Any, from_ms: int | None, to_ms: int | None) -> Any:
    """Whether ``ts`` (an int, or per element of an array) is within the range."""
    return (from_ms is None or ts >= from_ms) & (to_ms is None or ts <= to_ms)


def _event_ts(msg: dict, broker_ts: int) -> int | None:
    """The message's event time as the daemon reads it (its ``ts``, else the broker's); None when it has none."""
    ts = msg.get("ts")
    if type(ts) is int and -(2**63) <= ts < 2**63:
        return ts
    try:
        return _broker_ts(broker_ts) if ts is None else _parse_ts(ts)
    except _Reject:
        return None


def _stream_of(msg: dict, key: bytes | None) -> str | None:
    """The message's stream id as the daemon reads it (``stream``, else the key); None when it has none."""
    stream = msg.get("stream")
    if isinstance(stream, str) and stream:
        return stream
    if stream is not None and not isinstance(stream, str) or not key:
        return None
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _probe(record: tuple[bytes, bytes | None, int], streams_glob: str,
           max_bytes: int) -> tuple[str, int, list[str] | None] | None:
    """A message of a stream ``streams_glob`` takes, read as the daemon reads it: its stream id, its event time and
    the feature names its values give (dict keys in order, else f0..fN-1, ``value``: f0; None when it has none).
    None for another stream's message or one the daemon dead-letters whatever the features (oversized, not a JSON
    object, no stream id or no time)."""
    raw, key, broker_ts = record
    if not raw or len(raw) > max_bytes:
        return None
    try:
        msg = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(msg, dict):
        return None
    stream, ts = _stream_of(msg, key), _event_ts(msg, broker_ts)
    if stream is None or ts is None or not fnmatch.fnmatchcase(stream, streams_glob):
        return None
    try:
        _check_stream(stream)  # a control character, too long: dead-lettered, so it names no features
    except _Reject:
        return None
    vals = msg.get("values", [msg["value"]] if "value" in msg else None)
    if isinstance(vals, dict) and vals:
        return stream, ts, list(vals)
    if isinstance(vals, list) and vals:
        return stream, ts, [f"f{i}" for i in range(len(vals))]
    return stream, ts, None


def _columns(records: list[tuple[bytes, bytes | None, int]]) -> tuple[list, list, np.ndarray]:
    """Records as :func:`decode_batch` takes them: values, keys and broker times."""
    values, keys, broker_ts = zip(*records, strict=True)
    return list(values), list(keys), np.asarray(broker_ts, dtype=np.int64)


class _Selection:
    """The rows of the selected streams and time range, decoded a poll at a time so that memory follows what is
    kept (F float32 values, an int64 timestamp and an int32 stream index per row, in arrays: no Python object per
    row), not the topic's raw messages."""

    def __init__(self, from_ms: int | None, to_ms: int | None, streams_glob: str,
                 feature_names: list[str] | None, max_message_bytes: int = KafkaConfig.max_message_bytes,
                 max_ahead_s: float = ProcessingConfig.max_event_time_ahead_s) -> None:
        self._from_ms, self._to_ms, self._glob = from_ms, to_ms, streams_glob
        self._max_bytes = max_message_bytes  # the daemon's kafka.max_message_bytes: it dead-letters larger ones
        self._max_ahead_ms = int(min(max_ahead_s * 1000, 2**62))  # the daemon's processing.max_event_time_ahead_s
        self.names = feature_names
        self._grow = feature_names is None  # found, not given: the union of the taken messages' names
        self._pending: list[tuple[bytes, bytes | None, int]] = []  # held until the feature names are known
        self._pending_parts: list[int] = []  # their partitions
        self.partition = 0  # the partition of the records add() is given next (their offsets ascending)
        self._newest: dict[tuple[str, int], int] = {}  # (stream, partition) -> its newest ts taken, in range or not
        self._stream_index: dict[str, int] = {}  # each stream with rows kept -> its index, in first-kept order
        self._streams: list[np.ndarray] = []  # int32 per poll: the kept rows' stream indices
        self._ts: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self.n_rejected, self.first_rejection = 0, ""
        self.reasons: Counter[str] = Counter()  # messages skipped per dead-letter reason
        self.n_late = 0  # rows in range older than an earlier one of their stream on their partition: left out
        self.outside: tuple[int, int] | None = None  # (earliest, latest) ts of the events the range left out

    def add(self, records: list[tuple[bytes, bytes | None, int]]) -> None:
        """A poll's records of :attr:`partition`, in offset order."""
        parts = [partition := self.partition] * len(records)
        if self.names is None:
            self._hold(records, partition)
            if self.names is None:
                return
            records, parts, self._pending, self._pending_parts = self._pending, self._pending_parts, [], []
        self._decode(records, parts)

    def _hold(self, records: list[tuple[bytes, bytes | None, int]], partition: int) -> None:
        """While the feature names are unknown: keep the selected messages (stream and event time) until they are
        known, taking the first names from the first taken with them (then the rest of the poll is kept whole, to be
        decoded with them; :meth:`_decode` adds the features later messages name). Of the others, the ones the
        daemon dead-letters whatever the names (no values among them) are counted and the selected streams' events
        outside the range noted (their times count for the late rule, their values unchecked), as :meth:`_decode`
        does: memory follows the selection."""
        others, held, tail = [], [], []
        for i, record in enumerate(records):
            probe = _probe(record, self._glob, self._max_bytes)
            if probe is None or not _in_range(probe[1], self._from_ms, self._to_ms):
                if probe is not None and probe[2] is not None:
                    self._note_outside(probe[1], probe[1])
                    ref = record[2] if record[2] > 0 else int(time.time() * 1000)  # reject_far_ahead's rule
                    if not self._max_ahead_ms or probe[1] - ref <= self._max_ahead_ms:
                        key = (probe[0], partition)
                        self._newest[key] = max(self._newest.get(key, probe[1]), probe[1])
                others.append(record)
                continue
            stream, ts, names = probe
            # names the daemon could not take (a blank key): skipped as a later message with them is, not fatal
            if names is not None and not _names_problem(names) and self._taken_with(names, record, partition):
                self.names, tail = names, records[i:]
                break
            # selected, one the daemon would skip even with its own names (a bad or non-finite value, far ahead,
            # late): no names from it; decoded (and counted) once the names are known. Or without values: below
            held.append((record, names is None))
        if others:  # no features needed to tell what the daemon dead-letters before it reads the values
            self._count_rejected(decode_batch(*_columns(others), lambda stream: None, self._max_bytes))
        if valueless := [j for j, (_, no_values) in enumerate(held) if no_values]:
            # refused whatever the names (missing_values, wrong_length, bad_value_type): counted now, not held;
            # a placeholder feature tells which (one taken all the same, the parsers disagreeing, is held)
            decoded, group = self._decoded(["\0"], _columns([held[j][0] for j in valueless]))
            self._count_rejected(decoded)
            valueless = set(valueless) - set([] if group is None else [valueless[p] for p in group.ok_index.tolist()])
        keep = [record for j, (record, _) in enumerate(held) if j not in valueless] + tail
        self._pending.extend(keep)
        self._pending_parts.extend([partition] * len(keep))

    def _taken_with(self, names: list[str], record: tuple[bytes, bytes | None, int], partition: int) -> bool:
        """Whether the daemon with features ``names`` would take ``record`` (decoded, not far ahead, in the range and
        not late): the first names come only from a message taken with them, as later ones do (:meth:`_decode`)."""
        _, group = self._decoded(names, _columns([record]))
        return group is not None and bool(self._judge(group, np.asarray([partition]))[1][0])

    def unreadable(self) -> None:
        """A record the Kafka client could not read: skipped, as the daemon dead-letters it."""
        self.first_rejection = self.first_rejection or UNREADABLE
        self.n_rejected += 1
        self.reasons[UNREADABLE] += 1

    def finish(self, topic: str) -> list[str]:
        """The feature names; raises if they were neither given nor found: with :meth:`nothing_selected`'s hint
        when events of the selected streams were read but none within the time range (a range in seconds)."""
        if self.names is None:
            if self.outside is not None:
                raise ValueError(self.nothing_selected(topic))
            raise ValueError("no message with values to take the feature names from; pass --features")
        return self.names

    def _note_outside(self, lo: int, hi: int) -> None:
        self.outside = (lo, hi) if self.outside is None else (min(lo, self.outside[0]), max(hi, self.outside[1]))

    def _count_rejected(self, decoded: DecodedBatch) -> None:
        if decoded.rejected:
            self.first_rejection = self.first_rejection or decoded.rejected[0][1]
            self.n_rejected += len(decoded.rejected)
            self.reasons.update(reason for _, reason, _ in decoded.rejected)

    def _decoded(self, names: list[str], batch: tuple) -> tuple[DecodedBatch, DecodedGroup | None]:
        """``batch`` (values, keys, broker times) decoded with ``names`` as the daemon does (far-ahead times too)."""
        spec = FeatureSpec(tuple(names))
        decoded = decode_batch(*batch, lambda stream: spec if fnmatch.fnmatchcase(stream, self._glob) else None,
                               self._max_bytes)
        if self._max_ahead_ms:
            reject_far_ahead(decoded, batch[2], self._max_ahead_ms)  # the daemon's rule, shared
        return decoded, decoded.groups.get(spec)

    def _judge(self, group: DecodedGroup, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Per row: in the time range, taken (in range and not late) and the newest ts after them per (stream,
        partition). Late as the daemon's rule (detector/windows.py) in offset order: below the newest ts before it
        of its stream on its partition, events outside the range included (the daemon saw them); equal times taken."""
        rows: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, key in enumerate(zip(group.stream, parts[group.ok_index].tolist(), strict=True)):
            rows[key].append(i)
        late, newest = np.zeros(len(group), dtype=bool), {}
        for key, idx in rows.items():
            ts = group.ts[idx]
            before = self._newest.get(key, int(ts[0]))
            late[idx] = ts < np.maximum(np.maximum.accumulate(ts), before)
            newest[key] = max(before, int(ts.max()))
        in_range = np.ones(len(group), dtype=bool) & _in_range(group.ts, self._from_ms, self._to_ms)
        return in_range, in_range & ~late, newest

    def _decode(self, records: list[tuple[bytes, bytes | None, int]], parts: list[int]) -> None:
        if not records:
            return
        batch, pos = _columns(records), np.asarray(parts)
        decoded, group = first = self._decoded(self.names, batch)
        if self._grow and (new := self._new_names(records, decoded)):  # decoded again with them (rarely)
            grown = [*self.names, *dict.fromkeys(name for names in new.values() for name in names)]
            decoded, group = self._decoded(grown, batch)
            taken = set() if group is None else set(group.ok_index[self._judge(group, pos)[1]].tolist())
            used = {name for p, names in new.items() if p in taken for name in names}  # a taken message's
            if len(used) < len(grown) - len(self.names):  # others name them only in messages skipped all the same
                grown = [*self.names, *(name for name in grown[len(self.names):] if name in used)]
                decoded, group = self._decoded(grown, batch) if used else first
            self.names = grown
        self._count_rejected(decoded)
        if group is None:
            return
        in_range, taken, newest = self._judge(group, pos)
        self._newest.update(newest)
        self.n_late += int(in_range.sum() - taken.sum())
        if not in_range.all():
            out = group.ts[~in_range]
            self._note_outside(int(out.min()), int(out.max()))
        idx = np.flatnonzero(taken)
        index, streams = self._stream_index, group.stream
        self._streams.append(np.fromiter((index.setdefault(streams[i], len(index)) for i in idx.tolist()), np.int32,
                                         len(idx)))
        self._ts.append(group.ts[idx])
        self._values.append(group.values[idx])

    def _new_names(self, records: list[tuple[bytes, bytes | None, int]], decoded: DecodedBatch) -> dict:
        """Per position of a selected message refused as unknown_feature (its values name a feature the names so
        far lack), those names, in first-seen order: the features are the union over the messages taken, as a
        sparse stream (a feature sent every 10th message, or first seen later) would otherwise have every message
        naming it skipped, and dead-lettered by the daemon serving the model. A message keyed with a blank name is
        left out (skipped as unknown_feature, as the daemon does)."""
        known, new = set(self.names), {}
        for pos, reason, _ in decoded.rejected:
            if reason != "unknown_feature":
                continue
            probe = _probe(records[pos], self._glob, self._max_bytes)
            if probe is None or probe[2] is None or not _in_range(probe[1], self._from_ms, self._to_ms):
                continue  # another stream's, or outside the time range: skipped as unknown_feature
            if not _names_problem(names := probe[2]) and (names := [name for name in names if name not in known]):
                new[pos] = names
        return new

    def nothing_selected(self, topic: str) -> str:
        """Why no event was selected from ``topic``, with what would help: the features, the events' times."""
        check = f": check --features {','.join(self.names)}" if self.names else ""
        why = f" ({self.n_rejected} messages skipped, the first as {self.first_rejection}{check})" \
            if self.n_rejected else ""
        if self.outside is not None:  # the range missed them: say where they are (in seconds, say)
            lo, hi = self.outside
            unit = " (times that look like seconds: ts is epoch milliseconds)" if hi < _MS_LOW else ""
            why += f"; the events' ts run from {lo} to {hi}{unit}"
        return f"no events of streams {self._glob!r} in {topic!r} for the given time range{why}"

    def series(self) -> list[np.ndarray]:
        """(T, F) per stream: its rows on a partition in offset order (without its late ones, as the daemon drops
        them), those of a stream read from several partitions (partitions added) joined by event time."""
        if not self._stream_index:
            return []
        width = len(self.names)  # rows decoded before a feature was first seen: NaN (missing) for it
        values = np.concatenate([np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=np.nan)
                                 for v in self._values])
        self._values = [values]  # the polls' arrays go: at most two copies of the values at a time
        streams, ts = np.concatenate(self._streams), np.concatenate(self._ts)
        order = np.lexsort((ts, streams))  # per stream (first kept first) by ts; stable: offset order on ties
        streams, ts, values = streams[order], ts[order], values[order]
        self._streams, self._ts, self._values = [streams], [ts], [values]  # kept sorted (a later add() sorts again)
        return np.split(values, np.flatnonzero(np.diff(streams)) + 1)

    def skipped(self) -> str | None:
        """What was skipped as the daemon would (dead-lettered, late), and the streams read from several
        partitions; None if neither."""
        parts = []
        if self.n_rejected:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.reasons.items()))
            parts.append(f"{self.n_rejected} the daemon dead-letters ({reasons}; first: {self.first_rejection})")
        if self.n_late:
            parts.append(f"{self.n_late} late (older than an earlier event of their stream on their partition, "
                         "dropped as the daemon does)")
        lines = [f"skipped {self.n_rejected + self.n_late} messages: {'; '.join(parts)}"] if parts else []
        if spread := sum(n > 1 for n in Counter(stream for stream, _ in self._newest).values()):
            lines.append(f"note: {spread} streams read from several partitions (partitions added?): each partition's "
                         "events taken in offset order, then joined by event time (none counted late across them)")
        return "\n".join(lines) or None
