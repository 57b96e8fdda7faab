"""Per-feature weighting of the reconstruction error, A/B on labelled multivariate data (SMD/ASD layout).

``python -m benchmarks.error_weighting ../shared/data/smd --kind lstm`` trains one model per entity with the
harness's settings (``pipelines.evaluation.multivariate``), then scores its validation part and its test part
once and derives every variant from the same per-feature errors (B, F):

* ``mean``: the mean over features, what the detector scores (the reference);
* ``norm_mean``: each feature's error divided by its mean validation error plus the median of those means (a
  floor, so a feature reconstructed almost perfectly in training does not dominate), then the mean;
* ``norm_max``: the same, the largest feature instead of the mean;
* ``norm_mean_fl01``: divided by the mean validation error, floored at a tenth of their median;
* ``clip_mean``: divided by the larger of its mean validation error and the median of those means, then the
  mean: features reconstructed worse than the median one are scaled down to it, the others are left as they are
  (no feature gains weight, so one nearly constant in training does not dominate when it drifts).

Each variant's threshold is SPOT (risk 1e-3) fitted on its own validation scores, as training does. Prints per
entity and pooled: event F1 at that threshold (TP / FP / FN events), mean AUC-PR, mean best F1. About 3 min per
dataset with one thread (the data is not in the repository; see ../shared/data/README.md).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks import common
from detector.base import sliding_windows
from detector.training import _n_val, calibrate_threshold
from pipelines.evaluation.metrics import Counts, average_precision, best_f1, event_counts
from pipelines.evaluation.multivariate import MultivariateSettings, fit_detector, load_entities


def _variants(cv: np.ndarray, ct: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validation and test scores of each variant from per-feature errors (N, F) and (T, F)."""
    mu = cv.mean(axis=0)  # (F,)
    floor = max(float(np.median(mu)), 1e-6)
    w_floor, w_fl01, w_clip = 1.0 / (mu + floor), 1.0 / np.maximum(mu, 0.1 * floor), 1.0 / np.maximum(mu, floor)
    return {
        "mean": (cv.mean(1), ct.mean(1)),
        "norm_mean": ((cv * w_floor).mean(1), (ct * w_floor).mean(1)),
        "norm_max": ((cv * w_floor).max(1), (ct * w_floor).max(1)),
        "norm_mean_fl01": ((cv * w_fl01).mean(1), (ct * w_fl01).mean(1)),
        "clip_mean": ((cv * w_clip).mean(1), (ct * w_clip).mean(1)),
    }


def main(argv: list[str] | None = None) -> int:
    args = common.entity_args(__doc__, argv)
    torch.set_num_threads(1)
    s = MultivariateSettings()
    W = s.window
    pooled: dict[str, Counts] = {}
    aps: dict[str, list[float]] = {}
    bests: dict[str, list[float]] = {}
    for ent in load_entities(args.data):
        torch.manual_seed(s.seed)
        t0 = time.perf_counter()
        det = fit_detector(args.kind, ent.train, s, log=lambda _m: None)
        n_val = _n_val(len(ent.train), W, 0.2)  # training's validation part (TrainConfig.val_fraction)
        val_w = np.ascontiguousarray(sliding_windows(ent.train[-n_val:], W))
        test_w = np.ascontiguousarray(sliding_windows(np.concatenate([ent.train[-(W - 1):], ent.test]), W))
        cv = det.score_windows(val_w).contributions.astype(np.float64)
        ct = det.score_windows(test_w).contributions.astype(np.float64)
        line = [f"{ent.name:12s}"]
        for name, (sv, st) in _variants(cv, ct).items():
            thr = float(calibrate_threshold(sv, "spot", {"risk": 1e-3}, lambda _m: None).threshold)
            ev = event_counts(st >= thr, ent.labels)
            pooled[name] = pooled.get(name, Counts(0, 0, 0)) + ev
            aps.setdefault(name, []).append(average_precision(st, ent.labels))
            bests.setdefault(name, []).append(best_f1(st, ent.labels).f1)
            line.append(f"{name} ev {ev.f1:.3f} ap {aps[name][-1]:.3f}")
        print(" | ".join(line), f"{time.perf_counter() - t0:.0f}s", flush=True)
    for name, c in pooled.items():
        print(f"{name:16s} event F1 {c.f1:.3f} (tp {c.tp} fp {c.fp} fn {c.fn})  mean AUC-PR "
              f"{np.nanmean(aps[name]):.3f}  mean best F1 {np.mean(bests[name]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
