"""Segmented operations on a batch sorted by stream: rows of one stream form a contiguous group.

Used by :class:`~detector.windows.WindowBuffer` to process every stream of a batch at once, without a
Python loop over streams or events.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accept_mask", "accepted_events", "sorted_groups"]


def sorted_groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a stream array sorted by stream: first row of each group ``starts`` (G,), group of each row
    ``gid`` (N,)."""
    new = np.empty(s.shape[0], dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    return np.flatnonzero(new), np.cumsum(new) - 1


def accept_mask(t: np.ndarray, gid: np.ndarray, starts: np.ndarray, init: np.ndarray) -> np.ndarray:
    """Events not late: ``t >= max(init of its group, t of earlier events of its group)``, (N,) bool.

    A segmented cumulative maximum: timestamps are mapped to small non-negative keys ``x`` (an offset, or
    dense ranks when the key ``group * span + x`` could overflow) and the running maximum of that key never
    crosses from one group into the next. Late events may be included in the running max: they are below
    it anyway.
    """
    lo, hi = int(t.min()), int(t.max())
    g = starts.shape[0]
    if (hi - lo + 3) * g < 2**62 and lo > np.iinfo(np.int64).min + 2:
        # init outside [lo-1, hi+1] compares with every t like its clipped value.
        x = t - (lo - 1)  # (N,) in [1, hi-lo+1]
        x0 = np.clip(init, lo - 1, hi + 1) - (lo - 1)  # (G,)
        span = hi - lo + 3
    else:
        _, inv = np.unique(np.concatenate([t, init]), return_inverse=True)
        x, x0 = inv[: t.shape[0]].astype(np.int64), inv[t.shape[0]:].astype(np.int64)
        span = int(inv.max()) + 1
    off = gid * span  # (N,)
    run = np.maximum.accumulate(off + x)  # (N,)
    prev = np.empty_like(run)
    prev[0] = -1
    prev[1:] = run[:-1] - off[1:]
    prev[starts] = -1  # nothing earlier in the group
    return x >= np.maximum(prev, x0[gid])


def accepted_events(stream: np.ndarray, ts: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(N,) in input order, which events of a batch a window buffer accepted (not late), given ``prior`` (N,): each
    event's stream's largest accepted timestamp before the batch."""
    order = np.argsort(stream, kind="stable")
    starts, gid = sorted_groups(stream[order])
    out = np.empty(len(stream), dtype=bool)
    out[order] = accept_mask(ts[order], gid, starts, prior[order][starts])
    return out
