"""Synthetic multi-sensor data with labelled injected anomalies (tests, demo, `anomalyd produce`).

Normal data: a few seasonal latent signals mixed into correlated features plus noise. Five anomaly kinds:

- ``spike``: a few rows far off on one feature;
- ``level_shift``: one feature offset by several standard deviations for a stretch;
- ``frequency``: a stretch where the seasonal pattern runs at a different frequency on all features;
- ``stuck``: one feature frozen at its value (a stuck sensor);
- ``correlation``: one feature of a correlated pair flips sign around its mean (the pair decouples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ANOMALY_KINDS", "InjectedAnomaly", "SyntheticSeries", "SensorModel", "inject", "make_dataset"]

ANOMALY_KINDS = ("spike", "level_shift", "frequency", "stuck", "correlation")


@dataclass(frozen=True)
class InjectedAnomaly:
    kind: str
    start: int  # first anomalous row (inclusive)
    end: int  # last anomalous row (inclusive)
    features: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "start": self.start, "end": self.end, "features": list(self.features)}


@dataclass
class SyntheticSeries:
    values: np.ndarray  # (T, F) float32
    labels: np.ndarray  # (T,) bool
    anomalies: list[InjectedAnomaly] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)


class SensorModel:
    """A deterministic generator of one stream's normal behaviour (seeded)."""

    def __init__(self, n_features: int = 4, period: float = 48.0, noise: float = 0.05, seed: int = 0) -> None:
        if n_features < 2:
            raise ValueError("SensorModel needs at least 2 features (the correlation anomaly needs a pair)")
        self.n_features, self.period, self.noise = n_features, period, noise
        rng = np.random.default_rng(seed)
        self.phase = rng.uniform(0, 2 * np.pi, size=2)
        mix = rng.normal(size=(n_features, 2))
        mix[1] = mix[0] * 0.9 + 0.1 * mix[1]  # features 0 and 1 strongly correlated
        self.mix = mix / np.linalg.norm(mix, axis=1, keepdims=True)
        self.offset = rng.uniform(-1.0, 1.0, size=n_features)
        self.gain = rng.uniform(0.5, 2.0, size=n_features)
        self.feature_names = [f"sensor_{i}" for i in range(n_features)]
        self._rng = np.random.default_rng(seed + 1)

    def latent(self, t: np.ndarray, freq_scale: np.ndarray | float = 1.0) -> np.ndarray:
        """(T,) time -> (T, 2) seasonal latent signals."""
        w = 2 * np.pi / self.period * freq_scale
        a = np.sin(w * t + self.phase[0]) + 0.3 * np.sin(2 * w * t + self.phase[1])
        b = np.cos(w * t / 3.0 + self.phase[1])
        return np.stack([a, b], axis=1)

    def normal(self, t: np.ndarray, freq_scale: np.ndarray | float = 1.0) -> np.ndarray:
        """(T,) time -> (T, F) normal readings."""
        clean = self.latent(t, freq_scale) @ self.mix.T  # (T, F)
        noise = self._rng.normal(scale=self.noise, size=clean.shape)
        return ((clean + noise) * self.gain + self.offset).astype(np.float32)


def inject(X: np.ndarray, t: np.ndarray, model: SensorModel, kind: str, start: int, length: int,
            rng: np.random.Generator) -> InjectedAnomaly:
    """Inject one anomaly of ``kind`` into X (T, F) in place from row ``start``; returns what was injected."""
    F = X.shape[1]
    end = min(start + length, len(X)) - 1
    sl = slice(start, end + 1)
    std = X.std(axis=0)
    if kind == "spike":
        f = int(rng.integers(F))
        end = min(start + 2, len(X) - 1)
        X[start:end + 1, f] += rng.choice([-1, 1]) * 6.0 * std[f]
        return InjectedAnomaly(kind, start, end, (f,))
    if kind == "level_shift":
        f = int(rng.integers(F))
        X[sl, f] += rng.choice([-1, 1]) * 2.5 * std[f]
        return InjectedAnomaly(kind, start, end, (f,))
    if kind == "frequency":
        X[sl] = model.normal(t[sl], freq_scale=2.7)
        return InjectedAnomaly(kind, start, end, tuple(range(F)))
    if kind == "stuck":
        f = int(rng.integers(F))
        X[sl, f] = X[start, f]
        return InjectedAnomaly(kind, start, end, (f,))
    if kind == "correlation":
        mean = X[:, 1].mean()
        X[sl, 1] = 2 * mean - X[sl, 1]
        return InjectedAnomaly(kind, start, end, (0, 1))
    raise ValueError(f"unknown anomaly kind {kind!r}; known: {ANOMALY_KINDS}")


def make_dataset(
    n_train: int = 3000,
    n_test: int = 3000,
    n_features: int = 4,
    kinds: tuple[str, ...] = ANOMALY_KINDS,
    anomaly_length: int = 40,
    period: float = 48.0,
    noise: float = 0.05,
    seed: int = 0,
    t0: int = 0,
) -> tuple[np.ndarray, SyntheticSeries]:
    """Clean training data (n_train, F) and a test stretch with one anomaly of each kind, evenly spaced."""
    model = SensorModel(n_features, period, noise, seed)
    rng = np.random.default_rng(seed + 2)
    train = model.normal(np.arange(t0, t0 + n_train, dtype=np.float64))
    t = np.arange(t0 + n_train, t0 + n_train + n_test, dtype=np.float64)
    X = model.normal(t)
    labels = np.zeros(n_test, dtype=bool)
    anomalies = []
    gap = n_test // (len(kinds) + 1)
    for i, kind in enumerate(kinds):
        start = gap * (i + 1) - anomaly_length // 2
        a = inject(X, t, model, kind, start, anomaly_length, rng)
        labels[a.start:a.end + 1] = True
        anomalies.append(a)
    return train, SyntheticSeries(X, labels, anomalies, list(model.feature_names))
