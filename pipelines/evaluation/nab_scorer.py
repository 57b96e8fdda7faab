"""Numenta Anomaly Benchmark (NAB) scorer: scaled-sigmoid row values, corpus-wide threshold sweep,
normalisation by the null and perfect detectors.

Pure functions over numpy arrays; the rules follow ``../shared/data/nab/SCORING.md`` (NAB at commit ea702d75):

* the first ``P = min(floor(0.15 N), 750)`` rows of a file are probationary and not scored;
* a detection is a row with ``score >= threshold``;
* inside a window ``[l, r]`` (row indices, inclusive, width ``w``) a detected row ``i`` is worth
  ``A_TP * sigma(-(r - i + 1) / w) / sigma(-1)``; only the best (earliest) detection of a window counts and
  a window without any detection costs ``-A_FN``;
* a detected row outside every window costs ``-A_FP`` before the file's first window and
  ``A_FP * sigma((i - r') / (w' - 1))`` after it, where ``[l', r']`` is the last window that already ended;
* one threshold per profile is chosen over the whole corpus by sweeping every distinct score (plus 1.1,
  which detects nothing) and keeping the largest raw score;
* ``NAB = 100 * (S - S_null) / (S_perfect - S_null)``, where the null detector (constant 0.5) goes through
  the same sweep and the perfect detector fires on the first row of every window only (``A_TP`` per window).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 5000  # the cap is PROBATION_FRACTION * 5000 = 750 rows
NOTHING_DETECTED = 1.1  # first candidate threshold of the sweep: above every valid score
Window = tuple[int, int]  # (first row, last row), both inclusive, 0-based row indices in the file


@dataclass(frozen=True)
class CostProfile:
    """Weights of one NAB application profile (``tnWeight`` is unused by NAB and therefore dropped)."""

    tp: float
    fp: float
    fn: float


DEFAULT_PROFILES: dict[str, CostProfile] = {
    "standard": CostProfile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": CostProfile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": CostProfile(tp=1.0, fp=0.11, fn=2.0),
}


@dataclass
class ProfileResult:
    """Outcome of scoring one corpus under one profile."""

    score: float  # normalised, 0 = null detector, 100 = perfect detector
    raw: float  # S(theta*)
    threshold: float  # theta*
    null_raw: float
    perfect_raw: float
    per_file: dict[str, float] = field(default_factory=dict)  # raw S_file(theta*)
    tp: int = 0  # windows with at least one detection at theta*
    fn: int = 0  # windows without a detection
    fp: int = 0  # detected rows outside every window

    def to_dict(self) -> dict[str, object]:
        return {
            "score": self.score,
            "raw": self.raw,
            "threshold": self.threshold,
            "null_raw": self.null_raw,
            "perfect_raw": self.perfect_raw,
            "windows_detected": self.tp,
            "windows_missed": self.fn,
            "false_positive_rows": self.fp,
            "per_file_raw": dict(self.per_file),
        }


def load_profiles(path: str | Path) -> dict[str, CostProfile]:
    """Read NAB's ``config/profiles.json`` (``{name: {"CostMatrix": {tpWeight, fpWeight, fnWeight}}}``)."""
    raw = json.loads(Path(path).read_text())
    profiles = {}
    for name, body in raw.items():
        cm = body["CostMatrix"]
        profiles[name] = CostProfile(
            tp=float(cm["tpWeight"]), fp=float(cm["fpWeight"]), fn=float(cm["fnWeight"])
        )
    return profiles


