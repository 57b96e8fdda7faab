"""NAB scorer on hand-made corpora whose scores can be computed by hand (see SCORING.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines.evaluation.nab_scorer import (
    DEFAULT_PROFILES,
    CostProfile,
    file_raw_score,
    load_profiles,
    probation_length,
    row_values,
    scaled_sigmoid,
    score_corpus,
    sweep_threshold,
)

STD = DEFAULT_PROFILES["standard"]


def sig(y: float) -> float:
    """The scaled sigmoid written out by hand."""
    return -1.0 if y >= 3 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def one_hot(n: int, rows: dict[int, float]) -> np.ndarray:
    s = np.zeros(n)
    for i, v in rows.items():
        s[i] = v
    return s


def test_scaled_sigmoid_reference_points() -> None:
    assert float(scaled_sigmoid(0.0)) == 0.0
    assert float(scaled_sigmoid(-1.0)) == pytest.approx(0.98661, abs=1e-5)
    assert float(scaled_sigmoid(-0.5)) == pytest.approx(0.84828, abs=1e-5)
    assert float(scaled_sigmoid(1.0)) == pytest.approx(-0.98661, abs=1e-5)
    assert float(scaled_sigmoid(3.0001)) == -1.0
    assert float(scaled_sigmoid(3.0)) == -1.0  # NAB's sweeper.py: -1 from 3 on (2 / (1 + e^15) - 1 is -0.99999994)


def test_probation_length() -> None:
    assert probation_length(100) == 15
    assert probation_length(4032) == 604
    assert probation_length(5000) == 750
    assert probation_length(22695) == 750


def test_detection_on_first_window_row_is_perfect() -> None:
    # N=100 -> 15 probationary rows; one window [50, 59].
    res = score_corpus({"a.csv": one_hot(100, {50: 1.0})}, {"a.csv": [(50, 59)]})
    std = res["standard"]
    assert std.raw == pytest.approx(1.0)
    assert std.threshold == 1.0
    assert std.null_raw == pytest.approx(-1.0)  # the null detector's best is to detect nothing here
    assert std.score == pytest.approx(100.0)
    assert res["reward_low_FN_rate"].score == pytest.approx(100.0)
    assert (std.tp, std.fn, std.fp) == (1, 0, 0)


def test_detection_in_middle_of_window() -> None:
    res = score_corpus({"a.csv": one_hot(100, {55: 1.0})}, {"a.csv": [(50, 59)]})
    v = sig(-(59 - 55 + 1) / 10) / sig(-1.0)  # = 0.8598
    assert res["standard"].raw == pytest.approx(v)
    assert res["standard"].score == pytest.approx(100 * (v + 1) / 2)
    assert res["reward_low_FN_rate"].score == pytest.approx(100 * (v + 2) / 3)


def test_false_positives_before_and_after_window() -> None:
    # FP before the first window costs A_FP; FP one window-width (w - 1 rows) after it costs A_FP * sig(1).
    scores = one_hot(100, {20: 1.0, 50: 1.0, 59 + 9: 1.0})
    res = score_corpus({"a.csv": scores}, {"a.csv": [(50, 59)]})
    for name, prof in DEFAULT_PROFILES.items():
        raw = 1.0 - prof.fp + prof.fp * sig(1.0)
        assert res[name].raw == pytest.approx(raw)
        assert res[name].score == pytest.approx(100 * (raw + prof.fn) / (prof.tp + prof.fn))
    assert res["standard"].fp == 2


def test_only_best_detection_per_window_counts() -> None:
    scores = one_hot(100, {52: 1.0, 53: 1.0, 58: 1.0})
    res = score_corpus({"a.csv": scores}, {"a.csv": [(50, 59)]})
    assert res["standard"].raw == pytest.approx(sig(-8 / 10) / sig(-1))


def test_probationary_rows_are_ignored() -> None:
    scores = one_hot(100, {3: 1.0, 50: 1.0})  # row 3 < 15: not scored, not an FP
    assert score_corpus({"a.csv": scores}, {"a.csv": [(50, 59)]})["standard"].raw == pytest.approx(1.0)


def test_a_window_inside_the_probation_is_not_scored_not_a_miss() -> None:
    """NAB's sweeper labels probationary rows "probationary", so such a window never enters the raw scores: counted
    as a miss, it lowered every detector's raw score and the null detector's by the miss's weight. NAB's
    normalisation (runner.normalize) still counts it in the perfect score."""
    scores = one_hot(100, {50: 1.0})
    both = score_corpus({"a.csv": scores}, {"a.csv": [(2, 5), (50, 59)]})["standard"]  # (2, 5) < 15 rows
    alone = score_corpus({"a.csv": scores}, {"a.csv": [(50, 59)]})["standard"]
    assert (both.raw, both.null_raw) == (alone.raw, alone.null_raw)
    assert (both.perfect_raw, alone.perfect_raw) == (2 * STD.tp, STD.tp)
    assert both.score == pytest.approx(100 * (both.raw - both.null_raw) / (2 * STD.tp - both.null_raw))
    with pytest.raises(ValueError, match="every labelled window lies in the probationary rows"):
        score_corpus({"a.csv": scores}, {"a.csv": [(2, 5)]})


def test_sweep_trades_a_window_against_false_positives() -> None:
    # File a: perfect hit at score 0.9. File b: hit on its window start at 0.5, but k FP rows score 0.6.
    def corpus(k: int) -> tuple[dict, dict]:
        b = one_hot(100, {60: 0.5, **{20 + j: 0.6 for j in range(k)}})
        return {"a.csv": one_hot(100, {50: 0.9}), "b.csv": b}, {"a.csv": [(50, 59)], "b.csv": [(60, 69)]}

    res = score_corpus(*corpus(5))
    # threshold 0.5: 1 + 1 - 5 A_FP (standard 1.45, low-FP 0.90) beats threshold 0.9: 1 - 1 = 0.
    assert res["standard"].threshold == 0.5
    assert res["standard"].raw == pytest.approx(2 - 5 * 0.11)
    assert res["reward_low_FP_rate"].raw == pytest.approx(2 - 5 * 0.22)
    res = score_corpus(*corpus(12))
    # 12 FPs: standard 2 - 1.32 = 0.68 still wins; low-FP 2 - 2.64 < 0 loses to threshold 0.9.
    assert res["standard"].threshold == 0.5
    assert res["reward_low_FP_rate"].threshold == 0.9
    assert res["reward_low_FP_rate"].raw == pytest.approx(0.0)
    assert res["reward_low_FP_rate"].per_file == {"a.csv": pytest.approx(1.0), "b.csv": pytest.approx(-1.0)}
    assert res["reward_low_FP_rate"].score == pytest.approx(50.0)


def test_equal_scores_switch_on_together() -> None:
    # The window hit and an FP row share the score 0.7, so the threshold 0.7 takes both.
    scores = one_hot(100, {20: 0.7, 50: 0.7})
    res = score_corpus({"a.csv": scores}, {"a.csv": [(50, 59)]})
    assert res["standard"].threshold == 0.7
    assert res["standard"].raw == pytest.approx(1.0 - 0.11)


def test_file_without_windows_contributes_only_false_positives() -> None:
    res = score_corpus(
        {"a.csv": one_hot(100, {50: 1.0}), "quiet.csv": one_hot(100, {40: 1.0, 41: 1.0})},
        {"a.csv": [(50, 59)], "quiet.csv": []},
    )
    assert res["standard"].raw == pytest.approx(1.0 - 2 * 0.11)
    assert res["standard"].per_file["quiet.csv"] == pytest.approx(-0.22)


def test_null_detector_goes_through_the_same_sweep() -> None:
    # Tiny file where detecting every row beats detecting nothing: N=32 (P=4), window [10, 29].
    n, win = 32, (10, 29)
    null_all = 1.0 - 6 * 0.11 + 0.11 * (sig(1 / 19) + sig(2 / 19))
    assert null_all > -1.0
    res = score_corpus({"a.csv": one_hot(n, {10: 1.0})}, {"a.csv": [win]})["standard"]
    assert res.null_raw == pytest.approx(null_all)
    assert res.score == pytest.approx(100.0)
    res = score_corpus({"a.csv": np.zeros(n)}, {"a.csv": [win]})["standard"]
    # Nothing above zero: the sweep's best is the null detector's "everything" (threshold 0.0).
    assert res.score == pytest.approx(0.0)


def test_sweep_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    prof = CostProfile(tp=1.0, fp=0.11, fn=2.0)
    for _ in range(20):
        n = int(rng.integers(60, 200))
        p = probation_length(n)
        wins = [(p + 10, p + 19), (p + 30, p + 45)] if rng.random() < 0.7 else []
        scores = np.round(rng.random(n), 1)  # many ties
        vals, wids = row_values(n, wins, prof, p)
        thr, raw = sweep_threshold(scores[p:], vals, wids, len(wins), prof.fn)
        candidates = [1.1, *np.unique(scores[p:])]
        brute = {c: file_raw_score(scores[p:], vals, wids, c, prof.fn)[0] for c in candidates}
        assert raw == pytest.approx(max(brute.values()))
        assert brute[thr] == pytest.approx(raw)


def test_row_values_after_window_use_the_last_ended_window() -> None:
    vals, wids = row_values(100, [(20, 29), (60, 79)], STD, 0)
    assert vals[30] == pytest.approx(0.11 * sig(1 / 9))
    assert vals[59] == pytest.approx(0.11 * sig(30 / 9))  # = -0.11, beyond 3 widths
    assert vals[80] == pytest.approx(0.11 * sig(1 / 19))
    assert vals[10] == pytest.approx(-0.11)
    assert list(wids[18:22]) == [-1, -1, 0, 0]
    assert vals[20] == pytest.approx(1.0)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_corpus({"a.csv": one_hot(100, {50: 1.5})}, {"a.csv": [(50, 59)]})
    with pytest.raises(ValueError, match="finite"):
        score_corpus({"a.csv": one_hot(100, {50: np.nan})}, {"a.csv": [(50, 59)]})
    with pytest.raises(ValueError, match="overlap"):
        score_corpus({"a.csv": np.zeros(100)}, {"a.csv": [(50, 59), (55, 70)]})
    with pytest.raises(ValueError, match="no labelled windows"):
        score_corpus({"a.csv": np.zeros(100)}, {"a.csv": []})


def test_load_profiles(tmp_path) -> None:
    cfg = {"standard": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}}}
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(cfg))
    assert load_profiles(path) == {"standard": STD}
