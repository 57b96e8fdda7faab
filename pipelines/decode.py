"""Decoding of sensor messages (JSON, UTF-8) from Kafka, one whole poll batch per call.

Accepted formats (extra top-level keys are ignored)::

    {"stream": "pump-17", "ts": 1764180000123, "values": {"temp": 71.2, "vib": 0.03}}   # by feature name
    {"stream": "pump-17", "ts": "2026-11-26T20:00:00Z", "values": [71.2, 0.03]}      # in feature order
    {"stream": "pump-17", "ts": 1764180000123, "value": 0.93}                         # univariate

``ts`` is epoch milliseconds (int, or float truncated) or an ISO 8601 string with ``Z`` or an offset; missing or
null -> the broker timestamp. Missing ``stream`` -> the message key (UTF-8). A feature that is null, or absent
from a ``values`` object, becomes NaN (the window buffer carries the last value forward). Everything else that
cannot be decoded or validated is rejected with one of :data:`REASONS` (a bounded set, usable as a metric label)
for the dead-letter topic (:mod:`pipelines.dead_letters` builds those messages).

Messages of the common shapes (``stream``, integer ``ts``, ``values`` array or object, nothing else) are parsed
by the native decoder of :mod:`pipelines.native_decode` when it is built; every other message, and every error,
by ``orjson`` when importable (extra ``fast``), else the standard ``json`` module. The results are the same
either way, but for JSON nested about 1,000 deep (orjson takes up to 1,023 levels; the standard module stops at
Python's recursion limit, a little sooner, and such a message is dead-lettered as ``bad_json``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType

import numpy as np

from . import native_decode
from .native_decode import decode_common

try:
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

REASONS = ("oversized", "bad_encoding", "bad_json", "not_an_object", "missing_stream", "bad_stream", "bad_timestamp",
           "missing_values", "bad_value_type", "non_finite", "unknown_feature", "wrong_length")
"""Every reason a message can be rejected for."""

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
MAX_STREAM_BYTES = 256  # a stream id's UTF-8 bytes; as native_decode's (every distinct id is held in memory)
# control characters (a newline in an id forged log lines), and the line and paragraph separators and bidirectional
# controls that some log viewers take as line breaks or use to reorder what follows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_NUMBER_TYPES = frozenset({float, int, type(None)})  # None -> NaN; bool is not int here (type(True) is bool)
_NON_FINITE_WORDS = frozenset({"nan", "inf", "infinity"})


@dataclass(frozen=True)
class FeatureSpec:
    """The ordered feature names of the models a stream is routed to. Equal (and hashed) by ``names``;
    ``index`` maps a name to its column and is derived from ``names`` when not given."""

    names: tuple[str, ...]
    index: dict[str, int] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"feature names must be non-empty and unique, got {self.names}")
        if self.index is None:
            object.__setattr__(self, "index", {name: j for j, name in enumerate(self.names)})


class SpecCache(dict):
    """stream -> :class:`FeatureSpec` or None (unrouted), asked of ``lookup`` once per stream and kept. Pass one
    that lives across batches to :func:`decode_batch`: a known stream then costs one dict lookup instead of a call
    per distinct stream in every batch (at 100,000 streams, every event). At ``limit`` streams it starts afresh:
    ids come and go (and a producer may send any number of them), the streams in use are looked up again."""

    def __init__(self, lookup: Callable[[str], FeatureSpec | None], limit: int = 500_000) -> None:
        super().__init__()
        self._lookup, self._limit = lookup, limit

    def __missing__(self, stream: str) -> FeatureSpec | None:
        spec = self._lookup(stream)
        if len(self) >= self._limit:
            self.clear()
        self[stream] = spec
        return spec


@dataclass
class DecodedGroup:
    """The valid messages of one batch whose streams share a :class:`FeatureSpec`, in input order."""

    spec: FeatureSpec
    ok_index: np.ndarray  # (N,) int64, positions in the input batch
    stream: list[str]  # (N)
    ts: np.ndarray  # (N,) int64, epoch milliseconds
    values: np.ndarray  # (N, F) float32, NaN = missing

    def __len__(self) -> int:
        return len(self.stream)

    def take(self, rows: np.ndarray) -> DecodedGroup:
        """The group of these rows (int64 (K,)), in that order."""
        return DecodedGroup(self.spec, self.ok_index[rows], [self.stream[j] for j in rows.tolist()], self.ts[rows],
                            self.values[rows])


@dataclass
class DecodedBatch:
    """Result of :func:`decode_batch`: valid messages grouped by feature spec, rejected messages as
    ``(position, reason, detail)`` in input order, and messages of unrouted streams as ``(position, stream)``."""

    groups: dict[FeatureSpec, DecodedGroup]
    rejected: list[tuple[int, str, str]]
    unrouted: list[tuple[int, str]]
    n_native: int = 0  # messages the native decoder took (the rest went through the Python decoder)

    @property
    def n_ok(self) -> int:
        return sum(len(g) for g in self.groups.values())


class _Reject(Exception):
    """A message fails validation for ``reason`` (one of REASONS)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _NonFinite(ValueError):
    """The standard json module met NaN, Infinity or a float literal that overflows."""


