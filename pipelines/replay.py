"""``anomalyd replay``: message files through the daemon's own decode -> window -> score -> alert path."""

from __future__ import annotations

import bisect
import errno
import json
import os
import stat
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .config import load_config
from .daemon import Daemon
from .sinks import FanoutSink, LogSink
from .source import RecordBatch

__all__ = ["replay_files"]

_TOPIC = "replay"  # every file's messages: one topic partition, as one stream's events are in Kafka


class _StderrDeadLetters:
    """Stands in for the dead-letter producer: one JSON line per rejected message on stderr, with ``input``, the
    file and line it came from (``where``, from its offset), when known."""

    def __init__(self, where: Callable[[int], str] | None = None) -> None:
        self._where = where

    def produce(self, topic, value, key=None, headers=None) -> None:
        h = {k: v.decode(errors="replace") for k, v in (headers or [])}
        if self._where is not None and "anomalyd-source-offset" in h:
            h = {"input": self._where(int(h["anomalyd-source-offset"])), **h}
        print(json.dumps({"dead_letter": topic, **h, "value": value.decode(errors="replace")[:500]}), file=sys.stderr)

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


def _lines(f, block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of binary file ``f`` without their ends, exactly as ``f.read().splitlines()`` gives them (ends
    LF, CRLF and CR), read ``block`` bytes at a time."""
    rest = bytearray()  # the start of a line not ended yet
    while data := f.read(block):
        if b"\n" not in data and b"\r" not in data:
            rest += data  # a long line: no rescan of its start
            continue
        rest += data
        lines = bytes(rest).splitlines(keepends=True)
        last = lines[-1]  # not ended yet, or "\r" that a "\n" may follow in the next block
        rest = bytearray(last) if not last.endswith(b"\n") else bytearray()
        for line in lines[:-1] if rest else lines:
            yield line.rstrip(b"\r\n")  # its end: the line itself holds neither
    yield from bytes(rest).splitlines()


def replay_files(config_path: str | Path, inputs: list[Path], chunk: int = 5000) -> int:
    """Replay ``inputs`` in order as one topic partition (a stream's events across files stay one stream, with
    offsets that go on counting); a message without ``ts`` takes the replay's start time plus its offset, its
    position among the non-blank lines of all the files (ms), so that order holds. Exit code 1 when no message
    was taken (none at all, or all dead-lettered or unrouted). Every input is checked first, without opening it (a
    named pipe opened once has lost its writer): one that cannot be read raises its OSError (FileNotFoundError,
    ...) before anything is replayed. Each file is read ``chunk`` messages at a time."""
    for path in inputs:
        if stat.S_ISDIR(os.stat(path).st_mode):  # FileNotFoundError, PermissionError (a directory above it)
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    daemon = Daemon(load_config(config_path))
    # offset -> input: runs of messages from one file whose line numbers are offset + delta (a run ends at a
    # blank line or the file's end); three numbers a run, not one a line
    starts, deltas, files = array("q"), array("q"), array("q")

    def where(offset: int) -> str:
        k = bisect.bisect_right(starts, offset) - 1
        return f"{inputs[files[k]]}:{offset + deltas[k]}"

    daemon.producer = _StderrDeadLetters(where)
    daemon.sinks = FanoutSink([LogSink(sys.stdout)])
    now = int(time.time() * 1000)
    n_alerts = offset = 0

    def replay(part: list[bytes]) -> None:
        nonlocal n_alerts, offset
        n = len(part)
        daemon.process(RecordBatch(topic=[_TOPIC] * n, partition=np.zeros(n, np.int32),
                                   offset=np.arange(offset, offset + n, dtype=np.int64),
                                   timestamp=now + np.arange(offset, offset + n, dtype=np.int64),
                                   key=[None] * n, value=part))
        offset += n
        n_alerts += len(daemon.flush())
        daemon.sinks.flush(30.0)

    for k, path in enumerate(inputs):
        part: list[bytes] = []
        with open(path, "rb") as f:
            for number, line in enumerate(_lines(f), start=1):
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM (Windows editors): not part of the JSON
                if not line.strip():
                    continue
                here = offset + len(part)
                if not starts or files[-1] != k or deltas[-1] != number - here:
                    starts.append(here)
                    deltas.append(number - here)
                    files.append(k)
                part.append(line)
                if len(part) == chunk:
                    replay(part)
                    part = []
        if part:
            replay(part)
    counts = {o: int(daemon.registry.get_sample_value("anomalyd_events_total", {"topic": _TOPIC, "outcome": o})
                     or 0) for o in ("scored", "warming", "late", "unrouted", "dead_lettered")}
    print(f"replayed {daemon.events_seen} messages, {n_alerts} alerts; "
          + ", ".join(f"{o} {n}" for o, n in counts.items()), file=sys.stderr)
    taken = counts["scored"] + counts["warming"] + counts["late"]
    return 0 if taken else 1
