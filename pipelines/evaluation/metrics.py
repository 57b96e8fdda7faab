"""Accuracy metrics for labelled anomaly scores (numpy only).

* :func:`best_f1` -- the best point-wise F1 over all thresholds, no point adjustment.
* :func:`best_f1_point_adjusted` -- the same after the "point adjustment" common in papers (a labelled segment
  counts as fully detected once any of its rows is detected). It inflates scores; report it labelled as such.
* :func:`event_counts` / :func:`event_f1` -- Orion's overlapping-segment F1: events are maximal runs of
  consecutive anomalous rows; a labelled event overlapped by any detected event is a TP, one overlapped by
  none an FN, a detected event that overlaps no labelled event an FP.
* :func:`average_precision` -- area under the precision-recall curve as average precision
  (``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, as scikit-learn defines it).

Scores are "higher = more anomalous"; NaN scores (rows without a score) never count as detections.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    """True positives, false positives and false negatives, with the derived ratios."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass(frozen=True)
class BestF1:
    """The best F1 over thresholds and the counts at that threshold (detection: ``score >= threshold``)."""

    counts: Counts
    threshold: float

    @property
    def f1(self) -> float:
        return self.counts.f1

    def to_dict(self) -> dict[str, float]:
        return {**self.counts.to_dict(), "threshold": self.threshold}


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    s = np.where(np.isposinf(s), np.finfo(np.float64).max, s)  # an infinite score is the highest, not dropped
    return np.where(np.isnan(s), -np.inf, s), y.astype(bool)


def _curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP counts when detecting every row with ``score >= t`` for each distinct finite score t."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    finite = np.isfinite(s)
    s, y = s[finite], y[finite]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if s.size else np.empty(0, dtype=int)
    return s[ends], tp[ends], fp[ends]


def best_f1(scores: np.ndarray, labels: np.ndarray) -> BestF1:
    """Best point-wise F1 over every threshold (no point adjustment)."""
    s, y = _check(scores, labels)
    n_pos = int(y.sum())
    thr, tp, fp = _curve(s, y)
    if thr.size == 0 or n_pos == 0:  # threshold inf: nothing detected, so no false positive either
        return BestF1(Counts(0, 0, n_pos), float("inf"))
    f1 = 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1)
    k = int(np.argmax(f1))
    return BestF1(Counts(int(tp[k]), int(fp[k]), int(n_pos - tp[k])), float(thr[k]))


def segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as inclusive (start, end) index pairs."""
    m = np.asarray(mask, dtype=bool).astype(np.int8)
    d = np.diff(np.concatenate(([0], m, [0])))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def point_adjust(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Point adjustment: every row of a labelled segment becomes detected if any of its rows is."""
    out = np.asarray(pred, dtype=bool).copy()
    for a, b in segments(labels):
        if out[a : b + 1].any():
            out[a : b + 1] = True
    return out


def best_f1_point_adjusted(scores: np.ndarray, labels: np.ndarray) -> BestF1:
    """Best F1 over thresholds after point adjustment.

    Exact for every threshold: with point adjustment a labelled segment is detected at threshold ``t`` iff its
    largest score is ``>= t``, so replacing each segment's scores by their maximum and sweeping is equivalent.
    """
    s, y = _check(scores, labels)
    adjusted = s.copy()
    for a, b in segments(y):
        adjusted[a : b + 1] = adjusted[a : b + 1].max()
    return best_f1(adjusted, y)


def event_counts(pred: np.ndarray, labels: np.ndarray) -> Counts:
    """Orion overlapping-segment counts of detected events against labelled events."""
    p = np.asarray(pred, dtype=bool).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
    detected, labelled = segments(p), segments(y)
    tp = sum(1 for a, b in labelled if p[a : b + 1].any())
    fp = sum(1 for a, b in detected if not y[a : b + 1].any())
    return Counts(tp=tp, fp=fp, fn=len(labelled) - tp)


def event_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Orion overlapping-segment F1 (see :func:`event_counts`)."""
    return event_counts(pred, labels).f1


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve); NaN when there are no positive labels."""
    s, y = _check(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    _, tp, fp = _curve(s, y)
    if tp.size == 0:
        return 0.0
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))