def probation_length(n_rows: int, fraction: float = PROBATION_FRACTION) -> int:
    """Number of probationary rows: ``min(floor(fraction * n), fraction * 5000)`` (750 for NAB's 0.15)."""
    return int(min(math.floor(fraction * n_rows), fraction * PROBATION_MAX_ROWS))


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """NAB's scaled sigmoid ``2 / (1 + exp(5 y)) - 1``, and exactly -1 from ``y >= 3`` (NAB's ``sweeper.py``)."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore"):
        s = 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0
    return np.where(y >= 3.0, -1.0, s)


def row_values(
    n_rows: int, windows: Sequence[Window], profile: CostProfile, probation: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row value ``v_i`` if the row were detected, and its window id (-1 outside every window).

    Returns arrays for the scored rows ``probation .. n_rows-1`` only: ``values (n_rows - probation,)`` and
    ``window_ids (n_rows - probation,)`` where window ids index ``windows`` after sorting by start.
    """
    wins = _check_windows(n_rows, windows)
    idx = np.arange(n_rows)
    values = np.full(n_rows, -profile.fp, dtype=np.float64)  # before the first window: -A_FP
    window_ids = np.full(n_rows, -1, dtype=np.int64)
    sig_m1 = float(scaled_sigmoid(-1.0))
    for k, (left, right) in enumerate(wins):
        width = right - left + 1
        inside = idx[left : right + 1]
        values[left : right + 1] = profile.tp * scaled_sigmoid(-(right - inside + 1) / width) / sig_m1
        window_ids[left : right + 1] = k
        # Rows after this window and before the next one are judged against this window.
        stop = wins[k + 1][0] if k + 1 < len(wins) else n_rows
        after = idx[right + 1 : stop]
        denom = max(width - 1, 1)  # NAB divides by (w' - 1); guard the degenerate 1-row window
        values[right + 1 : stop] = profile.fp * scaled_sigmoid((after - right) / denom)
    return values[probation:], window_ids[probation:]


def _check_windows(n_rows: int, windows: Sequence[Window]) -> list[Window]:
    wins = sorted((int(a), int(b)) for a, b in windows)
    for k, (a, b) in enumerate(wins):
        if not 0 <= a <= b < n_rows:
            raise ValueError(f"window {(a, b)} is not inside rows 0..{n_rows - 1}")
        if k and a <= wins[k - 1][1]:
            raise ValueError(f"windows {wins[k - 1]} and {(a, b)} overlap")
    return wins


def sweep_threshold(
    scores: np.ndarray, values: np.ndarray, window_ids: np.ndarray, n_windows: int, a_fn: float
) -> tuple[float, float]:
    """Exact corpus-wide sweep: the threshold with the largest raw score, and that score.

    ``scores``, ``values`` and ``window_ids`` are the concatenated scored rows of the whole corpus (window ids
    unique across files, ``0 .. n_windows-1``, -1 outside windows). Candidates are 1.1 (nothing detected)
    and every distinct score; on ties the highest threshold wins.
    """
    best_threshold, best_raw = NOTHING_DETECTED, -a_fn * n_windows
    if scores.size == 0:
        return best_threshold, best_raw
    order = np.argsort(-scores, kind="stable")  # descending
    s_sorted = scores[order]
    delta = np.where(window_ids[order] < 0, values[order], 0.0)  # FP rows add their value
    in_win = np.flatnonzero(window_ids[order] >= 0)  # positions (in sweep order) of window rows
    if in_win.size:
        wid = window_ids[order][in_win]
        # Group window rows by window, keeping sweep order inside a group, then a per-group running max.
        grp_order = np.lexsort((in_win, wid))
        g_wid, g_val = wid[grp_order], values[order][in_win][grp_order]
        span = float(np.max(np.abs(g_val))) + a_fn + 1.0
        running = np.maximum.accumulate(g_val + g_wid * span) - g_wid * span  # running max within a window
        first = np.ones(g_wid.size, dtype=bool)
        first[1:] = g_wid[1:] != g_wid[:-1]
        prev = np.where(first, -a_fn, np.concatenate(([0.0], running[:-1])))
        delta[in_win[grp_order]] = running - prev  # gain when this row switches on
    raw = -a_fn * n_windows + np.cumsum(delta)
    # A threshold equal to a score switches on every row with that score: evaluate at the end of tie runs.
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    k = int(np.argmax(raw[ends]))
    if raw[ends][k] > best_raw:
        best_threshold, best_raw = float(s_sorted[ends][k]), float(raw[ends][k])
    return best_threshold, best_raw


