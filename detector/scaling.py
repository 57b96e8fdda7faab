"""Per-feature scaling fitted on training data and stored with the model."""

from __future__ import annotations

import numpy as np

__all__ = ["SCALER_METHODS", "Scaler"]

SCALER_METHODS = ("robust", "standard")


class Scaler:
    """``(x - center) / scale`` per feature.

    ``robust``: center = median, scale = inter-quartile range; ``standard``: mean and standard deviation.
    A feature whose spread is zero (a constant sensor) falls back to the standard deviation, then to 1.0,
    so scaling never divides by zero.
    """

    def __init__(self, method: str = "robust") -> None:
        if method not in SCALER_METHODS:
            raise ValueError(f"scaler method must be one of {SCALER_METHODS}, got {method!r}")
        self.method = method
        self.center: np.ndarray | None = None  # (F,)
        self.scale: np.ndarray | None = None  # (F,)

    def fit(self, X: np.ndarray, missing_ok: bool = False, names: list[str] | None = None) -> Scaler:
        """Fit on (T, F) rows. ``missing_ok``: NaN marks a value not reported (a feature one series lacks), and
        each feature is fitted on its reported values; one reported nowhere gets center 0 and scale 1. A feature
        whose center or scale is beyond float32 (values spread over more than about 1.7e38) is a ValueError naming
        it (by ``names``, when given, and index)."""
        X = np.asarray(X, dtype=np.float64)  # (T, F)
        if X.ndim != 2 or X.shape[0] < 2:
            raise ValueError(f"Scaler.fit needs a (T, F) array with T >= 2, got shape {X.shape}")
        missing = np.isnan(X) if missing_ok else np.zeros(X.shape, dtype=bool)
        if not np.isfinite(X[~missing]).all():
            raise ValueError("Scaler.fit: training data contains NaN or inf")
        if has_missing := bool(missing.any()):
            X = np.where(missing.all(axis=0), 0.0, X)  # a feature reported nowhere: center 0, scale 1
        mean, median, pct, sd = ((np.nanmean, np.nanmedian, np.nanpercentile, np.nanstd) if has_missing else
                                 (np.mean, np.median, np.percentile, np.std))
        std = sd(X, axis=0)
        if self.method == "robust":
            center = median(X, axis=0)
            q75, q25 = pct(X, [75, 25], axis=0)
            scale = q75 - q25
            scale = np.where(scale > 1e-12, scale, std)
        else:
            center = mean(X, axis=0)
            scale = std
        with np.errstate(over="ignore"):  # beyond float32: inf, refused below
            center, scale = center.astype(np.float32), np.where(scale > 1e-12, scale, 1.0).astype(np.float32)
        if not (finite := np.isfinite(center) & np.isfinite(scale)).all():  # every value of it had scaled to 0
            j = int(np.flatnonzero(~finite)[0])
            feature = f"feature {j}" + (f" ({names[j]!r})" if names else "")
            raise ValueError(f"Scaler.fit: {feature}: its values' spread (or size) is too large for float32 (center "
                             f"{center[j]:.3g}, scale {scale[j]:.3g}); rescale it (other units) or leave it out")
        self.center, self.scale = center, scale
        return self

    def _check(self) -> tuple[np.ndarray, np.ndarray]:
        if self.center is None or self.scale is None:
            raise RuntimeError("Scaler is not fitted")
        return self.center, self.scale

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale an array whose last axis is features: (..., F) -> (..., F) float32."""
        center, scale = self._check()
        with np.errstate(over="ignore"):  # a reading far outside the fitted range: inf, which callers handle
            return ((np.asarray(X, dtype=np.float32) - center) / scale).astype(np.float32, copy=False)

    def inverse_transform(self, X: np.ndarray) -> np.ndarray:
        center, scale = self._check()
        return np.asarray(X, dtype=np.float32) * scale + center

    @property
    def n_features(self) -> int:
        return int(self._check()[0].shape[0])

    def to_dict(self) -> dict:
        center, scale = self._check()
        return {"method": self.method, "center": center.tolist(), "scale": scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        s = cls(d["method"])
        center = np.asarray(d["center"], dtype=np.float32)
        scale = np.asarray(d["scale"], dtype=np.float32)
        if center.shape != scale.shape or center.ndim != 1:
            raise ValueError("scaler center and scale must be 1-D arrays of equal length")
        if not (np.isfinite(center).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scaler center/scale must be finite and scale positive")
        s.center, s.scale = center, scale
        return s
