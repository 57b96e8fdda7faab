"""The native decoder (pipelines/_decode_fast.cpp): it takes the common message shape, hands everything else to
the Python decoder, and decode_batch's results are the same with it and without it, message for message."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipelines import decode, native_decode
from pipelines.decode import DecodedBatch, FeatureSpec, decode_batch

pytestmark = pytest.mark.usefixtures("cxx")

SPEC8 = FeatureSpec(tuple(f"f{j}" for j in range(8)))
SPEC2 = FeatureSpec(("temp", "vib"))
LOOKUP = {"s8": SPEC8, "é8": SPEC8, "s2": SPEC2, "x2": SPEC2}


@pytest.fixture(scope="module")
def module():
    m = native_decode.load()
    assert m is not None, native_decode._STATE.get("error")
    return m


def _number(rng: random.Random) -> str:
    """A JSON number in one of many spellings, or null."""
    x = rng.choice([0.0, -0.0, 1.0, rng.uniform(-5, 5), rng.uniform(-1e6, 1e6), rng.expovariate(1) * 1e-30])
    return rng.choice([
        repr(x), f"{x:.3f}", f"{x:e}", f"{x:E}", f"{x:.17g}", str(int(x)), "null", "-0", "0.5e+3", "1E-2",
        "3.4028235e38", "1e-50", "123456789012345678", "9007199254740993",
    ])


def _values_object(rng: random.Random, names: tuple[str, ...], ws) -> str:
    """A values object: every name in spec order, or shuffled, some absent, now and then an unknown or repeated
    name (the Python decoder rejects the unknown; the repeated keeps its last value)."""
    chosen = list(names)
    r = rng.random()
    if r < 0.3:
        rng.shuffle(chosen)
    elif r < 0.5:
        chosen = rng.sample(chosen, rng.randint(1, len(chosen)))
    elif r < 0.55:
        chosen.append(rng.choice(["zz", "é", names[0].upper()]))
    elif r < 0.6:
        chosen.insert(rng.randrange(len(chosen) + 1), rng.choice(names))
    return "{" + ",".join(f'{ws()}"{n}"{ws()}:{ws()}{_number(rng)}{ws()}' for n in chosen) + "}"


def _common(rng: random.Random, stream: str, width: int, names: tuple[str, ...] | None = None) -> bytes:
    """A message of a common shape (values as an array of ``width``, or an object of ``names``), keys in any
    order, whitespace anywhere."""
    ws = lambda: rng.choice(["", "", " ", "\n", "\t ", "\r\n"])  # noqa: E731
    values = ("[" + ws() + ",".join(ws() + _number(rng) + ws() for _ in range(width)) + "]" if names is None
              else _values_object(rng, names, ws))
    parts = {
        "stream": json.dumps(stream, ensure_ascii=False),
        "ts": str(rng.choice([1764180000123, 0, -5, 123456789012345678])),
        "values": values,
    }
    keys = list(parts)
    rng.shuffle(keys)
    body = ",".join(f'{ws()}"{k}"{ws()}:{ws()}{parts[k]}{ws()}' for k in keys)
    return f"{ws()}{{{body}}}{ws()}".encode()


# Messages the native decoder must hand back, each with what is unusual about it; the Python decoder accepts some
# and rejects the others.
UNUSUAL = [
    b'{"stream":"s8","ts":1.5,"values":[1,2,3,4,5,6,7,8]}',  # float ts
    b'{"stream":"s8","ts":"2026-11-26T20:00:00Z","values":[1,2,3,4,5,6,7,8]}',  # ISO ts
    b'{"stream":"s8","ts":null,"values":[1,2,3,4,5,6,7,8]}',
    b'{"stream":"s8","values":[1,2,3,4,5,6,7,8]}',  # no ts: the broker's
    b'{"ts":1,"values":[1,2,3,4,5,6,7,8]}',  # no stream: the key
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,8],"unit":"C"}',  # another key
    b'{"stream":"s\\u00388","ts":1,"values":[1,2,3,4,5,6,7,8]}',  # an escape
    b'{"stream":"s8","stream":"s2","ts":1,"values":[1,2]}',  # a key twice
    b'{"stream":"s8","ts":12345678901234567890,"values":[1,2,3,4,5,6,7,8]}',  # ts beyond 18 digits
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,1e39]}',  # beyond float32
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,1e400]}',  # beyond double
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,NaN]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,"8"]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,true]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,08]}',  # a leading zero
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,.5]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,1.]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,+1]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,123456789012345678901234]}',
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7]}',  # one value short
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,8,]}',
    b'{"stream":"s8","ts":1,"values":[]}',
    b'{"stream":"s8","ts":1,"values":{}}',
    b'{"stream":"s8","ts":1,"values":{"f0":1,"f0":2}}',  # a name twice: the last value, in Python
    b'{"stream":"s8","ts":1,"values":{"f0":1,"zz":2}}',  # an unknown name
    b'{"stream":"s8","ts":1,"values":{"f\\u0030":1}}',  # an escape in a name
    b'{"stream":"s8","ts":1,"values":{"f0":[1]}}',
    b'{"stream":"s8","ts":1,"values":{"\xff":1}}',  # a name that is not UTF-8
    b'{"stream":"s8","ts":1,"value":1}',
    b'{"stream":"","ts":1,"values":[1,2,3,4,5,6,7,8]}',
    b'{"stream":"\xff8","ts":1,"values":[1,2,3,4,5,6,7,8]}',  # not UTF-8
    b'{"stream":"s\t8","ts":1,"values":[1,2,3,4,5,6,7,8]}',  # a raw control character
    '{"stream":"s8\u2028","ts":1,"values":[1,2,3,4,5,6,7,8]}'.encode(),  # a line separator, raw
    '{"stream":"s8\u202e","ts":1,"values":[1,2,3,4,5,6,7,8]}'.encode(),  # a bidirectional override, raw
    '{"stream":"s8\u2069","ts":1,"values":[1,2,3,4,5,6,7,8]}'.encode(),
    '{"stream":"s8\u061c","ts":1,"values":[1,2,3,4,5,6,7,8]}'.encode(),  # the Arabic letter mark, a bidi control
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,8]}x',  # trailing bytes
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,8]',  # truncated
    b'{"stream":"s8","ts":1,"values":[1,2,3,4,5,6,7,8]}{}',
    b'[1,2]',
    b'{}',
    b'',
    None,  # a tombstone
    b'{"stream":"nobody","ts":1,"values":[1]}',  # unrouted, and of the common shape: native, then unrouted
    b'{"stream":"s2","ts":1,"values":[1,2,3,4,5,6,7,8]}',  # common shape, but 8 values for 2 features
]


def _same(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.rejected == b.rejected
    assert a.unrouted == b.unrouted
    assert set(a.groups) == set(b.groups)
    for spec, ga in a.groups.items():
        gb = b.groups[spec]
        assert ga.ok_index.tolist() == gb.ok_index.tolist()
        assert ga.stream == gb.stream
        assert ga.ts.dtype == gb.ts.dtype == np.int64 and ga.ts.tolist() == gb.ts.tolist()
        assert ga.values.dtype == gb.values.dtype == np.float32 and ga.values.shape == gb.values.shape
        nan = np.isnan(ga.values)
        assert (nan == np.isnan(gb.values)).all()
        assert (ga.values.view(np.uint32)[~nan] == gb.values.view(np.uint32)[~nan]).all()  # bits: -0.0 is not 0.0
        assert ga.values.flags.c_contiguous


def _both(values: list, max_bytes: int = 65536, monkeypatch=None) -> tuple[DecodedBatch, DecodedBatch]:
    keys = [b"s8"] * len(values)
    bts = np.full(len(values), 1764180999000, dtype=np.int64)
    native = decode_batch(values, keys, bts, LOOKUP.get, max_bytes)
    monkeypatch.setattr(decode, "_native_decoder", lambda: None)
    python = decode_batch(values, keys, bts, LOOKUP.get, max_bytes)
    monkeypatch.undo()
    return native, python


def test_the_common_shape_is_decoded_natively_and_everything_else_is_handed_back(module):
    rng = random.Random(1)
    def columns(spec):
        return spec.index

    common = [_common(rng, rng.choice(["s8", "é8"]), 8) for _ in range(200)]
    common += [f'{{"stream":"s2","ts":{t},"values":{{"vib":{t},"temp":null}}}}'.encode() for t in range(100)]
    groups, unrouted, slow = native_decode.decode_common(module, common, 65536, LOOKUP.get, columns)
    assert slow == [] and unrouted == [] and len(groups[SPEC8][1]) == 200
    assert groups[SPEC2][3][:, 1].tolist() == list(range(100)) and np.isnan(groups[SPEC2][3][:, 0]).all()
    groups, unrouted, slow = native_decode.decode_common(module, UNUSUAL, 65536, LOOKUP.get, columns)
    assert slow == list(range(len(UNUSUAL) - 2)) + [len(UNUSUAL) - 1]  # all but the unrouted one
    assert unrouted == [(len(UNUSUAL) - 2, "nobody")] and not groups
    _, _, slow = native_decode.decode_common(module, common[:3], len(common[1]) - 1, LOOKUP.get, columns)
    assert 1 in slow  # over max_bytes: the Python decoder rejects it as oversized


def test_messages_that_fail_after_their_values_take_no_layout_slot(module):
    """The decoder keeps at most 256 distinct values-object layouts per batch; 256 messages that fail after their
    values object (an extra key) used them all, and every later valid one went to the Python decoder."""
    junk = [f'{{"stream":"s2","ts":1,"values":{{"k{i}":1}},"x":1}}'.encode() for i in range(300)]
    valid = b'{"stream":"s2","ts":2,"values":{"vib":3.0,"temp":4.0}}'
    groups, _, slow = native_decode.decode_common(module, [*junk, valid], 65536, LOOKUP.get, lambda s: s.index)
    assert slow == list(range(300)) and groups[SPEC2][3].tolist() == [[4.0, 3.0]]


def test_layouts_of_long_names_past_the_batchs_budget_go_to_the_python_decoder(module, monkeypatch):
    """Messages sharing 255 long names and differing in the last: each was compared in full with every layout kept
    so far (10x the Python decoder's time). Layouts hold at most 1 MiB of names per batch; the rest go to Python,
    with the same results."""
    shared = [f"{'n' * 247}{j:03d}" for j in range(255)]
    spec = FeatureSpec(tuple(shared) + tuple(f"z{i}" for i in range(40)))
    body = ",".join(f'"{name}":1' for name in shared)
    values = [f'{{"stream":"s","ts":1,"values":{{{body},"z{i}":{i}}}}}'.encode() for i in range(40)]
    lookup = {"s": spec}.get
    _, _, slow = native_decode.decode_common(module, values, 1 << 20, lookup, lambda s: s.index)
    assert (1 << 20) // (255 * 250 + len("z0")) == 16 and slow == list(range(16, 40))
    args = (values, [b"s"] * 40, np.zeros(40, np.int64), lookup, 1 << 20)
    native = decode_batch(*args)
    monkeypatch.setattr(decode, "_native_decoder", lambda: None)
    _same(native, decode_batch(*args))
    assert native.n_native == 16
    last = native.groups[spec].values[:, -40:]  # (40, 40): each message's own z column, the others missing
    assert (np.nan_to_num(last, nan=-1.0) == np.where(np.eye(40, dtype=bool), np.arange(40.0)[:, None], -1.0)).all()


def test_native_and_python_decoders_agree_on_generated_batches(module, monkeypatch):
    rng = random.Random(7)
    for _ in range(100):
        values = []
        for _ in range(rng.randint(1, 120)):
            r = rng.random()
            if r < 0.6:
                stream = rng.choice(["s8", "é8", "s2", "x2", "nobody"])
                spec = LOOKUP.get(stream, SPEC2)
                width = len(spec.names) if stream.endswith("8") else rng.choice([2, 2, 2, 3])
                values.append(_common(rng, stream, width, spec.names if rng.random() < 0.4 else None))
            elif r < 0.8:
                values.append(rng.choice(UNUSUAL))
            else:  # a common message cut or with one byte changed: mostly invalid JSON
                m = bytearray(_common(rng, "s8", 8))
                if rng.random() < 0.5:
                    m = m[: rng.randrange(len(m))]
                else:
                    m[rng.randrange(len(m))] = rng.choice(b'{}[]",:.-+eE0123456789 \\x\x00\xc3')
                values.append(bytes(m))
        native, python = _both(values, max_bytes=rng.choice([65536, 100]), monkeypatch=monkeypatch)
        _same(native, python)
        assert native.n_ok + len(native.rejected) + len(native.unrouted) == len(values)


def test_numbers_round_as_the_python_decoder_rounds_them(module, monkeypatch):
    """Every spelling of a number gives the same float32 as float(text) rounded to float32 (orjson's reading)."""
    rng = random.Random(3)
    texts = [_number(rng) for _ in range(4000)] + [repr(rng.uniform(-1, 1) * 10 ** rng.randint(-45, 38))
                                                   for _ in range(4000)]
    values = [f'{{"stream":"s8","ts":1,"values":[{",".join(texts[i:i + 8])}]}}'.encode()
              for i in range(0, len(texts) - 7, 8)]
    native, python = _both(values, monkeypatch=monkeypatch)
    _same(native, python)
    assert native.n_ok == len(values)


def test_signed_zeros_and_an_unrouted_stream_with_a_name_that_is_not_utf8(module, monkeypatch):
    """JSON's -0 is the integer 0 (+0.0) to Python, -0.0 keeps its sign; a values name that is not UTF-8 is a
    dead letter even when no route takes the stream (the native path once counted it as unrouted)."""
    values = [b'{"stream":"s2","ts":1,"values":[-0,-0.0]}', b'{"stream":"s2","ts":1,"values":{"temp":-0e0,"vib":-0}}',
              b'{"stream":"nobody","ts":1,"values":{"\xff":1}}']
    native, python = _both(values, monkeypatch=monkeypatch)
    _same(native, python)
    assert native.groups[SPEC2].values.view(np.uint32).tolist() == [[0, 0x80000000], [0x80000000, 0]]
    assert [(pos, reason) for pos, reason, _ in native.rejected] == [(2, "bad_encoding")] and not native.unrouted


def test_the_build_can_be_made_ahead_of_time_and_required(tmp_path):
    """``python -m pipelines.native_decode build`` builds into ANOMALYD_CACHE; ANOMALYD_NATIVE_DECODE=on then
    loads it, =off never does, and a bad value is an error naming the variable."""
    env = {**os.environ, "ANOMALYD_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pipelines.native_decode", "build"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0 and "ready" in done.stdout, done.stderr[-2000:]
    (so,) = tmp_path.glob("torch_extensions/anomalyd_decode_*/*.so")
    built = so.stat().st_mtime_ns
    other = tmp_path / "elsewhere" / native_decode.SOURCE.name  # another checkout of the same source
    other.parent.mkdir()
    shutil.copy(native_decode.SOURCE, other)
    moved = f"from pathlib import Path; from pipelines import native_decode as n; n.SOURCE = Path({str(other)!r}); "
    done = subprocess.run([sys.executable, "-c", moved + "print(n.load() is not None)"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.stdout.strip() == "True" and so.stat().st_mtime_ns == built, done.stderr[-2000:]  # not rebuilt
    code = "from pipelines import native_decode as n; print(n.load() is not None)"
    for value, expected in (("on", "True"), ("off", "False")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**env, "ANOMALYD_NATIVE_DECODE": value, "CXX": "/nonexistent"})
        assert done.stdout.strip() == expected, done.stderr[-2000:]  # on: the earlier build, without a compiler
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "ANOMALYD_NATIVE_DECODE": "maybe"})
    assert done.returncode != 0 and "ANOMALYD_NATIVE_DECODE" in done.stderr


def test_required_but_unavailable_is_an_error(tmp_path):
    """At the daemon's start (its intake loads the decoder), not in the first poll."""
    code = ("from pipelines.intake import Intake; from pipelines.routing import Router; "
            "Intake(Router([]), None, None, 'dlq', 1000)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ANOMALYD_CACHE": str(tmp_path), "ANOMALYD_NATIVE_DECODE": "on",
                               "CXX": "/nonexistent"})
    assert done.returncode != 0 and "NativeDecodeUnavailable" in done.stderr and "no C++ compiler" in done.stderr
