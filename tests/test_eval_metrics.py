"""Accuracy metrics on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.metrics import (
    Counts,
    average_precision,
    best_f1,
    best_f1_point_adjusted,
    event_counts,
    event_f1,
    point_adjust,
    segments,
)


def test_segments() -> None:
    assert segments(np.array([0, 1, 1, 0, 1, 0, 0, 1])) == [(1, 2), (4, 4), (7, 7)]
    assert segments(np.zeros(4)) == []


def test_best_f1_picks_the_best_threshold() -> None:
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.7, 0.3])
    labels = np.array([0, 1, 1, 0, 0, 1])
    # t=0.8: tp=2 fp=0 fn=1 -> F1 = 0.8; t=0.3: tp=3 fp=1 fn=0 -> 6/7 = 0.857 (best)
    res = best_f1(scores, labels)
    assert res.threshold == 0.3
    assert (res.counts.tp, res.counts.fp, res.counts.fn) == (3, 1, 0)
    assert res.f1 == pytest.approx(6 / 7)


def test_best_f1_ties_switch_on_together_and_nan_never_detects() -> None:
    scores = np.array([0.5, 0.5, np.nan, 0.1])
    labels = np.array([1, 0, 1, 0])
    res = best_f1(scores, labels)
    assert (res.counts.tp, res.counts.fp, res.counts.fn) == (1, 1, 1)


def test_point_adjust() -> None:
    labels = np.array([0, 1, 1, 1, 0, 1, 1])
    pred = np.array([1, 0, 1, 0, 0, 0, 0])
    assert point_adjust(pred, labels).astype(int).tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_point_adjusted_f1_is_at_least_plain_f1_and_matches_hand_value() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    scores = np.array([0.2, 0.1, 0.3, 0.9, 0.1, 0.2, 0.4, 0.1])
    # PA at t=0.9: the whole segment (4 rows) detected, nothing else: F1 = 1.
    assert best_f1_point_adjusted(scores, labels).f1 == pytest.approx(1.0)
    # Without PA: t=0.9 -> F1 0.4; t=0.3 (tp=2 fp=1 fn=2) -> 4/7; t=0.2 (tp=3 fp=2 fn=1) -> 2/3 (best)
    assert best_f1(scores, labels).f1 == pytest.approx(2 / 3)


def test_event_counts_overlap_rules() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1])
    # labelled events (1-3) hit by detected (0-1) -> TP; (7-8) missed -> FN;
    # detected (5-5) and (10-11) overlap nothing -> 2 FP; (0-1) overlaps -> not an FP.
    c = event_counts(pred, labels)
    assert c == Counts(tp=1, fp=2, fn=1)
    assert event_f1(pred, labels) == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))


def test_one_long_detection_covering_two_events() -> None:
    labels = np.array([1, 0, 1, 0])
    pred = np.array([1, 1, 1, 1])
    assert event_counts(pred, labels) == Counts(tp=2, fp=0, fn=0)


def test_counts_pool() -> None:
    assert Counts(1, 2, 3) + Counts(4, 5, 6) == Counts(5, 7, 9)
    assert Counts(0, 0, 0).f1 == 0.0


def test_average_precision_hand_value() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 0, 1, 0])
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert average_precision(np.array([0.1, 0.2]), np.array([0, 1])) == pytest.approx(1.0)
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def test_average_precision_perfect_and_ties() -> None:
    assert average_precision(np.array([0.1, 0.9, 0.8]), np.array([0, 1, 1])) == pytest.approx(1.0)
    # all tied: one threshold, precision = base rate
    assert average_precision(np.full(4, 0.5), np.array([1, 0, 0, 0])) == pytest.approx(0.25)


def _average_precision_by_definition(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = sum over distinct thresholds t (descending) of (R(t) - R(previous t)) * P(t), flagging score >= t:
    the step-wise definition scikit-learn's average_precision_score uses, written out one threshold at a time."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        tp = int((flagged & (labels == 1)).sum())
        recall, precision = tp / int(labels.sum()), tp / int(flagged.sum())
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def test_average_precision_matches_the_step_wise_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(500) < 0.1).astype(int)
    scores = np.round(rng.random(500) + labels * 0.3, 2)  # rounded: many tied scores
    assert average_precision(scores, labels) == pytest.approx(_average_precision_by_definition(scores, labels))
    # a hand-checked case: ranks 0.9 (1), 0.8 (0), 0.8 (1), 0.1 (0) -> 0.5 * 1 + 0.5 * 2/3
    assert average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(0.5 + 1 / 3)


def test_metric_input_checks() -> None:
    with pytest.raises(ValueError, match="differ"):
        best_f1(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="0/1"):
        best_f1(np.zeros(2), np.array([0, 2]))


def test_an_infinite_score_is_the_highest_and_no_positives_mean_no_false_positives():
    scores, labels = np.array([np.inf, 0.1, 0.2, 0.3]), np.array([1, 0, 0, 1])
    got = best_f1(scores, labels)
    assert (got.counts.tp, got.counts.fp, got.counts.fn) == (2, 0, 0)
    assert average_precision(scores, labels) == 1.0
    none = best_f1(np.array([0.5, 0.7]), np.array([0, 0]))
    assert (none.counts.tp, none.counts.fp, none.counts.fn) == (0, 0, 0)
