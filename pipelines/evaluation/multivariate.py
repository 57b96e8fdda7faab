"""Multivariate evaluation on the SMD/ASD layout: one detector per entity, trained on its train part.

Layout::

    train/<entity>.npy       (T, F) float, normal operation
    test/<entity>.npy        (T', F) float
    test_label/<entity>.txt  T' lines of 0/1

Each test row is scored by the window that ends on it; the first W-1 test rows borrow the last W-1 train rows
as history (the test part follows the train part in time). Per entity and pooled over entities we report:
best F1 without point adjustment, best point-adjusted F1 (labelled as such), event-wise (Orion overlap) F1
at the detector's calibrated threshold, and AUC-PR (average precision).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from detector.base import Detector, sliding_windows
from detector.device import exact_float32
from detector.gaussian import GaussianDetector
from detector.models import ModelConfig, model_cost
from detector.training import TrainConfig, train_detector
from pipelines.evaluation.metrics import (
    Counts,
    average_precision,
    best_f1,
    best_f1_point_adjusted,
    event_counts,
)


@dataclass
class Entity:
    """One machine/server of the dataset."""

    name: str
    train: np.ndarray  # (T, F) float32
    test: np.ndarray  # (T', F) float32
    labels: np.ndarray  # (T',) int8 0/1


@dataclass
class MultivariateSettings:
    """Model and training settings shared by every entity (no per-entity tuning)."""

    window: int = 32
    hidden_size: int = 64
    latent_size: int = 16
    num_layers: int = 1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    max_windows: int | None = 8000
    score_last_k: int | None = 1  # newest step's error: sharp in time
    scaler: str = "standard"
    threshold: str = "spot"
    threshold_params: dict = field(default_factory=lambda: {"risk": 1e-3})
    seed: int = 0
    device: str = "cpu"


@dataclass
class EntityResult:
    """Scores and metrics of one entity under one model kind."""

    name: str
    scores: np.ndarray  # (T',) raw anomaly scores, one per test row
    threshold: float  # calibrated on the train part
    metrics: dict[str, object]
    train_seconds: float
    score_seconds: float
    counts: dict[str, Counts]  # "point", "point_adjusted", "event" at their thresholds


def load_entities(data_dir: str | Path, names: list[str] | None = None) -> list[Entity]:
    """Read every entity of an SMD/ASD-style directory (or only ``names``)."""
    root = Path(data_dir)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir} not found: expected train/<entity>.npy, test/, test_label/")
    found = sorted(p.stem for p in train_dir.glob("*.npy"))
    wanted = found if names is None else names
    entities = []
    for name in wanted:
        if name not in found:
            raise FileNotFoundError(f"entity {name!r} not in {train_dir}")
        train = np.load(train_dir / f"{name}.npy").astype(np.float32)
        test = np.load(root / "test" / f"{name}.npy").astype(np.float32)
        labels = np.loadtxt(root / "test_label" / f"{name}.txt", dtype=np.int8).reshape(-1)
        train, test = _as_2d(train), _as_2d(test)
        if len(labels) != len(test) or train.shape[1] != test.shape[1]:
            raise ValueError(f"{name}: train {train.shape}, test {test.shape}, labels {labels.shape} disagree")
        entities.append(Entity(name, train, test, labels))
    if not entities:
        raise FileNotFoundError(f"no entities in {train_dir}")
    return entities


def _as_2d(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1) if x.ndim == 1 else x


def model_config(kind: str, n_features: int, s: MultivariateSettings) -> ModelConfig:
    return ModelConfig(kind=kind, n_features=n_features, window=s.window, hidden_size=s.hidden_size,
                       latent_size=s.latent_size, num_layers=s.num_layers)


def fit_detector(kind: str, train: np.ndarray, s: MultivariateSettings, log: Callable[[str], None]) -> Detector:
    """Train one detector of ``kind`` ("gru" | "lstm" | "gaussian") on an entity's train part."""
    if kind == "gaussian":
        return GaussianDetector(window=s.window, n_features=train.shape[1], threshold=s.threshold,
                                threshold_params=dict(s.threshold_params)).fit(train)
    tcfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed, device=s.device,
                       scaler=s.scaler, score_last_k=s.score_last_k, threshold=s.threshold,
                       threshold_params=dict(s.threshold_params), max_windows=s.max_windows)
    return train_detector(train, model_config(kind, train.shape[1], s), tcfg, log=log)


