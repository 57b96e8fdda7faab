"""Generalised Pareto distribution (GPD) tail fitting for peaks-over-threshold (SPOT, Siffer et al., KDD 2017).

``fit_gpd`` fits (gamma, sigma) to positive excesses over a base level by Grimshaw's maximum-likelihood procedure
(roots of his equation found by grid bracketing and vectorised bisection), falling back to the method of moments;
``pot_quantile`` turns a fitted tail into the SPOT threshold exceeded with a given probability, and
``gpd_quantiles_beyond`` gives quantiles of the excesses that lie beyond a level (SPOT imputes peaks with them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["fit_gpd", "gpd_quantiles_beyond", "pot_quantile"]

_GRID = 64  # grid points per side when bracketing roots of Grimshaw's equation
_X_MAX = 1e100  # cap on the root bound x max(y): 2(mean-min)/min^2 overflows (or divides by 0) as min(y) -> 0


def _w(xs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Grimshaw's w(x) = u(x) v(x) - 1 at each x in xs (G,) for excesses y (N,); returns (G,)."""
    s = 1.0 + xs[:, None] * y[None, :]  # (G, N)
    return np.mean(1.0 / s, axis=1) * (1.0 + np.mean(np.log(s), axis=1)) - 1.0


def _bisect(f: Any, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Vectorised bisection of f (K,) -> (K,) over brackets [lo, hi] (K,) with sign changes."""
    flo = f(lo)
    for _ in range(36 if len(lo) else 0):
        mid = 0.5 * (lo + hi)
        fm = f(mid)
        same = np.sign(fm) == np.sign(flo)
        lo, hi, flo = np.where(same, mid, lo), np.where(same, hi, mid), np.where(same, fm, flo)
    return 0.5 * (lo + hi)


def _candidates(y: np.ndarray) -> np.ndarray:
    """Candidate x = gamma/sigma for the GPD fit of excesses y (N,): the non-zero roots of w on
    (-1/max y, 0) and (0, 2(mean-min)/min^2] (grid bracketing, then bisection), plus the x where
    gamma(x) = mean(log(1 + x y)) = -1, the edge of the regular ML region (uniform-like tails peak there)."""
    ymin, ymax, ymean = float(y.min()), float(y.max()), float(y.mean())
    # |x| max(y) < 1e-4 is skipped: w is O(x^2) there (below rounding noise) and such roots mean gamma ~ 0.
    frac = np.concatenate([np.geomspace(1e-4, 0.5, _GRID // 2), 1.0 - np.geomspace(1e-12, 0.5, _GRID // 2)])
    left = -np.unique(frac)[::-1] / ymax  # (G,) ascending from just above -1/ymax towards 0
    with np.errstate(over="ignore", divide="ignore"):
        upper = float(np.float64(2.0) * (ymean - ymin) / np.float64(ymin) / ymin)  # inf when min(y) ~ 0
    upper = min(upper, _X_MAX / ymax)
    right = np.geomspace(min(1e-4 / ymax, 1e-3 * upper), upper, _GRID)  # (G,)
    found = []
    for grid in (left, right):
        vals = _w(grid, y)  # (G,)
        ok = np.isfinite(vals[:-1]) & np.isfinite(vals[1:])
        idx = np.flatnonzero(ok & (np.sign(vals[:-1]) * np.sign(vals[1:]) < 0))
        found += [grid[:-1][vals[:-1] == 0.0], _bisect(lambda xs: _w(xs, y), grid[idx], grid[idx + 1])]
    gamma_plus_1 = lambda xs: np.mean(np.log1p(xs[:, None] * y[None, :]), axis=1) + 1.0  # (K,)
    if gamma_plus_1(left[:1])[0] < 0.0:
        found.append(_bisect(gamma_plus_1, left[:1], np.zeros(1)))
    roots = np.concatenate(found)
    return roots[roots != 0.0]


def _gpd_moments(y: np.ndarray) -> tuple[float, float]:
    """Method-of-moments (gamma, sigma) of a GPD for excesses y."""
    m, var = float(y.mean()), float(y.var())
    if var <= 0.0:
        return 0.0, m
    return 0.5 * (1.0 - m * m / var), 0.5 * m * (m * m / var + 1.0)


def fit_gpd(excesses: np.ndarray) -> tuple[float, float]:
    """Fit a generalised Pareto distribution to positive excesses (N,); returns (gamma, sigma).

    Grimshaw's procedure as in SPOT: each root x* of the likelihood equation gives
    gamma = mean(log(1 + x* y)), sigma = gamma / x*; among these, the exponential case (gamma = 0,
    sigma = mean(y)) and the boundary gamma = -1 (the likelihood is unbounded below it, so gamma >= -1 is
    imposed) the best log-likelihood wins.  Falls back to the method of moments if not finite.  The fit runs on
    y / 2^k with max(y / 2^k) in [0.5, 1) (exact rescaling; sigma scaled back), so excesses of any magnitude,
    and ones as small as 1e-200 beside 1, neither overflow nor divide by zero.
    """
    y = np.asarray(excesses, dtype=np.float64)
    if len(y) == 0 or not (y > 0).all() or not np.isfinite(y).all():
        raise ValueError("fit_gpd needs a non-empty array of strictly positive, finite excesses")
    scale = float(np.ldexp(1.0, int(np.frexp(y.max())[1])))  # a power of two
    gamma, sigma = _fit_unit_gpd(y / scale)
    return gamma, sigma * scale


def _fit_unit_gpd(y: np.ndarray) -> tuple[float, float]:
    """fit_gpd on excesses y (N,) scaled to max(y) in [0.5, 1) (some may have underflowed to 0)."""
    n, ymean = len(y), float(y.mean())
    best, best_ll = (0.0, ymean), -n * (np.log(ymean) + 1.0)  # exponential case
    if float(y.max() - y.min()) > 1e-12 * ymean:
        with np.errstate(all="ignore"):
            for x in _candidates(y):
                gamma = float(np.mean(np.log1p(x * y)))  # the ML gamma given x (profile likelihood)
                sigma = gamma / x
                ll = -n * (np.log(sigma) + 1.0 + gamma)  # as sum log1p(x y) == n gamma
                if gamma >= -1.0 - 1e-9 and sigma > 0 and np.isfinite(ll) and ll > best_ll:
                    best, best_ll = (gamma, float(sigma)), ll
    if not (np.isfinite(best[0]) and np.isfinite(best[1]) and best[1] > 0):
        best = _gpd_moments(y)
    return best


def pot_quantile(t: float, gamma: float, sigma: float, risk: float, n: int, n_peaks: int) -> float:
    """SPOT threshold: t + sigma/gamma ((q n / N_t)^-gamma - 1), or t - sigma log(q n / N_t) for gamma = 0."""
    r = risk * n / n_peaks
    if abs(gamma) < 1e-12:
        return t - sigma * float(np.log(r))
    return t + sigma / gamma * (float(r ** (-gamma)) - 1.0)


def gpd_quantiles_beyond(gamma: float, sigma: float, level: float, u: np.ndarray) -> np.ndarray:
    """(m,) quantiles at u (m,) in (0, 1) of GPD(gamma, sigma) excesses conditioned on exceeding ``level``.

    The excess over ``level`` is GPD(gamma, sigma + gamma * level); where that scale is not positive (the
    support ends at ``level``) every quantile is ``level``."""
    s = sigma + gamma * level
    if s <= 0.0:
        return np.full(len(u), level)
    if abs(gamma) < 1e-12:
        return level - s * np.log1p(-u)
    return level + s / gamma * ((1.0 - u) ** (-gamma) - 1.0)
