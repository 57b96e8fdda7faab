"""The :class:`Threshold` interface and the score validation shared by its implementations.

The implementations (quantile, SPOT, DSPOT) and the factory functions are in :mod:`detector.thresholds`, which
re-exports everything public here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

__all__ = ["NotFittedError", "Threshold"]


class NotFittedError(RuntimeError):
    """Raised when a threshold is used before fit() (or before loading a fitted state)."""


def _eps(value: float) -> float:
    """The margin above ``value`` when no score exceeds it (constant scores): wider than float32 rounding, so the
    same window scored by another path (the fused kernel against eager PyTorch, another batch size: about 1e-7
    relative) is not over a threshold calibrated on it."""
    return max(1e-4 * abs(value), 1e-9)


def _as_scores(scores: Any, *, calibration: bool) -> np.ndarray:
    """Validate scores into a float64 (N,) array. NaN is always rejected, infinities in calibration."""
    x = np.asarray(scores, dtype=np.float64)
    x = x.reshape(1) if x.ndim == 0 else x
    if x.ndim != 1:
        raise ValueError(f"scores must be a 1-D array of shape (N,), got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"scores contain {int(np.isnan(x).sum())} NaN value(s)")
    if calibration and not np.isfinite(x).all():
        raise ValueError("calibration scores must be finite (found +/-inf)")
    if np.isneginf(x).any():
        raise ValueError("scores must not be -inf")
    return x


def _check_enough(x: np.ndarray, need: int, who: str) -> None:
    if len(x) < need:
        raise ValueError(f"{who}.fit needs at least {need} calibration scores, got {len(x)}")


def _state_float(state: dict[str, Any], key: str, who: str) -> float:
    """state[key] as a finite float; ValueError naming the field otherwise (KeyError when missing)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ValueError(f"{who} state field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _state_count(state: dict[str, Any], key: str, who: str) -> int:
    """state[key] as a non-negative int; ValueError naming the field otherwise (KeyError when missing)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{who} state field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _state_array(state: dict[str, Any], key: str, who: str, *, positive: bool = False) -> np.ndarray:
    """state[key] as a finite 1-D float64 array (all > 0 if ``positive``); ValueError naming the field."""
    value = state[key]
    try:
        x = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        x = None
    if x is None or x.ndim != 1 or not np.isfinite(x).all() or (positive and (x <= 0).any()):
        kind = "positive" if positive else "finite"
        raise ValueError(f"{who} state field {key!r} must be a list of {kind} numbers, got {value!r:.80}")
    return x


class Threshold(ABC):
    """A calibrated decision boundary on scalar anomaly scores (higher score = more anomalous)."""

    kind: ClassVar[str]

    @abstractmethod
    def fit(self, scores: np.ndarray) -> Threshold:
        """Calibrate on (N,) validation scores; returns self."""

    @property
    @abstractmethod
    def threshold(self) -> float:
        """Current threshold in score units; raises NotFittedError before fit()."""

    @abstractmethod
    def update(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: decide each score in order against the threshold at that moment, then adapt."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-serialisable)."""

    @abstractmethod
    def _state(self) -> dict[str, Any] | None:
        """JSON-serialisable fitted state, or None when unfitted."""

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore the state produced by _state()."""

    @property
    def fitted(self) -> bool:
        """Whether the threshold has been calibrated (by ``fit`` or a loaded fitted state)."""
        try:
            self.threshold  # noqa: B018  # raises NotFittedError before fit()
        except NotFittedError:
            return False
        return True

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: score > current threshold. No state change."""
        return _as_scores(scores, calibration=False) > self.threshold

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """(N,) float: 1 + (s - T)/|T| (= s / T when T > 0); 1.0 means 'at threshold'. No state change."""
        x, t = _as_scores(scores, calibration=False), self.threshold
        return 1.0 + (x - t) / max(abs(t), 1e-300)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable full state: {"kind", "params", "state"} ("state" is None when unfitted)."""
        return {"kind": self.kind, "params": self.params(), "state": self._state()}

    def _not_fitted(self) -> NotFittedError:
        return NotFittedError(f"{type(self).__name__} is not fitted: call fit(scores) first")
