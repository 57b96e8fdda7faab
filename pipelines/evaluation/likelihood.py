"""Causal statistics that turn a stream of raw errors into comparable anomaly scores in [0, 1].

Every function here is causal: the output for row ``t`` depends only on inputs at rows ``<= t``.

* :func:`anomaly_loglik` -- HTM's "anomaly likelihood" idea: the short-term mean of the raw error against
  the long-term distribution of that mean (Gaussian tail probability ``q``), optionally floored by the
  empirical frequency of equally large values in the past (a level already seen ``k`` times is no
  surprise), mapped to ``log(p) / log(1e-10)`` so that 0.5 means ``p = 1e-5``.
* :func:`seasonal_floor` -- the part of an error that did *not* also occur at the same time of day on each of
  the previous ``k`` days (a daily pattern's recurring error is expected, not anomalous).
* :func:`spatial_novelty` -- 1.0 where the value leaves the range of everything seen so far by more than
  a margin (HTM's "spatial anomaly" rule), else 0.
* :func:`suppress_after_alarm` -- an alert state machine: after a row reaches the alarm level, the next
  ``hold`` rows are set to 0 (NAB charges every extra detection as a false positive).
"""

from __future__ import annotations

import math

import numpy as np

_erfc = np.vectorize(math.erfc, otypes=[np.float64])
P_FLOOR = 1e-10  # smallest tail probability; maps to score 1.0


def causal_mean(x: np.ndarray, k: int) -> np.ndarray:
    """(T,) mean of the last ``k`` values up to and including each row (fewer at the start)."""
    c = np.concatenate(([0.0], np.cumsum(x, dtype=np.float64)))
    i = np.arange(len(x))
    lo = np.maximum(0, i - k + 1)
    return (c[i + 1] - c[lo]) / (i + 1 - lo)


def past_mean_std(m: np.ndarray, history: int, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``m`` over the ``history`` rows strictly before each row."""
    shift = float(m[0]) if len(m) else 0.0  # centring (on a past value) keeps the running sums accurate
    d = m - shift
    c1 = np.concatenate(([0.0], np.cumsum(d)))
    c2 = np.concatenate(([0.0], np.cumsum(d * d)))
    i = np.arange(len(m))
    lo = np.maximum(0, i - history)
    n = np.maximum(i - lo, 1)
    mean = (c1[i] - c1[lo]) / n
    var = (c2[i] - c2[lo]) / n - mean * mean
    return mean + shift, np.sqrt(np.maximum(var, min_std**2))


def past_count_at_least(m: np.ndarray, history: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """For each row: how many of the (about) ``history`` previous values are ``>= m[t]``, and how many
    previous values were compared. Computed in blocks: the window start moves once per block."""
    n = len(m)
    count = np.zeros(n)
    seen = np.zeros(n)
    for a in range(0, n, block):
        b = min(a + block, n)
        lo = max(0, a - history)
        past = np.sort(m[lo:a])
        blk = m[a:b]
        c = len(past) - np.searchsorted(past, blk, side="left")
        c = c + np.tril(blk[None, :] >= blk[:, None], -1).sum(axis=1)  # earlier rows of the same block
        count[a:b] = c
        seen[a:b] = (a - lo) + np.arange(b - a)
    return count, np.maximum(seen, 1)


def anomaly_loglik(
    raw: np.ndarray,
    avg: int = 10,
    history: int = 8640,
    min_std: float = 1e-3,
    seen_before: int = 0,
) -> np.ndarray:
    """Scores in [0, 1]: ``log(p) / log(1e-10)`` of the tail probability of the short-term mean error.

    ``p = Q((mean_avg(raw)_t - mu_t) / sigma_t)`` with ``mu, sigma`` over the previous ``history`` rows.
    With ``seen_before = k > 0``, ``p`` is floored by ``(c - k + 1) / n`` where ``c`` of the ``n`` previous
    short-term means were at least as large: a value that occurred ``k`` or more times is not rare.
    """
    m = causal_mean(np.asarray(raw, dtype=np.float64), avg)
    mu, sd = past_mean_std(m, history, min_std)
    p = 0.5 * _erfc((m - mu) / sd / math.sqrt(2.0))
    if seen_before > 0:
        count, seen = past_count_at_least(m, history)
        p = np.maximum(p, np.maximum(count - seen_before + 1, 0) / seen)
    return np.clip(np.log(p + P_FLOOR) / math.log(P_FLOOR), 0.0, 1.0)


def seasonal_floor(errors: np.ndarray, period: int, periods: int = 2, slack: int = 2) -> np.ndarray:
    """(T,) errors minus the error that recurred one, two, ... ``periods`` periods earlier (clipped at 0).

    The recurring error at row ``t`` is ``min over k = 1..periods of max(errors[t - k*period - slack :
    t - k*period + slack + 1])``: an error is discounted only as far as it was seen at the same phase of *every*
    one of the previous ``periods`` periods, give or take ``slack`` rows. Causal because ``slack < period``.
    Rows before ``periods * period`` and a ``period`` too short for the slack are returned unchanged.
    """
    e = np.asarray(errors, dtype=np.float64)
    n = len(e)
    if periods < 1 or period <= 2 * slack or periods * period >= n:
        return e.copy()
    padded = np.concatenate([np.zeros(slack), e, np.zeros(slack)])
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * slack + 1).max(axis=1)  # (T,) max e[i-s..i+s]
    start = periods * period
    recurring = np.full(n - start, np.inf)
    for k in range(1, periods + 1):
        lag = k * period
        recurring = np.minimum(recurring, local_max[start - lag : n - lag])  # rows t - lag, t in [start, n)
    out = e.copy()
    out[start:] = np.maximum(e[start:] - recurring, 0.0)
    return out


def spatial_novelty(values: np.ndarray, probation: int, margin: float = 0.05) -> np.ndarray:
    """1.0 where a value lies outside ``[min - margin * range, max + margin * range]`` of all previous
    values (the range starts as that of the probationary prefix), else 0.0. Rows before ``probation``: 0."""
    x = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(x))
    if probation < 1 or probation >= len(x):
        return out
    lo = np.minimum.accumulate(x)  # min of x[:t+1]
    hi = np.maximum.accumulate(x)
    prev_lo, prev_hi = lo[probation - 1 : -1], hi[probation - 1 : -1]  # ranges before each scored row
    span = prev_hi - prev_lo
    cur = x[probation:]
    out[probation:] = ((cur > prev_hi + margin * span) | (cur < prev_lo - margin * span)).astype(np.float64)
    return out


def suppress_after_alarm(scores: np.ndarray, level: float, hold: int) -> np.ndarray:
    """After a row reaches ``level``, zero the following ``hold`` rows (a new alarm can fire after that)."""
    s = np.asarray(scores, dtype=np.float64).copy()
    if hold <= 0:
        return s
    t = 0
    above = np.flatnonzero(s >= level)
    k = 0
    while k < len(above):
        t = above[k]
        s[t + 1 : t + 1 + hold] = 0.0
        k = int(np.searchsorted(above, t + hold + 1))
    return s
