"""Synthetic multi-sensor streams to Kafka, with labelled injected anomalies and a ground-truth file.

Stream ``i`` is a :class:`detector.synthetic.SensorModel` seeded with ``seed + i``, so its history (steps
``< start_step``) and its live data continue one another: train on the first, detect on the second.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.synthetic import ANOMALY_KINDS, SensorModel, inject

__all__ = ["StreamPlan", "SyntheticFleet", "produce_live", "sent_anomalies"]


@dataclass(frozen=True)
class StreamPlan:
    stream: str
    kind: str
    start_step: int
    length: int


class SyntheticFleet:
    """``n_streams`` sensors named ``<prefix>-<i>`` with ``n_features`` readings each, one reading per step."""

    def __init__(self, n_streams: int = 8, n_features: int = 4, prefix: str = "pump", seed: int = 0,
                 period: float = 48.0, noise: float = 0.05) -> None:
        self.names = [f"{prefix}-{i}" for i in range(n_streams)]
        self.models = [SensorModel(n_features, period, noise, seed + i) for i in range(n_streams)]
        self.feature_names = list(self.models[0].feature_names)
        self.seed = seed

    def history(self, steps: int) -> list[np.ndarray]:
        """Clean (steps, F) readings of every stream for steps [0, steps)."""
        t = np.arange(steps, dtype=np.float64)
        return [m.normal(t) for m in self.models]

    def plan(self, start_step: int, steps: int, n_anomalies: int, length: int = 30,
             kinds: tuple[str, ...] = ANOMALY_KINDS) -> list[StreamPlan]:
        """Evenly spaced anomalies over [start_step, start_step + steps), cycling kinds and streams."""
        gap = steps // (n_anomalies + 1)
        return [StreamPlan(self.names[i % len(self.names)], kinds[i % len(kinds)], start_step + gap * (i + 1), length)
                for i in range(n_anomalies)]

    def live(self, start_step: int, steps: int, plan: list[StreamPlan]) -> tuple[np.ndarray, list[dict]]:
        """(S, steps, F) readings from ``start_step`` with the planned anomalies injected; ground truth list."""
        t = np.arange(start_step, start_step + steps, dtype=np.float64)
        data = np.stack([m.normal(t) for m in self.models])
        rng = np.random.default_rng(self.seed + 99)
        truth = []
        for p in plan:
            i = self.names.index(p.stream)
            a = inject(data[i], t, self.models[i], p.kind, p.start_step - start_step, p.length, rng)
            truth.append({"stream": p.stream, "kind": a.kind, "start_step": a.start + start_step,
                          "end_step": a.end + start_step, "features": [self.feature_names[f] for f in a.features]})
        return data, truth

    def messages(self, data: np.ndarray, start_step: int, t0_ms: int, interval_ms: int,
                 fmt: str = "dict") -> Iterator[tuple[int, bytes, bytes]]:
        """(step, key, value) JSON messages step by step, every stream once per step."""
        S, T, _ = data.shape
        for j in range(T):
            ts = t0_ms + (start_step + j) * interval_ms
            for i in range(S):
                row = data[i, j].tolist()
                values = dict(zip(self.feature_names, row, strict=True)) if fmt == "dict" else row
                msg = {"stream": self.names[i], "ts": ts, "values": values}
                yield start_step + j, self.names[i].encode(), json.dumps(msg).encode()


def produce_live(producer, topic: str, fleet: SyntheticFleet, data: np.ndarray, start_step: int, t0_ms: int,
                 interval_ms: int, rate: float | None, truth: list[dict], truth_path: Path | None,
                 stop: threading.Event | None = None) -> int:
    """Send ``data`` to ``topic`` at ``rate`` events/s (None: as fast as possible), then flush what was sent.
    Once ``stop`` is set no further message is sent (a pacing wait ends at once). Once the flush succeeded, the
    anomalies sent are written to ``truth_path`` (a failed delivery leaves none there). Returns messages sent."""
    for row in truth:
        row["start_ts"] = t0_ms + row["start_step"] * interval_ms
        row["end_ts"] = t0_ms + row["end_step"] * interval_ms
    sent, started = 0, time.monotonic()
    for _step, key, value in fleet.messages(data, start_step, t0_ms, interval_ms):
        if stop is not None and stop.is_set():
            break
        producer.produce(topic, value, key=key)
        sent += 1
        if rate and sent % 100 == 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                if stop is None:
                    time.sleep(ahead)
                elif stop.wait(ahead):
                    break
    producer.flush(60.0)  # raises KafkaDeliveryError when some were not delivered: no truth file then
    if truth_path is not None:  # whole or not at all: written beside it, then renamed over it
        partial = truth_path.with_name(truth_path.name + ".partial")
        partial.write_text(json.dumps({"topic": topic, "streams": fleet.names,
                                       "anomalies": sent_anomalies(truth, fleet, start_step, sent)}, indent=2))
        partial.replace(truth_path)
    return sent


def sent_anomalies(truth: list[dict], fleet: SyntheticFleet, start_step: int, sent: int) -> list[dict]:
    """The anomalies of ``truth`` whose first message is among the first ``sent`` of :meth:`SyntheticFleet.messages`
    from ``start_step`` (a run stopped early sent no message of the others)."""
    n = len(fleet.names)
    return [row for row in truth if (row["start_step"] - start_step) * n + fleet.names.index(row["stream"]) < sent]
