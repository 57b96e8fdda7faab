"""The loop prototype of pipeline item 12 (benchmarks/RESULTS.md), run by ``python -m benchmarks.pipeline`` when
its config says ``prototype``."""

from __future__ import annotations

import time
import uuid

import numpy as np

from . import common
from .harness import FEATURES, INTERVAL_MS, T0_MS, WINDOW


def loop_prototype(spec: dict) -> dict:
    """(p) Evidence for a pipeline change: the daemon's poll -> decode -> window buffer -> engine chain without
    alerts or commits, serial (``overlap`` False) or with ``engine.score`` on a second thread while the main
    thread polls and decodes the next batch (``overlap`` True; torch and the fused kernel release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from detector.engine import InferenceEngine
    from detector.windows import WindowBuffer
    from pipelines.decode import FeatureSpec, decode_batch
    from pipelines.model_store import ModelStore
    from pipelines.source import make_source

    fleet = common.Fleet(spec["n_streams"], FEATURES)
    features = FeatureSpec(tuple(fleet.feature_names))
    engine = InferenceEngine("cpu")
    engine.swap({"m": ModelStore(spec["models_dir"]).load(spec["models"][0]).detector})
    buffer = WindowBuffer(WINDOW, FEATURES, stride=spec["stride"], initial_capacity=fleet.n_streams)
    index = {name: i for i, name in enumerate(fleet.names)}
    phase = np.arange(fleet.n_streams) % spec["stride"]
    count = WINDOW - 1 + phase
    rep = np.repeat(np.arange(fleet.n_streams), count)
    steps = spec["first_step"] - np.concatenate([np.arange(c, 0, -1) for c in count.tolist()])
    buffer.add(rep, T0_MS + steps * INTERVAL_MS, fleet.values(steps, rep))
    src = make_source(spec["client"], bootstrap_servers=spec["bootstrap"], group_id=f"proto-{uuid.uuid4().hex[:8]}",
                      topics=[spec["topic"]], pattern=None, on_assign=lambda tps: None, on_revoke=lambda tps: None,
                      auto_offset_reset="earliest")
    pool = ThreadPoolExecutor(1)
    pending = None
    n, n_first, t_first, windows = 0, 0, None, 0
    try:
        while n < spec["n_events"]:
            batch = src.poll(5000, 100)
            if not len(batch):
                continue
            if t_first is None:
                t_first, n_first = time.perf_counter(), len(batch)
            n += len(batch)
            group = decode_batch(batch.value, batch.key, batch.timestamp, lambda s: features, 65536).groups[features]
            ids = np.fromiter((index[s] for s in group.stream), np.int64, len(group))
            wb = buffer.add(ids, group.ts, group.values)
            windows += len(wb)
            if spec["overlap"]:
                if pending is not None:
                    pending.result()
                pending = pool.submit(engine.score, {"m": wb.windows})
            else:
                engine.score({"m": wb.windows})
        if pending is not None:
            pending.result()
        t_end = time.perf_counter()
    finally:
        src.close()
        pool.shutdown()
    return {"events": n, "windows": windows, "events_s": (n - n_first) / (t_end - t_first),
            "threads": torch.get_num_threads()}