def _reject_constant(word: str) -> float:
    raise _NonFinite(f"non-finite number literal {word}")


def _checked_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise _NonFinite(f"number {text[:40]} overflows a double")
    return x


_MAX_DOUBLE = int(sys.float_info.max)


def _checked_int(text: str) -> int:
    """An integer literal; one beyond the double range is non_finite as its float spelling is (orjson refuses both
    as JSON, so the classification must say which)."""
    try:
        x = int(text)
    except ValueError:  # more digits than Python converts (4,300): far beyond a double too
        raise _NonFinite(f"number {text[:40]}... overflows a double") from None
    if abs(x) > _MAX_DOUBLE:
        raise _NonFinite(f"number {text[:40]}... overflows a double")
    return x


def _stdlib_loads(raw: bytes) -> object:
    """The parser used without orjson, refusing what orjson refuses: NaN/Infinity literals, numbers beyond a double
    (non_finite) and, in any string or key, a lone surrogate (bad_encoding), which the standard module takes."""
    text = bytes(raw).decode("utf-8")
    obj = json.loads(text, parse_constant=_reject_constant)
    if _BIG_EXPONENT.search(raw) or (len(raw) > 210 and _LONG_DIGITS.search(raw)):  # a number beyond a double
        # may be there: parsed again, checking each number (hooks for every message cost it 1.4x)
        json.loads(text, parse_constant=_reject_constant, parse_float=_checked_float, parse_int=_checked_int)
    if _SURROGATE_ESCAPE.search(raw):  # only an escape can spell a lone surrogate in valid UTF-8
        try:  # every pair kept (a key given twice drops its first value from obj, but orjson refuses it too)
            everything = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=lambda pairs: pairs)
            json.dumps(everything, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a lone surrogate in a string (not valid Unicode)") from None
    return obj


# A double overflows at 1.8e308: a number needs an exponent of 3 digits, or 210 digits or more (with an exponent of
# at most 99). Apart, the two searches cost half what one alternation does.
_BIG_EXPONENT = re.compile(rb"[eE][+-]?[0-9]{3}")
_LONG_DIGITS = re.compile(rb"[0-9]{210}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff (an escaped backslash too: checked then)


_loads: Callable[[bytes], object] = orjson.loads if orjson is not None else _stdlib_loads


def decode_batch(
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None],
    broker_ts: Sequence[int] | np.ndarray,
    feature_lookup: Callable[[str], FeatureSpec | None] | SpecCache,
    max_bytes: int,
) -> DecodedBatch:
    """Decode and validate one poll batch.

    ``values``, ``keys`` and ``broker_ts`` (epoch ms; < 0 = unknown) are parallel per message.
    ``feature_lookup(stream)`` gives the stream's feature spec (None = unrouted); it is called once per distinct
    stream per batch, or once per stream while a :class:`SpecCache` passed here keeps its answers. Messages
    longer than ``max_bytes`` are rejected as ``oversized``."""
    n = len(values)
    if len(keys) != n or len(broker_ts) != n:
        raise ValueError(f"values, keys and broker_ts differ in length: {n}, {len(keys)}, {len(broker_ts)}")
    bts = broker_ts.tolist() if isinstance(broker_ts, np.ndarray) else broker_ts
    specs = feature_lookup if isinstance(feature_lookup, SpecCache) else SpecCache(feature_lookup)
    accs: dict[FeatureSpec, tuple[list, list, list, list]] = {}  # positions, streams, ts, flat values
    rejected: list[tuple[int, str, str]] = []
    unrouted: list[tuple[int, str]] = []
    fast: dict = {}
    positions: Sequence[int] = range(n)
    native = _native_decoder() if n else None
    if native is not None:
        fast, unrouted, positions = decode_common(native, values, max_bytes, specs.__getitem__, _columns)
    loads, number_types = _loads, _NUMBER_TYPES
    for i in positions:  # every message, or those the native decoder left (any other shape, and every error)
        raw = values[i]
        try:
            if raw is None or not len(raw):  # the sources hand a null value over as b""
                raise _Reject("bad_json", "message has no value (empty, or a tombstone)")
            if len(raw) > max_bytes:
                raise _Reject("oversized", f"{len(raw)} bytes > max_message_bytes {max_bytes}")
            try:
                obj = loads(raw)
            except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
                raise _parse_error(raw) from None
            if type(obj) is not dict:
                raise _Reject("not_an_object", f"expected a JSON object, got {_json_type(obj)}")
            stream = obj.get("stream")
            if type(stream) is not str or not stream:
                stream = _stream_from_key(stream, keys[i])
            if len(stream) > MAX_STREAM_BYTES // 4 or not stream.isprintable():  # else it cannot fail the checks
                _check_stream(stream)
            ts = obj.get("ts")
            if type(ts) is not int or not _I64_MIN <= ts <= _I64_MAX:
                ts = _broker_ts(bts[i]) if ts is None else _parse_ts(ts)
            spec = specs[stream]
            if spec is None:
                unrouted.append((i, stream))
                continue
            vals = obj.get("values")  # fast paths: complete list or object of numbers/nulls, else _values_row
            if type(vals) is list and len(vals) == len(spec.names):
                row = vals
            elif type(vals) is dict and len(vals) == len(spec.names) and vals.keys() == spec.index.keys():
                row = list(map(vals.__getitem__, spec.names))
            else:
                row = [obj["value"]] if vals is None and len(spec.names) == 1 and "value" in obj else None
            if row is None or not number_types.issuperset(map(type, row)) or ("value" in obj) == ("values" in obj):
                row = _values_row(obj, spec)
        except _Reject as r:
            rejected.append((i, r.reason, r.detail))
            continue
        acc = accs.get(spec)
        if acc is None:
            acc = accs[spec] = ([], [], [], [])
        acc[0].append(i)
        acc[1].append(stream)
        acc[2].append(ts)
        acc[3].extend(row)
    groups = {spec: DecodedGroup(spec, *rows) for spec, rows in fast.items()}
    for spec, acc in accs.items():
        group = _finish_group(spec, *acc, rejected)
        groups[spec] = _merged(groups[spec], group) if spec in groups else group
    rejected.sort()
    unrouted.sort()
    return DecodedBatch({s: g for s, g in groups.items() if len(g)}, rejected, unrouted, n - len(positions))


def _native_decoder() -> ModuleType | None:
    """The native decoder, or None (off, unavailable, or a test forcing the Python path)."""
    return native_decode.load()


def _columns(spec: FeatureSpec) -> dict[str, int]:
    return spec.index


def _merged(a: DecodedGroup, b: DecodedGroup) -> DecodedGroup:
    """One group of the rows of ``a`` and ``b`` (each in input order), in input order."""
    both = DecodedGroup(a.spec, np.concatenate([a.ok_index, b.ok_index]), a.stream + b.stream,
                        np.concatenate([a.ts, b.ts]), np.concatenate([a.values, b.values]))
    return both.take(np.argsort(both.ok_index, kind="stable"))


# ---------------------------------------------------------------------------------------------- slow paths


def _short(v: object, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(v: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _parse_error(raw: bytes) -> _Reject:
    """Classify a message the fast parser refused: bad_encoding, non_finite or bad_json."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Reject("bad_encoding", f"not valid UTF-8: {exc}")
    try:
        json.loads(text, parse_constant=_reject_constant, parse_float=_checked_float, parse_int=_checked_int)
    except _NonFinite as exc:
        return _Reject("non_finite", str(exc))
    except (ValueError, RecursionError) as exc:
        return _Reject("bad_json", f"invalid JSON: {exc}")
    try:
        _loads(raw)
    except (ValueError, RecursionError) as exc:  # orjson refuses a lone surrogate, as the standard module's path
        reason = "bad_encoding" if "surrogate" in str(exc) else "bad_json"  # does (_check_stream)
        return _Reject(reason, f"invalid JSON: {exc}")
    return _Reject("bad_json", "invalid JSON")  # pragma: no cover - the fast parser refused it before


def _check_stream(stream: str) -> None:
    """At most MAX_STREAM_BYTES of UTF-8 and no control character: ids are held in memory (every distinct one)
    and written to logs, so a producer must not be able to grow the one without bound or forge lines in the other."""
    try:
        n = len(stream.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: the standard json module takes "\ud800"; no sink can write it
        raise _Reject("bad_encoding", f"stream id is not valid Unicode (a lone surrogate): {stream[:60]!r}") from None
    if n > MAX_STREAM_BYTES:
        raise _Reject("bad_stream", f"stream id of {n} bytes, at most {MAX_STREAM_BYTES}: {_short(stream)}")
    if _CONTROL.search(stream):
        raise _Reject("bad_stream", f"stream id with a control, line-separator or bidirectional character: "
                                    f"{stream[:60]!r}")


def _stream_from_key(stream: object, key: bytes | None) -> str:
    """The stream id when the message has no usable ``stream``: the Kafka key, if any."""
    if stream is not None and type(stream) is not str:
        raise _Reject("bad_value_type", f"stream must be a string, got {_json_type(stream)}")
    if not key:
        raise _Reject("missing_stream", "no 'stream' in the message and no message key")
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject("bad_encoding", f"message key is not valid UTF-8: {_short(bytes(key))}") from None


def _broker_ts(ts: int | None) -> int:
    if ts is None or ts < 0:
        raise _Reject("bad_timestamp", "no 'ts' in the message and no broker timestamp")
    return int(ts)


def _parse_ts(ts: object) -> int:
    """Epoch milliseconds from a float, an out-of-range int or an ISO 8601 string; rejects everything else."""
    if type(ts) is str:
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            raise _Reject("bad_timestamp", f"not an ISO 8601 timestamp: {_short(ts)}") from None
        if dt.tzinfo is None:
            raise _Reject("bad_timestamp", f"timestamp {_short(ts)} has no timezone (add Z or an offset)")
        return (dt - _EPOCH) // _MS
    if type(ts) is float and math.isfinite(ts) and _I64_MIN < ts < _I64_MAX:  # orjson reads an integer beyond
        return int(ts)  # int64 as a float: -2**63 - 1 rounds to -2**63, refused as the standard module's int is
    if type(ts) in (int, float):
        raise _Reject("bad_timestamp", f"timestamp {_short(ts)} is out of range")
    raise _Reject("bad_timestamp", f"ts must be epoch milliseconds or an ISO 8601 string, got {_json_type(ts)}")


def _values_row(obj: dict, spec: FeatureSpec) -> list:
    """The message's F feature values (numbers or None) in ``spec`` order, or a rejection."""
    names = spec.names
    if "value" in obj:
        if "values" in obj:
            raise _Reject("bad_value_type", "message has both 'value' and 'values'")
        v = obj["value"]
        if type(v) in (list, dict):
            raise _Reject("bad_value_type", f"'value' must be a number or null, got {_json_type(v)}")
        if len(names) != 1:
            raise _Reject("wrong_length", f"univariate 'value' but the stream's models take {len(names)} features")
        row = [v]
    else:
        vals = obj.get("values")
        if vals is None:
            raise _Reject("missing_values", "message has no 'values' (or 'value')")
        if type(vals) is list:
            if len(vals) != len(names):
                raise _Reject("wrong_length", f"{len(vals)} values for {len(names)} features {list(names)}")
            row = vals
        elif type(vals) is dict:
            row = _row_from_object(vals, spec)
        else:
            raise _Reject("bad_value_type", f"'values' must be an array or an object, got {_json_type(vals)}")
    if not _NUMBER_TYPES.issuperset(map(type, row)):
        for name, v in zip(names, row, strict=True):
            if type(v) not in _NUMBER_TYPES:
                if type(v) is str and v.strip().lstrip("+-").lower() in _NON_FINITE_WORDS:
                    raise _Reject("non_finite", f"feature {name!r}: {_short(v)} is not a finite number")
                raise _Reject("bad_value_type", f"feature {name!r}: expected a number or null, got {_json_type(v)}")
    return row


def _row_from_object(vals: dict, spec: FeatureSpec) -> list:
    """Values by feature name -> row in ``spec`` order, absent features as None."""
    if not vals:
        raise _Reject("missing_values", "'values' is an empty object")
    if len(vals) == len(spec.names) and vals.keys() == spec.index.keys():
        return list(map(vals.__getitem__, spec.names))
    row: list = [None] * len(spec.names)
    index = spec.index
    for name, v in vals.items():
        j = index.get(name)
        if j is None:
            raise _Reject("unknown_feature", f"unknown feature {_short(name)}; expected some of {list(spec.names)}")
        row[j] = v
    return row


def _finish_group(spec: FeatureSpec, pos: list, streams: list, ts: list, flat: list,
                  rejected: list[tuple[int, str, str]]) -> DecodedGroup:
    """Arrays of one group; rows with a value that is infinite or overflows float32 move to ``rejected``."""
    f = len(spec.names)
    try:
        wide = np.array(flat, dtype=np.float64)  # None -> NaN
    except OverflowError:  # an integer beyond the double range (standard json parser only)
        wide = np.array([x if type(x) is not int or abs(x) < 2**1023 else math.inf for x in flat], dtype=np.float64)
    with np.errstate(over="ignore"):
        values = wide.reshape(-1, f).astype(np.float32)  # (N, F)
    bad = np.isinf(values).any(axis=1)  # (N,)
    if bad.any():
        for r in np.flatnonzero(bad).tolist():
            detail = f"a value of {list(spec.names)} is infinite or beyond the float32 range"
            rejected.append((pos[r], "non_finite", detail))
        keep = ~bad
        values = values[keep]
        pos = [p for p, k in zip(pos, keep.tolist(), strict=True) if k]
        streams = [s for s, k in zip(streams, keep.tolist(), strict=True) if k]
        ts = [t for t, k in zip(ts, keep.tolist(), strict=True) if k]
    return DecodedGroup(spec, np.array(pos, dtype=np.int64), streams, np.array(ts, dtype=np.int64), values)
