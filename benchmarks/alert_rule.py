"""The daemon's alert rule against per-row decisions, on labelled multivariate data (SMD/ASD layout).

``python -m benchmarks.alert_rule ../shared/data/smd --kind lstm`` trains one model per entity with the harness's
settings (``pipelines.evaluation.multivariate``), scores its test part, and counts events (Orion overlap, pooled
over entities) two ways: every row over the calibrated threshold a detection ("rows"), and the rows inside the
incidents the daemon's ``AlertTracker`` opens from those decisions (k of the last n windows over, resolved after m
normal ones, 60 s cooldown, one stream at 1-minute steps) for a few (k, n, m). About 3 min per dataset with one
thread (the data is not in the repository; see ../shared/data/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import common
from pipelines.alert_message import FIRING
from pipelines.alerts import AlertTracker
from pipelines.evaluation.metrics import Counts, event_counts
from pipelines.evaluation.multivariate import MultivariateSettings, fit_detector, load_entities, score_test

STEP_MS = 60_000  # SMD and ASD rows are one minute apart
RULES = ((3, 5, 10), (2, 3, 5), (1, 1, 1))  # (k, n, m); the first is the daemon's default


def incident_rows(normalised: np.ndarray, over: np.ndarray, k: int, n: int, m: int) -> np.ndarray:
    """(T,) bool: the rows inside the incidents an AlertTracker opens from one stream's decisions."""
    T = len(over)
    tracker = AlertTracker(k=k, n=n, m=m, cooldown_s=60)
    alerts = tracker.observe(np.zeros(T, np.int64), normalised, over, np.arange(T, dtype=np.int64) * STEP_MS, "t",
                             np.zeros(T, np.int64), np.arange(T), stream_names=["entity"])
    mask = np.zeros(T, dtype=bool)
    start = None
    for a in alerts:
        if a.status == FIRING:
            start = a.started_at // STEP_MS
        else:
            mask[start: a.ended_at // STEP_MS + 1] = True
            start = None
    if start is not None:  # still open at the end
        mask[start:] = True
    return mask


def main(argv: list[str] | None = None) -> int:
    args = common.entity_args(__doc__, argv)
    torch.set_num_threads(1)
    s = MultivariateSettings()
    pooled: dict[str, Counts] = {}
    for ent in load_entities(args.data):
        torch.manual_seed(s.seed)
        det = fit_detector(args.kind, ent.train, s, log=lambda _m: None)
        scores = score_test(det, ent)
        over = det.threshold.is_anomalous(scores)
        results = {"rows": event_counts(over, ent.labels)}
        for k, n, m in RULES:
            mask = incident_rows(det.threshold.normalise(scores), over, k, n, m)
            results[f"k={k} n={n} m={m}"] = event_counts(mask, ent.labels)
        for name, c in results.items():
            pooled[name] = pooled.get(name, Counts(0, 0, 0)) + c
        print(f"{ent.name:12s} " + " | ".join(f"{name} {c.f1:.3f}" for name, c in results.items()), flush=True)
    for name, c in pooled.items():
        print(f"{name:14s} event F1 {c.f1:.3f} (TP / FP / FN events {c.tp} / {c.fp} / {c.fn})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
