"""The windowed-Gaussian baseline's floor on a window's spread, on labelled multivariate data (SMD/ASD layout).

``python -m benchmarks.baseline_floor ../shared/data/smd`` fits ``detector.gaussian.GaussianDetector`` per entity with
the harness's settings and reports, pooled over entities, event F1 at the calibrated (SPOT) threshold and mean
AUC-PR for several floors: the detector's own (``SD_FLOOR`` x the training spread, 1.0 for a feature constant in
training), the old absolute 1e-6, and c x the training spread + 1e-6 (a feature constant in training stays at
1e-6: its first move is maximally surprising) for c in 0.01, 0.1 and 1. Seconds per dataset.
"""

from __future__ import annotations

import numpy as np

from benchmarks import common
from detector.gaussian import GaussianDetector
from pipelines.evaluation.metrics import Counts, average_precision, event_counts
from pipelines.evaluation.multivariate import MultivariateSettings, load_entities, score_test


def _floors(train: np.ndarray) -> dict[str, np.ndarray | None]:
    std = train.astype(np.float64).std(axis=0)
    out: dict[str, np.ndarray | None] = {"detector's own": None, "absolute 1e-6 (before)": np.full_like(std, 1e-6)}
    for c in (0.01, 0.1, 1.0):
        out[f"{c:g} x spread + 1e-6"] = c * std + 1e-6
    return out


def main(argv: list[str] | None = None) -> int:
    args = common.entity_args(__doc__, argv, kind=False)
    s = MultivariateSettings()
    pooled: dict[str, Counts] = {}
    aps: dict[str, list[float]] = {}
    for ent in load_entities(args.data):
        for name, floor in _floors(ent.train).items():
            det = GaussianDetector(window=s.window, n_features=ent.train.shape[1], threshold=s.threshold,
                                   threshold_params=dict(s.threshold_params), sd_floor=floor).fit(ent.train)
            scores = score_test(det, ent)
            pooled[name] = pooled.get(name, Counts(0, 0, 0)) + event_counts(det.threshold.is_anomalous(scores),
                                                                            ent.labels)
            aps.setdefault(name, []).append(average_precision(scores, ent.labels))
    for name, c in pooled.items():
        print(f"{name:24s} event F1 {c.f1:.3f} (TP / FP / FN events {c.tp} / {c.fp} / {c.fn})  "
              f"mean AUC-PR {np.nanmean(aps[name]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
