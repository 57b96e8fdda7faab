"""Windowed-Gaussian baseline: the newest step's z-score against the rest of its window, per feature."""

from __future__ import annotations

import numpy as np

from .base import Detector, sliding_windows
from .scoring import WindowScores
from .thresholds import Threshold

__all__ = ["GaussianDetector"]


SD_FLOOR = 0.1  # a window's standard deviation is taken as at least this fraction of the feature's training one


class GaussianDetector(Detector):
    """Rolling z-score per feature; score = mean over features of z^2 (contributions = z^2 per feature).

    No learning beyond the threshold, which is calibrated on the last ``val_fraction`` of the training data, and
    the per-feature floor of the window's standard deviation: ``SD_FLOOR`` times the feature's standard deviation
    over the training data (1.0 for a constant feature, as the autoencoders' scaler). With an absolute floor
    (1e-6), a feature flat over one window and then moving by one step scored z^2 near 1e12, and the threshold
    calibrated on such scores was meaningless (SMD/ASD event F1 0.14 / 0.10 where a relative floor gives
    0.30-0.41 / 0.27-0.35 for factors from 0.01 to 1: ``benchmarks.baseline_floor``).
    """

    kind = "gaussian"

    def __init__(self, window: int = 64, n_features: int = 1, threshold: str = "spot",
                 threshold_params: dict | None = None, val_fraction: float = 0.2,
                 sd_floor: np.ndarray | None = None) -> None:
        """``sd_floor`` (F,) raw units: the floor to use instead of the one fit derives (benchmarks compare them)."""
        if window < 3:
            raise ValueError("GaussianDetector needs window >= 3")
        self.window = window
        self.n_features = n_features
        self.feature_names = [f"f{i}" for i in range(n_features)]
        self.threshold: Threshold | None = None
        self._threshold_kind = threshold
        self._threshold_params = threshold_params or {}
        self.val_fraction = val_fraction
        self._given_floor = None if sd_floor is None else np.asarray(sd_floor, dtype=np.float64)
        self.sd_floor = np.full(n_features, 1e-6) if sd_floor is None else self._given_floor  # (F,); fit sets it
        self.summary: dict = {}

    def fit(self, X: np.ndarray, feature_names: list[str] | None = None) -> GaussianDetector:
        X = np.asarray(X, dtype=np.float32)
        self.n_features = X.shape[1]
        self.feature_names = feature_names or [f"f{i}" for i in range(self.n_features)]
        if self._given_floor is None:
            std = X.astype(np.float64).std(axis=0)  # (F,)
            self.sd_floor = SD_FLOOR * np.where(std > 1e-12, std, 1.0)
        val = X[-max(int(len(X) * self.val_fraction), self.window + 20):]
        scores = self.score_windows(sliding_windows(val, self.window)).score
        from .training import calibrate_threshold

        self.threshold = calibrate_threshold(scores, self._threshold_kind, self._threshold_params,
                                             lambda _m: None)
        return self

    def score_windows(self, windows: np.ndarray) -> WindowScores:
        w = np.asarray(windows, dtype=np.float64)  # (B, W, F)
        past, last = w[:, :-1], w[:, -1]  # (B, W-1, F), (B, F)
        mu, sd = past.mean(axis=1), past.std(axis=1)  # (B, F)
        z2 = np.square((last - mu) / np.maximum(sd, self.sd_floor))  # (B, F)
        return WindowScores(score=z2.mean(axis=1), contributions=z2.astype(np.float32))
