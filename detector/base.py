"""The detector contract: ``fit`` on normal data, ``score_windows`` (high = anomalous), thresholds separate.

Every detector kind (GRU/LSTM autoencoders, the windowed-Gaussian baseline) implements it, and one contract
test suite runs over all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .scoring import WindowScores
from .thresholds import Threshold

__all__ = ["Detector", "sliding_windows"]


def sliding_windows(X: np.ndarray, window: int, stride: int = 1) -> np.ndarray:
    """(T, F) -> (N, W, F) view of every ``stride``-th full window, oldest first (N = 0 when T < W)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a (T, F) array, got shape {X.shape}")
    if X.shape[0] < window:
        return np.empty((0, window, X.shape[1]), dtype=X.dtype)
    return sliding_window_view(X, window, axis=0).transpose(0, 2, 1)[::stride]  # (N, W, F)


class Detector(ABC):
    """Fit on (mostly) normal data; score windows; a fitted ``threshold`` turns scores into decisions."""

    kind: str
    window: int
    n_features: int
    feature_names: list[str]
    threshold: Threshold | None

    @abstractmethod
    def fit(self, X: np.ndarray, feature_names: list[str] | None = None) -> Detector:
        """Fit on a (T, F) array of normal data; calibrates ``threshold``; returns self."""

    @abstractmethod
    def score_windows(self, windows: np.ndarray) -> WindowScores:
        """(B, W, F) raw values -> raw scores (B,) and per-feature contributions (B, F)."""

    def score_series(self, X: np.ndarray) -> np.ndarray:
        """(T, F) -> (T,) score of the window ending at each row; NaN for the first W-1 rows."""
        X = np.asarray(X, dtype=np.float32)
        out = np.full(X.shape[0], np.nan, dtype=np.float64)
        windows = sliding_windows(X, self.window)
        if len(windows):
            out[self.window - 1 :] = self.score_windows(np.ascontiguousarray(windows)).score
        return out

    def normalised(self, scores: np.ndarray) -> np.ndarray:
        """Scores rescaled so that 1.0 is the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__} has no fitted threshold")
        return self.threshold.normalise(scores)