def score_test(det: Detector, entity: Entity) -> np.ndarray:
    """(T',) score of the window ending on each test row (history from the end of the train part)."""
    W = det.window
    history = entity.train[-(W - 1):] if W > 1 else entity.train[:0]
    X = np.concatenate([history, entity.test])  # (W-1+T', F)
    windows = sliding_windows(X, W)  # (T', W, F)
    device = getattr(det, "device", None)  # a GPU's test scores without TF32, as its calibration scores (training)
    with exact_float32(device) if device is not None else contextlib.nullcontext():
        if len(windows) != len(entity.test):  # train part shorter than W-1
            return det.score_series(entity.test)
        return det.score_windows(np.ascontiguousarray(windows)).score


def evaluate_entity(
    kind: str, entity: Entity, s: MultivariateSettings, log: Callable[[str], None] = print
) -> EntityResult:
    """Fit on the entity's train part, score its test part, compute every metric."""
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    det = fit_detector(kind, entity.train, s, log=lambda _m: None)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score_test(det, entity)
    score_s = time.perf_counter() - t0
    if det.threshold is None:
        raise RuntimeError(f"{kind} detector for {entity.name} has no calibrated threshold")
    thr = float(det.threshold.threshold)
    y = entity.labels
    point, pa = best_f1(scores, y), best_f1_point_adjusted(scores, y)
    ev = event_counts(det.threshold.is_anomalous(scores), y)  # the daemon's decision (score > threshold)
    metrics: dict[str, object] = {
        "f1": point.f1,
        "f1_point_adjusted": pa.f1,
        "f1_event": ev.f1,
        "auc_pr": average_precision(scores, y),
        "best_f1_detail": point.to_dict(),
        "point_adjusted_detail": pa.to_dict(),
        "event_detail": {**ev.to_dict(), "threshold": thr},
        "train_seconds": train_s,
        "score_seconds": score_s,
        "rows_per_second": len(scores) / max(score_s, 1e-9),
    }
    log(f"  {entity.name:14s} {kind:8s} f1 {point.f1:.3f}  f1_pa {pa.f1:.3f}  f1_event {ev.f1:.3f}  "
        f"auc_pr {metrics['auc_pr']:.3f}  train {train_s:.1f}s")
    return EntityResult(entity.name, scores, thr, metrics, train_s, score_s,
                        {"point": point.counts, "point_adjusted": pa.counts, "event": ev})


def summarise(kind: str, results: list[EntityResult], s: MultivariateSettings, n_features: int) -> dict:
    """Overall figures: F1s from TP/FP/FN pooled over entities, AUC-PR as the mean over entities."""
    pooled = {k: sum((r.counts[k] for r in results), Counts(0, 0, 0)) for k in ("point", "point_adjusted", "event")}
    aps = [float(r.metrics["auc_pr"]) for r in results if not np.isnan(float(r.metrics["auc_pr"]))]
    rows = sum(len(r.scores) for r in results)
    score_s = sum(r.score_seconds for r in results)
    out: dict[str, object] = {
        "model": kind,
        "entities": len(results),
        "f1": pooled["point"].f1,
        "f1_point_adjusted": pooled["point_adjusted"].f1,
        "f1_event": pooled["event"].f1,
        "auc_pr": float(np.mean(aps)) if aps else float("nan"),
        "pooled_counts": {k: v.to_dict() for k, v in pooled.items()},
        "definitions": {
            "f1": "best point-wise F1 per entity (no point adjustment); TP/FP/FN pooled over entities",
            "f1_point_adjusted": "best F1 after point adjustment (inflated; for comparison with papers), pooled",
            "f1_event": "Orion overlapping-segment F1 at the calibrated threshold, pooled",
            "auc_pr": "average precision per entity, mean over entities",
        },
        "train_seconds": sum(r.train_seconds for r in results),
        "score_seconds": score_s,
        "rows_per_second": rows / max(score_s, 1e-9),
        "per_entity": {r.name: r.metrics for r in results},
    }
    if kind != "gaussian":
        cost = model_cost(model_config(kind, n_features, s))
        out["params"], out["macs_per_window"] = cost.params, cost.macs_per_window
    else:
        out["params"], out["macs_per_window"] = 0, 0
    return out


def evaluate_multivariate(
    entities: list[Entity], kind: str, s: MultivariateSettings | None = None, log: Callable[[str], None] = print
) -> tuple[dict, list[EntityResult]]:
    """Evaluate one model kind over every entity; returns the summary dict and per-entity results."""
    s = s or MultivariateSettings()
    results = [evaluate_entity(kind, e, s, log) for e in entities]
    return summarise(kind, results, s, entities[0].train.shape[1]), results

