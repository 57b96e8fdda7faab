"""Anomaly thresholds on scalar scores (higher = more anomalous): static quantile, SPOT and DSPOT.

A threshold is calibrated by ``fit`` on validation scores, answers ``is_anomalous``/``normalise`` without
changing state, and adapts in streaming through ``update`` (decide each score in order, then learn from it).

* ``QuantileThreshold`` -- the ``q``-quantile of the calibration scores (a margin above it when no score exceeds
  it); never adapts.
* ``SPOTThreshold`` -- peaks-over-threshold (Siffer et al., KDD 2017): excesses over an initial threshold
  ``t`` (the ``init_quantile`` of calibration) follow a generalised Pareto distribution (GPD, fitted by
  :mod:`detector.gpd`); the threshold ``z`` is the score exceeded with probability ``risk``.  Streaming adds
  the excesses of non-anomalous scores and refits the GPD once ``refit_every`` new peaks have arrived; scores
  between refits are decided with numpy in bulk.
* ``DSPOTThreshold`` -- the same on drift-corrected scores ``x - mean(last depth normal scores)``.

Normalised scores: ``normalise(s) = 1 + (s - T) / |T|`` for the current threshold ``T``.  For ``T > 0`` (the
usual case: non-negative reconstruction errors) this is exactly ``s / T``.  It is 1.0 at the threshold,
increasing in ``s``, and above 1.0 exactly when ``is_anomalous`` is true.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ._threshold_base import NotFittedError as NotFittedError  # re-exported: callers catch it from here
from ._threshold_base import (
    Threshold,
    _as_scores,
    _check_enough,
    _eps,
    _state_array,
    _state_count,
    _state_float,
)
from .gpd import _gpd_moments as _gpd_moments  # re-exported: tests use it from here
from .gpd import fit_gpd, gpd_quantiles_beyond, pot_quantile

MIN_SCORES = 20  # fewest calibration scores accepted by fit()
_LOOKAHEAD = 4096  # scores examined per vectorised streaming pass


class QuantileThreshold(Threshold):
    """Static threshold: the q-quantile of the calibration scores (np.quantile, linear interpolation)."""

    kind: ClassVar[str] = "quantile"

    def __init__(self, q: float = 0.995) -> None:
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must be in (0, 1), got {q}")
        self.q = float(q)
        self._t: float | None = None

    def fit(self, scores: np.ndarray) -> QuantileThreshold:
        x = _as_scores(scores, calibration=True)
        _check_enough(x, MIN_SCORES, type(self).__name__)
        self._t = float(np.quantile(x, self.q))
        if (x == self._t).any() or not (x > self._t).any():  # on calibration scores (tied ones: a sensor flat in
            self._t += _eps(self._t)  # validation but for a blip), as SPOT: else another scoring path put them over
        return self

    @property
    def threshold(self) -> float:
        if self._t is None:
            raise self._not_fitted()
        return self._t

    def update(self, scores: np.ndarray) -> np.ndarray:
        return self.is_anomalous(scores)

    def params(self) -> dict[str, Any]:
        return {"q": self.q}

    def _state(self) -> dict[str, Any] | None:
        return None if self._t is None else {"threshold": self._t}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._t = _state_float(state, "threshold", type(self).__name__)


class SPOTThreshold(Threshold):
    """Peaks-over-threshold with a GPD tail; ``threshold`` is the score exceeded with probability ``risk``.

    State: base level ``t``; GPD (gamma, sigma); counts ``n`` (observations learnt from) and ``n_peaks``
    (of them above ``t``) giving the exceedance rate; the latest ``max_peaks`` excesses (the GPD is fitted
    to these).
    """

    kind: ClassVar[str] = "spot"
    _FLOATS: ClassVar[tuple[str, ...]] = ("t", "z", "gamma", "sigma")
    _INTS: ClassVar[tuple[str, ...]] = ("n", "n_peaks", "pending", "since", "imputed", "credit")

    def __init__(
        self, risk: float = 1e-3, init_quantile: float = 0.98, max_peaks: int = 5000, refit_every: int = 50
    ) -> None:
        if not 0.0 < init_quantile < 1.0:
            raise ValueError(f"init_quantile must be in (0, 1), got {init_quantile}")
        if not 0.0 < risk < 1.0 - init_quantile:
            raise ValueError(f"risk must be in (0, 1 - init_quantile = {1.0 - init_quantile:g}), got {risk}")
        if max_peaks < 10 or refit_every < 1:
            raise ValueError(f"need max_peaks >= 10 and refit_every >= 1, got {max_peaks}, {refit_every}")
        self.risk, self.init_quantile = float(risk), float(init_quantile)
        self.max_peaks, self.refit_every = int(max_peaks), int(refit_every)
        self._t: float | None = None
        self._z = self._gamma = self._sigma = 0.0
        self._credit = 0  # normal observations not yet spent on imputed false alarms (see _walk)
        self._n = self._n_peaks = self._pending = self._since = self._imputed = 0
        self._peaks = np.zeros(0)  # (P,) excesses over t, oldest first

    def fit(self, scores: np.ndarray) -> SPOTThreshold:
        x = _as_scores(scores, calibration=True)
        _check_enough(x, MIN_SCORES, type(self).__name__)
        self._calibrate(x)
        return self

    def _calibrate(self, x: np.ndarray) -> None:
        """Initial POT fit on (N,) (possibly drift-corrected) calibration values.

        Few calibration scores leave few peaks (1-2 of 21-60 scores at init_quantile 0.98): the tail fit then
        overshoots the target false-alarm rate (median 7-10x ``risk`` with 30-60 exponential, log-normal or
        chi-squared scores, 1.7-3.3x with 200-400; ``python -m benchmarks.threshold_far``). A 0.99-quantile fallback
        is worse; a lower initial quantile (10 peaks) helps the median somewhat (benchmarks/RESULTS.md, Accuracy
        caveats). Calibrate on more windows."""
        t = float(np.quantile(x, self.init_quantile))
        peaks = x[x > t] - t  # (P,)
        self._t, self._n, self._n_peaks, self._imputed, self._credit = t, len(x), len(peaks), 0, 0
        if len(peaks) > self.max_peaks:  # distribution-preserving subsample, shuffled so eviction is unbiased
            keep = np.sort(peaks)[np.linspace(0, len(peaks) - 1, self.max_peaks).round().astype(np.int64)]
            peaks = np.random.default_rng(0).permutation(keep)
        self._peaks = peaks
        self._refit()

    def _refit(self) -> None:
        """Refit the GPD on the kept peaks and recompute z (never below t + eps)."""
        assert self._t is not None
        self._pending = self._since = 0
        floor = self._t + _eps(self._level())
        if len(self._peaks) == 0:
            self._gamma, self._sigma, self._z = 0.0, 0.0, floor
            return
        self._gamma, self._sigma = fit_gpd(self._peaks)
        z = pot_quantile(self._t, self._gamma, self._sigma, self.risk, self._n, self._n_peaks)
        self._z = max(z, floor)

    def _level(self) -> float:
        """The size of the scores compared with ``z``, which its margin above ``t`` is relative to."""
        assert self._t is not None
        return self._t

    def _walk(self, alarm: np.ndarray) -> tuple[np.ndarray, int]:
        """False-alarm budget over observations flagged alarm (L,), in order: returns which alarms are learnt
        as imputed peaks (L,) and the credit after the last observation.

        Dropping every alarm would truncate the learnt tail at z, so refits would lower z step by step (the
        false-alarm rate grew ~10x over 2M Exp(1) scores).  So each normal observation earns one credit
        (capped: a burst of real anomalies can use little), and an alarm met with 1/risk credits spends them
        and is learnt as a peak imputed from the fitted GPD beyond z (see _impute).  The values of alarms
        themselves are never learnt.  Integer credits keep this exact however the scores are batched.
        """
        per = max(1, round(1.0 / self.risk))
        cap = per * max(2, round(4.0 * self.risk * self._min_obs))
        chosen, credit, normals = np.zeros(len(alarm), dtype=bool), self._credit, 0
        for k, pos in enumerate(np.flatnonzero(alarm).tolist()):  # alarms are rare: a python loop is fine
            credit, normals = min(credit + pos - k - normals, cap), pos - k
            if credit >= per:
                credit, chosen[pos] = credit - per, True
        return chosen, min(credit + len(alarm) - int(alarm.sum()) - normals, cap)

    def _learn(self, excess: np.ndarray, peak: np.ndarray, alarm: np.ndarray) -> None:
        """Learn from consecutive observations with excesses over t (E,), peak and alarm flags (E,)."""
        chosen, self._credit = self._walk(alarm)
        m = int(chosen.sum())
        if m:
            vals = np.where(peak, excess, np.nan)  # (E,)
            vals[chosen] = self._impute(m)
            learnt = vals[peak | chosen]  # (P,) in arrival order
        else:
            learnt = excess[peak]  # (P,)
        self._n += len(alarm) - int(alarm.sum()) + m
        self._n_peaks += len(learnt)
        self._pending += len(learnt)
        self._since += len(alarm)
        if len(learnt):
            self._peaks = np.concatenate([self._peaks, learnt])[-self.max_peaks :]

    def _impute(self, m: int) -> np.ndarray:
        """(m,) excesses over t at deterministic low-discrepancy quantiles of the fitted GPD beyond z."""
        u = np.modf((self._imputed + np.arange(1, m + 1)) * 0.6180339887498949)[0]  # (m,) in (0, 1)
        self._imputed += m
        return gpd_quantiles_beyond(self._gamma, self._sigma, self._z - self._t, u)

    @property
    def threshold(self) -> float:
        if self._t is None:
            raise self._not_fitted()
        return self._z

    @property
    def gpd(self) -> tuple[float, float]:
        """Current GPD parameters (gamma, sigma) of the excesses over the base level t."""
        return self._gamma, self._sigma

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_scores(scores, calibration=False)
        if self._t is None:
            raise self._not_fitted()
        if self._due():  # only a loaded state (a step refits when one falls due): DSPOT's step would make no progress
            self._refit()  # on a first score that alarms
        out = np.zeros(len(x), dtype=bool)  # (N,)
        i, look = 0, _LOOKAHEAD
        while i < len(x):
            j = self._step(x[i : i + look], out[i : i + look])
            assert j > 0, "threshold update made no progress"
            i, look = i + j, min(_LOOKAHEAD, max(64, 4 * j))  # shorter look-ahead while steps are short
        return out

    @property
    def _min_obs(self) -> float:
        """Observations expected to bring refit_every peaks; refits wait for them too, so a drifting stream in
        which every score is a peak does not refit every few scores."""
        return self.refit_every / (1.0 - self.init_quantile)

    def _due(self) -> bool:
        return self._pending >= self.refit_every and self._since >= self._min_obs

    def _cut(self, peak: np.ndarray) -> int:
        """How many leading observations (learnt-peak flags (L,)) to take before the next refit falls due."""
        seen = self._since + np.arange(1, len(peak) + 1)  # (L,)
        due = (np.cumsum(peak) >= self.refit_every - self._pending) & (seen >= self._min_obs)
        return int(np.argmax(due)) + 1 if due.any() else len(peak)

    def _step(self, seg: np.ndarray, out: np.ndarray) -> int:
        """Decide a prefix of seg (L,) into out (L,) up to the next refit (z constant meanwhile) and learn
        from it; returns the prefix length."""
        alarm = seg > self._z
        peak = (seg > self._t) & ~alarm
        end = self._cut(peak | self._walk(alarm)[0])
        out[:end] = alarm[:end]
        self._learn(seg[:end] - self._t, peak[:end], alarm[:end])
        if self._due():
            self._refit()
        return end

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("risk", "init_quantile", "max_peaks", "refit_every")}

    def _state(self) -> dict[str, Any] | None:
        if self._t is None:
            return None
        state = {k: float(getattr(self, f"_{k}")) for k in self._FLOATS}
        state.update({k: int(getattr(self, f"_{k}")) for k in self._INTS})
        return {**state, "peaks": self._peaks.tolist()}

    def _load_state(self, state: dict[str, Any]) -> None:
        who = type(self).__name__
        floats = {k: _state_float(state, k, who) for k in self._FLOATS}
        ints = {k: _state_count(state, k, who) for k in self._INTS}
        peaks = _state_array(state, "peaks", who, positive=True)
        if floats["sigma"] < 0.0:
            raise ValueError(f"{who} state field 'sigma' must be >= 0, got {floats['sigma']!r}")
        if floats["z"] <= floats["t"]:  # every score over t would alarm, the first peaks included
            raise ValueError(f"{who} state field 'z' must be above 't' ({floats['t']!r}), got {floats['z']!r}")
        # As fit and _learn keep them (n_peaks 0 beside peaks divided by zero): calibration leaves a score <= t, each
        # learnt peak counts in n too, the latest are kept; pending/since count learnt peaks/scores since a refit.
        n, n_peaks, pending, since = ints["n"], ints["n_peaks"], ints["pending"], ints["since"]
        for field, value, most, bound in (
            ("n_peaks", n_peaks, n - 1, f"be below 'n' ({n})"),
            ("pending", pending, n_peaks, f"be at most 'n_peaks' ({n_peaks})"),
            ("pending", pending, since, f"be at most 'since' ({since})"),
            ("imputed", ints["imputed"], n_peaks, f"be at most 'n_peaks' ({n_peaks})"),
            ("peaks", len(peaks), n_peaks, f"hold at most 'n_peaks' ({n_peaks}) excesses"),
            ("n_peaks", n_peaks, n_peaks if len(peaks) else 0, "be 0 with 'peaks' empty"),
        ):
            if value > most:
                raise ValueError(f"{who} state field {field!r} must {bound}, got {value}")
        for k, v in (floats | ints).items():
            setattr(self, f"_{k}", v)
        self._peaks = peaks[-self.max_peaks :]


class DSPOTThreshold(SPOTThreshold):
    """SPOT on drift-corrected scores x - M, M = mean of the last ``depth`` normal (non-alarm) raw scores.

    ``threshold`` is in raw score units: M + z for the current M.  ``fit`` needs ``depth + 20`` scores or
    more: the first ``depth`` only seed the moving average.
    """

    kind: ClassVar[str] = "dspot"

    def __init__(
        self,
        risk: float = 1e-3,
        init_quantile: float = 0.98,
        max_peaks: int = 5000,
        refit_every: int = 50,
        depth: int = 200,
    ) -> None:
        super().__init__(risk, init_quantile, max_peaks, refit_every)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self._window = np.zeros(0)  # (depth,) last normal raw scores, oldest first

    def fit(self, scores: np.ndarray) -> DSPOTThreshold:
        x, d = _as_scores(scores, calibration=True), self.depth
        who = f"{type(self).__name__}(depth={d})"
        _check_enough(x, d + MIN_SCORES, who)
        cs = np.concatenate([[0.0], np.cumsum(x - x.mean())])  # (N+1,)
        means = x.mean() + (cs[d:-1] - cs[: len(x) - d]) / d  # (N-d,) mean of the d scores before x[d:]
        self._window = x[-d:].copy()
        self._calibrate(x[d:] - means)
        return self

    def _level(self) -> float:
        """The raw scores' level: drift-corrected ones are near 0, while the rounding between two scoring paths is
        relative to the raw score."""
        return max(abs(super()._level()), abs(float(self._window.mean())) if len(self._window) else 0.0)

    @property
    def threshold(self) -> float:
        return super().threshold + float(self._window.mean())

    def _step(self, seg: np.ndarray, out: np.ndarray) -> int:
        """Assume seg (L,) is normal, take the prefix up to the first alarm (or refit), then take the run of
        alarms that follows it (alarms do not enter the window, so M is frozen during the run)."""
        d = self.depth
        base = float(self._window.mean())  # subtracted before the cumulative sum, for precision
        cs = np.concatenate([[0.0], np.cumsum(np.concatenate([self._window, seg]) - base)])  # (d+L+1,)
        with np.errstate(invalid="ignore"):  # inf - inf after a +inf score: such entries are never used
            mean = base + (cs[d : d + len(seg)] - cs[: len(seg)]) / d  # (L,) window mean before each score
        c = seg - mean  # (L,) drift-corrected
        alarm = c > self._z
        first_alarm = int(np.argmax(alarm)) if alarm.any() else len(seg)
        peak = c > self._t
        end = self._cut(peak[:first_alarm])
        self._learn(c[:end] - self._t, peak[:end], np.zeros(end, dtype=bool))
        self._window = np.concatenate([self._window, seg[:end]])[-d:]
        if self._due():
            self._refit()
            return end
        if end < len(seg):  # seg[end] is an alarm; mean[end] is exact since seg[:end] were all normal
            more = seg[end:] - mean[end] > self._z
            run = np.ones(len(more) if more.all() else int(np.argmin(more)), dtype=bool)  # (R,)
            run = run[: self._cut(self._walk(run)[0])]  # a refit may fall due within the run
            out[end : end + len(run)] = True
            self._learn(np.zeros(len(run)), ~run, run)
            if self._due():
                self._refit()
            end += len(run)
        return end

    def params(self) -> dict[str, Any]:
        return {**super().params(), "depth": self.depth}

    def _state(self) -> dict[str, Any] | None:
        state = super()._state()
        return None if state is None else {**state, "window": self._window.tolist()}

    def _load_state(self, state: dict[str, Any]) -> None:
        who = f"{type(self).__name__}(depth={self.depth})"
        window = _state_array(state, "window", who)
        if len(window) != self.depth:
            raise ValueError(f"{who} state field 'window' must hold depth={self.depth} scores, got {len(window)}")
        super()._load_state(state)
        self._window = window


_KINDS: dict[str, type[Threshold]] = {c.kind: c for c in (QuantileThreshold, SPOTThreshold, DSPOTThreshold)}


def _cls(kind: Any) -> type[Threshold]:
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(f"unknown threshold kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind]


def make_threshold(kind: str, **params: Any) -> Threshold:
    """Construct an unfitted threshold of the given kind ("quantile" | "spot" | "dspot")."""
    return _cls(kind)(**params)


def threshold_from_dict(d: dict[str, Any]) -> Threshold:
    """Rebuild a threshold (fitted or not) from Threshold.to_dict() output.

    Raises ValueError naming the field when ``d`` is not such a dict, its state is malformed (DSPOT: a drift
    window of other than ``depth`` scores) or the loaded threshold is not finite; KeyError for a missing field.
    """
    if not isinstance(d, dict):
        raise ValueError(f"threshold must be a dict with 'kind', 'params' and 'state', got {d!r:.80}")
    params, state = d.get("params", {}), d.get("state")
    if not isinstance(params, dict):
        raise ValueError(f"threshold 'params' must be a dict, got {params!r:.80}")
    if state is not None and not isinstance(state, dict):
        raise ValueError(f"threshold 'state' must be a dict or null, got {state!r:.80}")
    thr = _cls(d.get("kind"))(**params)
    if state is not None:
        thr._load_state(state)
        if not np.isfinite(thr.threshold):
            raise ValueError(f"threshold state gives a non-finite {thr.kind} threshold {thr.threshold!r}")
    return thr
