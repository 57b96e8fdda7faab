"""A confluent-kafka poll as columns (ConfluentSource.poll): the native decoder's one-pass message_columns returns
exactly what the Python version does, failed messages left out, None values as b"". Real confluent-kafka
Messages are covered where the integration tests poll a broker; here the messages are plain objects with the
same methods, so that every case (errors, None key and value, a bad timestamp) can be made."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import native_decode
from pipelines.source_confluent import confluent_columns_py

pytestmark = pytest.mark.usefixtures("cxx")


class Message:
    """The methods of confluent_kafka.Message that a poll's columns read."""

    def __init__(self, topic, partition, offset, ts, key, value, error=None):
        self._t, self._p, self._o, self._ts, self._k, self._v, self._e = topic, partition, offset, ts, key, value, error

    def error(self):
        return self._e

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return self._ts

    def key(self):
        return self._k

    def value(self):
        return self._v


@pytest.fixture(scope="module")
def native():
    module = native_decode.load()
    assert module is not None, native_decode._STATE.get("error")
    return module.message_columns


def _same(got: tuple, want: tuple) -> None:
    assert got[0] == want[0] and got[4] == want[4] and got[5] == want[5]
    for g, w in zip(got[1:4], want[1:4], strict=True):
        assert g.dtype == w.dtype and np.array_equal(g, w)


def test_columns_match_the_python_version_message_for_message(native):
    rng = np.random.default_rng(0)
    msgs = []
    for i in range(2000):
        value = None if i % 97 == 0 else (b"" if i % 89 == 0 else f'{{"stream":"s{i % 13}"}}'.encode())
        key = None if i % 7 == 0 else f"s{i % 13}".encode()
        error = "_PARTITION_EOF" if i % 211 == 5 else None
        msgs.append(Message(f"topic-{i % 3}", int(rng.integers(0, 64)), int(rng.integers(0, 2**62)),
                            (1, int(rng.integers(0, 2**41))), key, value, error))
    got, want = native(msgs), confluent_columns_py(msgs)
    _same(got, want)
    assert len(got[5]) == 2000 - sum(m.error() is not None for m in msgs)
    assert got[1].dtype == np.int32 and got[2].dtype == np.int64 and got[3].dtype == np.int64
    assert b"" in got[5] and None not in got[5]  # a None value is b""
    assert None in got[4]  # a None key stays None


def test_all_failed_or_none_give_empty_columns(native):
    for msgs in ([], [Message("t", 0, 1, (1, 2), None, b"x", error="broker down")] * 3):
        got = native(msgs)
        _same(got, confluent_columns_py(msgs))
        assert got[0] == [] and len(got[1]) == 0


def test_a_method_that_raises_or_a_bad_timestamp_is_an_error_not_a_wrong_column(native):
    class Broken(Message):
        def offset(self):
            raise RuntimeError("offset unavailable")

    good = Message("t", 0, 1, (1, 2), None, b"x")
    with pytest.raises(RuntimeError, match="offset unavailable"):
        native([good, Broken("t", 0, 1, (1, 2), None, b"x")])
    with pytest.raises(TypeError, match="timestamp"):
        native([good, Message("t", 0, 1, 1234, None, b"x")])
    with pytest.raises(OverflowError):
        native([Message("t", 0, 2**70, (1, 2), None, b"x")])
