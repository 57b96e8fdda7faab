"""``anomalyd replay``: message files through the daemon's own decode -> window -> score -> alert path."""

from __future__ import annotations

import bisect
import json
import sys
import time
from collections.abc import Callable
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


def replay_files(config_path: str | Path, inputs: list[Path], chunk: int = 5000) -> int:
    """Replay ``inputs`` in order as one topic partition (a stream's events across files stay one stream, with
    offsets that go on counting); a message without ``ts`` takes the replay's start time plus its offset, its
    position among the non-blank lines of all the files (ms), so that order holds. Exit code 1 when no message
    was taken (none at all, or all dead-lettered or unrouted)."""
    daemon = Daemon(load_config(config_path))
    firsts: list[int] = []  # the first offset of each file's messages, and their line numbers in the file
    numbers: list[list[int]] = []

    def where(offset: int) -> str:
        k = bisect.bisect_right(firsts, offset) - 1
        return f"{inputs[k]}:{numbers[k][offset - firsts[k]]}"

    daemon.producer = _StderrDeadLetters(where)
    daemon.sinks = FanoutSink([LogSink(sys.stdout)])
    now = int(time.time() * 1000)
    n_alerts = offset = 0
    for path in inputs:
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM (Windows editors): not part of line 1's JSON
        numbered = [(i, ln) for i, ln in enumerate(data.splitlines(), start=1) if ln.strip()]
        firsts.append(offset)
        numbers.append([i for i, _ in numbered])
        lines = [ln for _, ln in numbered]
        for start in range(0, len(lines), chunk):
            part = lines[start:start + chunk]
            n = len(part)
            daemon.process(RecordBatch(topic=[_TOPIC] * n, partition=np.zeros(n, np.int32),
                                       offset=np.arange(offset, offset + n, dtype=np.int64),
                                       timestamp=now + np.arange(offset, offset + n, dtype=np.int64),
                                       key=[None] * n, value=part))
            offset += n
            n_alerts += len(daemon.flush())
            daemon.sinks.flush(30.0)
    counts = {o: int(daemon.registry.get_sample_value("anomalyd_events_total", {"topic": _TOPIC, "outcome": o})
                     or 0) for o in ("scored", "warming", "late", "unrouted", "dead_lettered")}
    print(f"replayed {daemon.events_seen} messages, {n_alerts} alerts; "
          + ", ".join(f"{o} {n}" for o, n in counts.items()), file=sys.stderr)
    taken = counts["scored"] + counts["warming"] + counts["late"]
    return 0 if taken else 1
