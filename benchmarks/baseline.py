"""Baseline benchmark: anomalyd against a naive implementation of the same detector and river's HalfSpaceTrees.

The same events (S=1,000 streams, 8 features, JSON bytes as they come from Kafka, every stream's previous W-1
readings already buffered) go, from memory, through:

* naive: ``json.loads`` per message, a ``collections.deque(maxlen=W)`` per stream, and one eager model call per
  event (``torch.tensor([list(deque)])``, scaling, ``model(x)``, squared error, threshold), as tutorials write
  it; the same trained GRU model and scaler;
* anomalyd: the daemon's own path without Kafka (``Daemon.process`` on poll-sized record batches of 5,000,
  then ``Daemon.flush``: decode, window buffers, one batched forward, alert state), sinks empty;
* river (when installed): ``MinMaxScaler | HalfSpaceTrees`` (``score_one`` + ``learn_one`` per event, one model
  for all streams, as river's documentation shows), after ``json.loads``.

Each runs for a fixed time (or all events) in this process, one after the other; speed-up = events/s ratio.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch

from . import common, harness

FULL = {"streams": 1000, "events": 200_000, "naive_s": 15.0, "river_s": 10.0}
QUICK = {"streams": 1000, "events": 40_000, "naive_s": 4.0, "river_s": 3.0}


def _data(fleet: common.Fleet, n: int, by_name: bool = False) -> tuple[list[bytes], list[bytes], np.ndarray]:
    first = harness.WINDOW + 8
    stream, step = fleet.events(first, n)
    values = common.json_messages(fleet, stream, step, harness.T0_MS, harness.INTERVAL_MS, by_name=by_name)
    keys = [fleet.names[s].encode() for s in stream.tolist()]
    return values, keys, step


def _history(fleet: common.Fleet) -> dict[str, list[list[float]]]:
    """Each stream's W-1 readings before the first benchmark event."""
    first = harness.WINDOW + 8
    steps = np.arange(first - harness.WINDOW + 1, first)
    out = {}
    for s, name in enumerate(fleet.names):
        out[name] = fleet.values(steps, np.full(len(steps), s)).tolist()
    return out


def naive(det, messages: list[bytes], history: dict, seconds: float) -> dict:
    """The tutorial loop: one deque per stream, one model call per event."""
    W = det.window
    model = det.model.eval()
    center = torch.as_tensor(det.scaler.center)
    scale = torch.as_tensor(det.scaler.scale)
    threshold = det.threshold.threshold
    buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=W))
    for name, rows in history.items():
        buffers[name].extend(rows)
    n = scored = over = 0
    t0 = time.perf_counter()
    for raw in messages:
        msg = json.loads(raw)
        buf = buffers[msg["stream"]]
        buf.append(msg["values"])
        if len(buf) == W:
            x = torch.tensor([list(buf)], dtype=torch.float32)  # (1, W, F)
            x = (x - center) / scale
            with torch.no_grad():
                recon = model(x)
            score = ((recon - x) ** 2).mean().item()
            scored += 1
            over += score > threshold
        n += 1
        if n % 100 == 0 and time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {"events": n, "windows": scored, "over": over, "seconds": dt, "events_s": n / dt}


def anomalyd(mdir: str, names: list[str], fleet: common.Fleet, messages: list[bytes], keys: list[bytes]) -> dict:
    """The daemon's decode -> window -> score -> alert path from memory (no Kafka, empty sinks)."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.replay import _StderrDeadLetters
    from pipelines.sinks import FanoutSink
    from pipelines.source import RecordBatch

    spec = {"bootstrap": "127.0.0.1:9", "client": "kafka-python", "topic": "memory", "models_dir": mdir,
            "models": names, "stride": 1, "background": False, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(load_config(harness.daemon_config(Path(tmp), spec)))
    daemon.producer = _StderrDeadLetters()
    daemon.sinks = FanoutSink([])
    harness.seed_windows(daemon, fleet, harness.WINDOW + 8, 1)
    n, chunk = len(messages), 5000
    batches = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        batches.append(RecordBatch(topic=["memory"] * m, partition=np.zeros(m, np.int32),
                                   offset=np.arange(start, start + m, dtype=np.int64),
                                   timestamp=np.full(m, harness.T0_MS, np.int64), key=keys[start:start + m],
                                   value=messages[start:start + m]))
    alerts = 0
    t0 = time.perf_counter()
    for b in batches:
        daemon.process(b)
        alerts += len(daemon.flush())
    dt = time.perf_counter() - t0
    return {"events": n, "alerts": alerts, "seconds": dt, "events_s": n / dt, "fused": daemon.engine.fused}


def river_hst(messages: list[bytes], seconds: float) -> dict | None:
    try:
        from river import anomaly, compose, preprocessing
    except ImportError:
        return None
    model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=42))
    n = 0
    t0 = time.perf_counter()
    for raw in messages:
        msg = json.loads(raw)
        x = {f"f{j}": v for j, v in enumerate(msg["values"])}
        model.score_one(x)
        model.learn_one(x)
        n += 1
        if n % 100 == 0 and time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {"events": n, "seconds": dt, "events_s": n / dt}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("baseline", __doc__)
    p.add_argument("--kind", choices=["gru", "lstm"], default="gru")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    from .pipeline import models_dir

    fleet = common.Fleet(cfg["streams"], harness.FEATURES)
    messages, keys, _ = _data(fleet, cfg["events"])
    history = _history(fleet)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mdir, names = models_dir(Path(tmp), args.kind)
        from pipelines.model_store import ModelStore

        det = ModelStore(mdir).load(names[0]).detector
        for threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(threads)
            common.log(f"threads {threads}: anomalyd from memory ...")
            fast = anomalyd(mdir, names, fleet, messages, keys)
            rows.append({"impl": "anomalyd (decode, buffers, batched model, alerts)", "threads": threads, **fast})
            common.log(f"  {fast['events_s']:,.0f} events/s; naive deque + per-event model ...")
            slow = naive(det, messages, history, cfg["naive_s"])
            rows.append({"impl": "naive: deque per stream, model per event", "threads": threads, **slow,
                         "anomalyd_speedup": fast["events_s"] / slow["events_s"]})
            common.log(f"  {slow['events_s']:,.0f} events/s")
        torch.set_num_threads(max(r["threads"] for r in rows))
        best = max(r["events_s"] for r in rows if r["impl"].startswith("anomalyd"))
        common.log("river ...")
        hst = river_hst(messages, cfg["river_s"])
        if hst:
            rows.append({"impl": "river MinMaxScaler | HalfSpaceTrees", "threads": None, **hst,
                         "anomalyd_speedup": best / hst["events_s"]})
    print(common.table(rows, [("impl", "implementation", ""), ("threads", "threads", "d"), ("events", "events", ",d"),
                              ("seconds", "seconds", ".1f"), ("events_s", "events/s", ",.0f"),
                              ("anomalyd_speedup", "anomalyd speed-up", ".1f")],
                       f"\nBaseline, {args.kind.upper()} W=64 F=8 H=64, {cfg['streams']} streams, stride 1, from "
                       "memory (speed-up: anomalyd at the same torch threads; river: the faster anomalyd)"))
    common.write_json(args.json, "baseline", {"quick": args.quick, "kind": args.kind, "config": cfg, "rows": rows,
                                              "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
