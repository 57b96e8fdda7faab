"""Tests of pipelines.decode: formats, fallbacks, every rejection reason, grouping, randomized round trip."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from pipelines import decode, native_decode
from pipelines.dead_letters import dead_letter_headers
from pipelines.decode import REASONS, DecodedBatch, FeatureSpec, decode_batch
from tests.needs import need_cxx, unavailable

TS = 1764180000123
BROKER_TS = 1764180999000
SPEC2 = FeatureSpec(("temp", "vib"))
SPEC1 = FeatureSpec(("x",))
SPEC3 = FeatureSpec(("a", "b", "c"))
LOOKUP = {"pump-17": SPEC2, "pump-18": SPEC2, "uni-1": SPEC1, "tri-1": SPEC3}


@pytest.fixture(params=["native", "orjson", "stdlib"], autouse=True)
def parser(request, monkeypatch):
    """Run every test with the native decoder (which leaves all but the common shape to orjson), with orjson
    alone and with the standard-library fallback alone."""
    if request.param == "native":
        need_cxx()
        assert native_decode.load() is not None, native_decode._STATE.get("error")
    else:
        monkeypatch.setattr(decode, "_native_decoder", lambda: None)
    if request.param == "stdlib":
        monkeypatch.setattr(decode, "_loads", decode._stdlib_loads)
    elif decode.orjson is None:
        unavailable("orjson not installed (a dependency of the project: pip install -e .)")
    return request.param


def _encode(m: object) -> bytes:
    return m if isinstance(m, bytes) else json.dumps(m).encode()


def dec(msgs: list, keys: list | None = None, bts: list | None = None, max_bytes: int = 65536,
        lookup=LOOKUP.get) -> DecodedBatch:
    values = [None if m is None else _encode(m) for m in msgs]
    out = decode_batch(values, keys or [None] * len(msgs), bts or [BROKER_TS] * len(msgs), lookup, max_bytes)
    n_out = out.n_ok + len(out.rejected) + len(out.unrouted)
    assert n_out == len(msgs), "every message must be accounted for exactly once"
    return out


def one_reason(msg: object, key: bytes | None = None, **kw) -> tuple[str, str]:
    out = dec([msg], keys=[key], **kw)
    assert out.n_ok == 0 and len(out.rejected) == 1, out
    pos, reason, detail = out.rejected[0]
    assert pos == 0 and reason in REASONS
    return reason, detail


def only_row(out: DecodedBatch):
    (group,) = out.groups.values()
    assert len(group) == 1
    return group.stream[0], int(group.ts[0]), group.values[0]


# ---------------------------------------------------------------------------------------------- formats


def test_values_by_name():
    stream, ts, row = only_row(dec([{"stream": "pump-17", "ts": TS, "values": {"vib": 0.03, "temp": 71.2}}]))
    assert (stream, ts) == ("pump-17", TS)
    np.testing.assert_array_equal(row, np.array([71.2, 0.03], dtype=np.float32))


def test_values_in_feature_order():
    _, _, row = only_row(dec([{"stream": "pump-17", "ts": TS, "values": [71.2, 3]}]))
    np.testing.assert_array_equal(row, np.array([71.2, 3.0], dtype=np.float32))


def test_univariate_value():
    stream, ts, row = only_row(dec([{"stream": "uni-1", "ts": TS, "value": 0.93}]))
    assert stream == "uni-1" and ts == TS and row.tolist() == [np.float32(0.93)]


def test_extra_top_level_keys_ignored():
    assert dec([{"stream": "uni-1", "ts": TS, "value": 1, "labels": {"site": "a"}}]).n_ok == 1


@pytest.mark.parametrize("ts, expected", [
    (TS, TS),
    (float(TS) + 0.7, TS),
    ("2026-11-26T20:00:00Z", 1795723200000),
    ("2026-11-26T20:00:00.123Z", 1795723200123),
    ("2026-11-26T21:30:00+01:30", 1795723200000),
    ("2026-11-26T15:00:00-05:00", 1795723200000),
    (0, 0),
])
def test_timestamps(ts, expected):
    _, got, _ = only_row(dec([{"stream": "uni-1", "ts": ts, "value": 1.0}]))
    assert got == expected


@pytest.mark.parametrize("msg", [{"stream": "uni-1", "value": 1.0}, {"stream": "uni-1", "ts": None, "value": 1.0}])
def test_missing_ts_uses_broker_timestamp(msg):
    out = decode_batch([_encode(msg)], [None], np.array([BROKER_TS], dtype=np.int64), LOOKUP.get, 65536)
    assert only_row(out)[1] == BROKER_TS


def test_missing_ts_and_no_broker_timestamp_rejected():
    assert one_reason({"stream": "uni-1", "value": 1.0}, bts=[-1])[0] == "bad_timestamp"


def test_stream_from_message_key():
    out = dec([{"ts": TS, "value": 2.0}, {"stream": "uni-1", "ts": TS, "value": 3.0}], keys=[b"uni-1", b"pump-17"])
    group = out.groups[SPEC1]
    assert group.stream == ["uni-1", "uni-1"] and group.ok_index.tolist() == [0, 1]


def test_null_and_absent_features_become_nan():
    out = dec([{"stream": "tri-1", "ts": TS, "values": [1.0, None, 3]},
               {"stream": "tri-1", "ts": TS, "values": {"a": 1.0, "c": None}},
               {"stream": "uni-1", "ts": TS, "value": None}])
    tri = out.groups[SPEC3].values
    assert tri.shape == (2, 3) and tri.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(tri), [[False, True, False], [False, True, True]])
    assert np.isnan(out.groups[SPEC1].values[0, 0])


# ---------------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("msg, key, reason", [
    (b'{"stream": "uni-1", "value": 1.0}' + b" " * 100, None, "oversized"),
    (b'{"stream": "uni-\xff", "value": 1.0}', None, "bad_encoding"),
    ({"value": 1.0}, b"uni-\xff", "bad_encoding"),
    (b'{"stream": "uni-1", "value": ', None, "bad_json"),
    (b"", None, "bad_json"),
    (None, None, "bad_json"),
    (b'\xef\xbb\xbf{"stream": "uni-1", "value": 1.0}', None, "bad_json"),
    ([1, 2], None, "not_an_object"),
    ("uni-1", None, "not_an_object"),
    (b"5", None, "not_an_object"),
    ({"ts": TS, "value": 1.0}, None, "missing_stream"),
    ({"ts": TS, "value": 1.0}, b"", "missing_stream"),
    ({"stream": "", "ts": TS, "value": 1.0}, None, "missing_stream"),
    ({"stream": 17, "ts": TS, "value": 1.0}, None, "bad_value_type"),
    ({"stream": "uni-1\nCRITICAL forged", "ts": TS, "value": 1.0}, None, "bad_stream"),  # a forged log line
    ({"stream": "uni-\x7f", "ts": TS, "value": 1.0}, None, "bad_stream"),
    ({"stream": "uni-\x85", "ts": TS, "value": 1.0}, None, "bad_stream"),  # NEL, a C1 control
    ({"stream": "uni-1\u2028CRITICAL forged", "ts": TS, "value": 1.0}, None, "bad_stream"),  # a line separator
    ({"stream": "uni-\u202e1", "ts": TS, "value": 1.0}, None, "bad_stream"),  # a bidirectional override
    ({"ts": TS, "value": 1.0}, b"uni-1\r\n", "bad_stream"),
    (b'{"stream": "uni-\\ud800", "ts": 1764180000123, "value": 1.0}', None, "bad_encoding"),  # a lone surrogate
    ({"stream": "uni-1", "ts": True, "value": 1.0}, None, "bad_timestamp"),
    ({"stream": "uni-1", "ts": "2026-11-26T20:00:00", "value": 1.0}, None, "bad_timestamp"),
    ({"stream": "uni-1", "ts": "yesterday", "value": 1.0}, None, "bad_timestamp"),
    ({"stream": "uni-1", "ts": [TS], "value": 1.0}, None, "bad_timestamp"),
    ({"stream": "uni-1", "ts": 2**63, "value": 1.0}, None, "bad_timestamp"),
    ({"stream": "uni-1", "ts": TS}, None, "missing_values"),
    ({"stream": "pump-17", "ts": TS, "values": None}, None, "missing_values"),
    ({"stream": "pump-17", "ts": TS, "values": {}}, None, "missing_values"),
    ({"stream": "pump-17", "ts": TS, "values": ["71.2", 0.1]}, None, "bad_value_type"),
    ({"stream": "pump-17", "ts": TS, "values": {"temp": True}}, None, "bad_value_type"),
    ({"stream": "pump-17", "ts": TS, "values": [[1.0], 0.1]}, None, "bad_value_type"),
    ({"stream": "pump-17", "ts": TS, "values": "71.2,0.1"}, None, "bad_value_type"),
    ({"stream": "uni-1", "ts": TS, "value": [1.0]}, None, "bad_value_type"),
    ({"stream": "uni-1", "ts": TS, "value": False}, None, "bad_value_type"),
    ({"stream": "uni-1", "ts": TS, "value": 1.0, "values": [1.0]}, None, "bad_value_type"),
    (b'{"stream": "uni-1", "value": NaN}', None, "non_finite"),
    (b'{"stream": "pump-17", "values": [1.0, -Infinity]}', None, "non_finite"),
    (b'{"stream": "uni-1", "value": 1e999}', None, "non_finite"),
    ({"stream": "uni-1", "ts": TS, "value": 1e39}, None, "non_finite"),
    ({"stream": "uni-1", "ts": TS, "value": "NaN"}, None, "non_finite"),
    ({"stream": "pump-17", "ts": TS, "values": {"temp": "Infinity", "vib": 1.0}}, None, "non_finite"),
    ({"stream": "pump-17", "ts": TS, "values": [1.0, "-inf"]}, None, "non_finite"),
    ({"stream": "pump-17", "ts": TS, "values": {"temp": 1.0, "pressure": 2.0}}, None, "unknown_feature"),
    ({"stream": "pump-17", "ts": TS, "values": {"temp": 1.0, "vib": 1.0, "x": 2.0}}, None, "unknown_feature"),
    ({"stream": "pump-17", "ts": TS, "values": [1.0]}, None, "wrong_length"),
    ({"stream": "pump-17", "ts": TS, "values": [1.0, 2.0, 3.0]}, None, "wrong_length"),
    ({"stream": "pump-17", "ts": TS, "value": 1.0}, None, "wrong_length"),
])
def test_rejections(msg, key, reason):
    got, detail = one_reason(msg, key, max_bytes=100)
    assert (got, bool(detail)) == (reason, True), detail


def test_a_stream_id_longer_than_256_bytes_is_refused_and_256_taken():
    """Every distinct id is kept (window state, the routing cache): 5,000 ids of 64 KiB grew a daemon by 844 MB."""
    assert one_reason({"stream": "u" * 257, "ts": TS, "value": 1.0})[0] == "bad_stream"
    assert one_reason({"stream": "é" * 129, "ts": TS, "value": 1.0})[0] == "bad_stream"  # 258 bytes of UTF-8
    assert one_reason({"value": 1.0}, b"k" * 257)[0] == "bad_stream"
    for stream in (b"u" * 257, ("\u00e9" * 128 + "u").encode(), b"uni-\x7f", "uni-\x85".encode()):  # raw: native
        msg = b'{"stream":"' + stream + b'","ts":1764180000123,"values":[1.0]}'
        assert one_reason(msg, lookup=lambda s: SPEC1)[0] == "bad_stream"
    out = dec([{"stream": "u" * 256, "ts": TS, "values": [1.0]},
               ('{"stream":"' + "\u00e9" * 128 + '","ts":1764180000123,"values":[2.0]}').encode()],  # raw: native
              lookup=lambda s: SPEC1)
    assert out.n_ok == 2


def test_an_empty_message_or_a_tombstone_says_so():
    """The sources hand a null value (a tombstone) over as b"": the detail names it, not a JSON parse error."""
    for msg in (b"", None):
        assert one_reason(msg) == ("bad_json", "message has no value (empty, or a tombstone)")


def test_every_reason_is_exercised():
    reasons = {case[2] for case in test_rejections.pytestmark[0].args[1]}
    assert reasons == set(REASONS)


def test_an_integer_beyond_the_double_range_is_non_finite():
    """orjson refuses it as JSON, as it does 1e999: the classification says non_finite, not bad_json."""
    for digits in (b"1" + b"0" * 309, b"-9" + b"0" * 310, b"18" + b"0" * 307):
        got, detail = one_reason(b'{"stream": "uni-1", "value": ' + digits + b"}", max_bytes=1000)
        assert got == "non_finite", detail


def test_oversized_limit_is_inclusive():
    msg = b'{"stream": "uni-1", "value": 1.0}'
    assert dec([msg], max_bytes=len(msg)).n_ok == 1
    assert one_reason(msg, max_bytes=len(msg) - 1)[0] == "oversized"


def test_unrouted_and_rejected_positions_keep_input_order():
    out = dec([{"stream": "uni-1", "value": "x"}, {"stream": "nobody", "value": 1.0},
               {"stream": "uni-1", "value": 1e39}, {"stream": "uni-1", "value": 1.0}, b"{",
               {"stream": "nobody", "value": 2.0}])
    assert [r[:2] for r in out.rejected] == [(0, "bad_value_type"), (2, "non_finite"), (4, "bad_json")]
    assert out.unrouted == [(1, "nobody"), (5, "nobody")]
    assert out.groups[SPEC1].ok_index.tolist() == [3]


# ---------------------------------------------------------------------------------------------- grouping


def test_grouping_by_feature_spec():
    calls: list[str] = []
    same_as_spec2 = FeatureSpec(("temp", "vib"))  # equal names -> same group, although another object

    def lookup(stream: str) -> FeatureSpec | None:
        calls.append(stream)
        return same_as_spec2 if stream == "pump-18" else LOOKUP.get(stream)

    out = dec([{"stream": "pump-17", "ts": 1, "values": [1, 2]}, {"stream": "uni-1", "ts": 2, "value": 3},
               {"stream": "pump-18", "ts": 3, "values": {"temp": 4, "vib": 5}},
               {"stream": "tri-1", "ts": 4, "values": [6, 7, 8]}, {"stream": "pump-17", "ts": 5, "values": [9, 10]}],
              lookup=lookup)
    assert sorted(calls) == ["pump-17", "pump-18", "tri-1", "uni-1"]  # once per distinct stream
    assert set(out.groups) == {SPEC1, SPEC2, SPEC3}
    g = out.groups[SPEC2]
    assert g.ok_index.dtype == np.int64 and g.ts.dtype == np.int64
    assert g.ok_index.tolist() == [0, 2, 4] and g.stream == ["pump-17", "pump-18", "pump-17"]
    assert g.ts.tolist() == [1, 3, 5] and g.values.tolist() == [[1, 2], [4, 5], [9, 10]]
    assert out.groups[SPEC3].values.shape == (1, 3) and out.groups[SPEC1].values.tolist() == [[3.0]]


def test_spec_cache_asks_once_per_stream_across_batches():
    calls: list[str] = []

    def lookup(stream: str) -> FeatureSpec | None:
        calls.append(stream)
        return LOOKUP.get(stream)

    cache = decode.SpecCache(lookup, limit=3)
    msgs = [{"stream": "pump-17", "ts": 1, "values": [1, 2]}, {"stream": "nobody", "ts": 2, "value": 3}]
    for _ in range(3):
        out = dec(msgs + [{"stream": "uni-1", "ts": 3, "value": 4}], lookup=cache)
        assert out.groups[SPEC2].stream == ["pump-17"] and out.unrouted == [(1, "nobody")]
        assert out.groups[SPEC1].values.tolist() == [[4.0]]
    assert calls == ["pump-17", "nobody", "uni-1"]
    assert dict(cache) == {"pump-17": SPEC2, "nobody": None, "uni-1": SPEC1}  # unrouted is remembered too
    dec([{"stream": "uni-2", "ts": 4, "value": 5}], lookup=cache)  # a fourth: the cache starts afresh (bounded)
    assert dict(cache) == {"uni-2": None}  # (routed nowhere)
    dec(msgs, lookup=cache)
    assert calls[-2:] == ["pump-17", "nobody"]


def test_feature_spec():
    assert FeatureSpec(["a", "b"]) == FeatureSpec(("a", "b"))
    assert hash(FeatureSpec(["a", "b"])) == hash(FeatureSpec(("a", "b")))
    assert FeatureSpec(("a", "b")).index == {"a": 0, "b": 1}
    with pytest.raises(ValueError):
        FeatureSpec(("a", "a"))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="length"):
        decode_batch([b"{}"], [], [1], LOOKUP.get, 100)


def test_empty_batch():
    out = dec([])
    assert out.groups == {} and out.rejected == [] and out.unrouted == []


# ---------------------------------------------------------------------------------------------- round trip


def _random_message(rng: random.Random, spec: FeatureSpec, stream: str) -> tuple[dict, bytes | None, int, list]:
    """(message, key, expected ts, expected row with None for missing) of a random valid message."""
    row = [None if rng.random() < 0.1 else rng.choice([rng.uniform(-1e6, 1e6), rng.randint(-1000, 1000)])
           for _ in spec.names]
    msg: dict = {}
    key = None
    if rng.random() < 0.3:
        key = stream.encode()
    else:
        msg["stream"] = stream
    ts = rng.randint(0, 2**41)
    ts_form = rng.randrange(4)
    if ts_form == 1:
        msg["ts"] = ts
    elif ts_form == 2:
        msg["ts"] = ts + 0.25
    elif ts_form == 3:
        dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts)
        msg["ts"] = dt.isoformat(timespec="milliseconds").replace("+00:00", rng.choice(["Z", "+00:00"]))
    form = rng.randrange(3)
    if len(spec.names) == 1 and form == 0:
        msg["value"] = row[0]
    elif form == 1:
        msg["values"] = row
    else:
        named = {n: v for n, v in zip(spec.names, row, strict=True) if v is not None or rng.random() < 0.5}
        if not named:
            named = {spec.names[0]: None}
        items = list(named.items())
        rng.shuffle(items)
        msg["values"] = dict(items)
    return msg, key, (BROKER_TS if ts_form == 0 else ts), row


def test_randomized_round_trip():
    rng = random.Random(1234)
    specs = {f"s-{i}": FeatureSpec(tuple(f"f{j}" for j in range(i % 4 + 1))) for i in range(12)}
    cases = [_random_message(rng, specs[s], s) for s in rng.choices(sorted(specs), k=2000)]
    out = dec([c[0] for c in cases], keys=[c[1] for c in cases], lookup=specs.get)
    assert out.rejected == [] and out.unrouted == [] and out.n_ok == len(cases)
    for spec, group in out.groups.items():
        for pos, stream, ts, row in zip(group.ok_index.tolist(), group.stream, group.ts.tolist(), group.values,
                                        strict=True):
            msg, _, want_ts, want_row = cases[pos]
            assert specs[stream] == spec and ts == want_ts, msg
            want = np.array([math.nan if v is None else v for v in want_row], dtype=np.float32)
            np.testing.assert_array_equal(row, want, err_msg=str(msg))


# ---------------------------------------------------------------------------------------------- dead letters


def test_dead_letter_headers():
    headers = dead_letter_headers("bad_json", "x" * 2000, "sensors", 3, 123456789)
    assert [k for k, _ in headers] == ["anomalyd-error-reason", "anomalyd-error-detail", "anomalyd-source-topic",
                                       "anomalyd-source-partition", "anomalyd-source-offset"]
    values = dict(headers)
    assert all(isinstance(v, bytes) for v in values.values())
    assert values["anomalyd-error-reason"] == b"bad_json" and values["anomalyd-source-topic"] == b"sensors"
    assert values["anomalyd-source-partition"] == b"3" and values["anomalyd-source-offset"] == b"123456789"
    assert len(values["anomalyd-error-detail"].decode()) == 500
    assert dict(dead_letter_headers("oversized", "short", "t", 0, 0))["anomalyd-error-detail"] == b"short"
    # the source record's timestamp, where it has one (-1: none, as kafka-python gives a v0 record)
    assert dict(dead_letter_headers("bad_json", "d", "t", 0, 5, 1764180000123))["anomalyd-source-timestamp"] == \
        b"1764180000123"
    assert "anomalyd-source-timestamp" not in dict(dead_letter_headers("bad_json", "d", "t", 0, 5, -1))


def test_dead_letter_copy_keeps_what_fits_the_producers_limit():
    from pipelines.dead_letters import dead_letter_copy

    ours = dead_letter_headers("oversized", "big", "t", 0, 7)
    value, key, headers = dead_letter_copy(b"v" * 10, b"k", [("trace", b"1")], ours)
    assert (value, key, headers) == (b"v" * 10, b"k", [("trace", b"1"), *ours])  # the original's first
    big = [(f"h{i}", b"x" * 1000) for i in range(20)]  # 20 KB of original headers: left out, and said so
    value, key, headers = dead_letter_copy(b"v" * 1_000_000, b"k" * 20_000, big, ours)
    assert len(value) == 900_000 and key == b"k" * 16_384
    assert headers == [*ours, ("anomalyd-original-headers-bytes", b"20250"),  # 20,050 and 20 headers' framing
                       ("anomalyd-original-value-bytes", b"1000000"), ("anomalyd-original-key-bytes", b"20000")]
    # counted in bytes on the wire: 4,000 four-byte names with empty values (a producer's 64 KB, not 4,000 "chars")
    emoji = [("\U0001f600", b"")] * 4000
    assert dead_letter_copy(b"v", None, emoji, ours)[2] == [*ours, ("anomalyd-original-headers-bytes", b"56000")]
    framed = [("h", b"")] * 1500  # 1,500 bytes of names, and 1,500 headers' framing: over 16 KiB
    assert dead_letter_copy(b"v", None, framed, ours)[2][-1] == ("anomalyd-original-headers-bytes", b"16500")


@pytest.mark.parametrize(("raw", "reason"), [
    (b'{"stream": "pump-17", "x": "\\ud800", "values": [1, 2]}', "bad_encoding"),  # lone surrogate, ignored key
    (b'{"stream": "pump-17", "x": "\\udc00", "values": [1, 2]}', "bad_encoding"),
    (b'{"stream": "pump-17", "values": {"\\ud800": 1}}', "bad_encoding"),
    (b'{"stream": "pump-17", "values": ["\\ud800", 2]}', "bad_encoding"),
    (b'{"stream": "\\ud800", "stream": "pump-17", "values": [1, 2]}', "bad_encoding"),  # overwritten by its twin
    (b'{"stream": "pump-17", "x": ["\\udc00"], "x": 0, "values": [1, 2]}', "bad_encoding"),
    (b'{"stream": "pump-17", "x": 1e400, "values": [1, 2]}', "non_finite"),  # ignored key, beyond a double
    (b'{"stream": "pump-17", "x": ' + b"9" * 400 + b', "values": [1, 2]}', "non_finite"),
    (b'{"stream": "pump-17", "ts": 1e400, "values": [1, 2]}', "non_finite"),
    (b'{"stream": "pump-17", "ts": -9223372036854775809, "values": [1, 2]}', "bad_timestamp"),  # below int64
])
def test_every_parser_refuses_the_same_messages_for_the_same_reason(raw, reason):
    """The standard module took lone surrogates and numbers beyond a double where orjson refuses them, and orjson's
    float for an integer below int64 rounded into range: one message, two outcomes by what was installed."""
    assert one_reason(raw)[0] == reason
    assert dec([b'{"stream": "pump-17", "x": "\\ud83d\\ude00 \\\\ud800", "values": [1, 2]}']).n_ok == 1  # a pair;
    # an escaped backslash before "ud800" is text


def test_a_long_mantissa_with_a_two_digit_exponent_is_beyond_a_double_for_every_parser():
    raw = b'{"stream": "pump-17", "x": ' + b"9" * 250 + b'e99, "values": [1, 2]}'
    assert one_reason(raw)[0] == "non_finite"
