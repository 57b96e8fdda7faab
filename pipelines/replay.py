"""``anomalyd replay``: message files through the daemon's own decode -> window -> score -> alert path."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import load_config
from .daemon import Daemon
from .sinks import FanoutSink, LogSink
from .source import RecordBatch

__all__ = ["replay_files"]


class _StderrDeadLetters:
    """Stands in for the dead-letter producer: one JSON line per rejected message on stderr."""

    def produce(self, topic, value, key=None, headers=None) -> None:
        h = {k: v.decode(errors="replace") for k, v in (headers or [])}
        print(json.dumps({"dead_letter": topic, **h, "value": value.decode(errors="replace")[:500]}), file=sys.stderr)

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


def replay_files(config_path: str | Path, inputs: list[Path], chunk: int = 5000) -> int:
    daemon = Daemon(load_config(config_path))
    daemon.producer = _StderrDeadLetters()
    daemon.sinks = FanoutSink([LogSink(sys.stdout)])
    now = int(time.time() * 1000)
    n_alerts = 0
    for path in inputs:
        lines = [ln.rstrip(b"\n") for ln in path.read_bytes().splitlines() if ln.strip()]
        for start in range(0, len(lines), chunk):
            part = lines[start:start + chunk]
            n = len(part)
            daemon.process(RecordBatch(topic=[path.name] * n, partition=np.zeros(n, np.int32),
                                       offset=np.arange(start, start + n, dtype=np.int64),
                                       timestamp=np.full(n, now, np.int64), key=[None] * n, value=part))
            n_alerts += len(daemon.flush())
            daemon.sinks.flush(30.0)
    print(f"replayed {daemon.events_seen} messages, {n_alerts} alerts", file=sys.stderr)
    return 0