def file_raw_score(
    scores: np.ndarray, values: np.ndarray, window_ids: np.ndarray, threshold: float, a_fn: float
) -> tuple[float, int, int, int]:
    """``S_file(threshold)`` for one file's scored rows, with (windows detected, missed, FP rows)."""
    detected = scores >= threshold
    fp_mask = detected & (window_ids < 0)
    total = float(values[fp_mask].sum())
    tp = fn = 0
    for wid in np.unique(window_ids[window_ids >= 0]):
        hit = detected & (window_ids == wid)
        if hit.any():
            total += float(values[hit].max())
            tp += 1
        else:
            total -= a_fn
            fn += 1
    return total, tp, fn, int(fp_mask.sum())


def score_corpus(
    results: Mapping[str, np.ndarray],
    windows: Mapping[str, Sequence[Window]],
    profiles: Mapping[str, CostProfile] | None = None,
    probation_fraction: float = PROBATION_FRACTION,
) -> dict[str, ProfileResult]:
    """Score a detector's per-row anomaly scores on a corpus under every profile.

    ``results[name]`` is the detector's score for every row of file ``name`` (shape (N,), values in [0, 1],
    probationary rows included and ignored); ``windows[name]`` its labelled windows as inclusive row-index
    pairs (missing or empty: a file without anomalies).
    """
    profiles = DEFAULT_PROFILES if profiles is None else profiles
    names = sorted(results)
    if not names:
        raise ValueError("no result files to score")
    arrays = {n: _check_scores(n, results[n]) for n in names}
    n_windows_total = sum(len(windows.get(n, ())) for n in names)
    if n_windows_total == 0:
        raise ValueError("the corpus has no labelled windows; the NAB score is undefined")
    out: dict[str, ProfileResult] = {}
    for pname, profile in profiles.items():
        per_file_rows = {}
        offset = 0
        for n in names:
            scores = arrays[n]
            p = probation_length(scores.size, probation_fraction)
            vals, wids = row_values(scores.size, windows.get(n, ()), profile, p)
            wids = np.where(wids >= 0, wids + offset, -1)
            offset += len(windows.get(n, ()))
            per_file_rows[n] = (scores[p:], vals, wids)
        all_vals = np.concatenate([r[1] for r in per_file_rows.values()])
        all_wids = np.concatenate([r[2] for r in per_file_rows.values()])
        all_scores = np.concatenate([r[0] for r in per_file_rows.values()])
        # A window with no row after the probation is no miss, as in NAB's sweeper; NAB's normalisation still counts
        # it in the perfect detector's score (runner.normalize: every labelled window)
        n_scored = int(np.unique(all_wids[all_wids >= 0]).size)
        if n_scored == 0:
            raise ValueError("every labelled window lies in the probationary rows; the NAB score is undefined")
        threshold, raw = sweep_threshold(all_scores, all_vals, all_wids, n_scored, profile.fn)
        null_scores = np.full_like(all_scores, 0.5)  # NAB's null detector
        _, null_raw = sweep_threshold(null_scores, all_vals, all_wids, n_scored, profile.fn)
        perfect_raw = profile.tp * n_windows_total
        if perfect_raw <= null_raw:
            raise ValueError(f"profile {pname}: the null detector scores as well as a perfect one")
        result = ProfileResult(
            score=100.0 * (raw - null_raw) / (perfect_raw - null_raw),
            raw=raw,
            threshold=threshold,
            null_raw=null_raw,
            perfect_raw=perfect_raw,
        )
        for n, (s, v, w) in per_file_rows.items():
            f_raw, tp, fn, fp = file_raw_score(s, v, w, threshold, profile.fn)
            result.per_file[n] = f_raw
            result.tp, result.fn, result.fp = result.tp + tp, result.fn + fn, result.fp + fp
        out[pname] = result
    return out


def _check_scores(name: str, scores: np.ndarray) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: anomaly scores must be finite (NaN/inf found)")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        lo, hi = arr.min(), arr.max()
        raise ValueError(f"{name}: anomaly scores must lie in [0, 1] (got {lo:.4g} .. {hi:.4g})")
    return arr
