"""SPOT's false-alarm rate against its ``risk`` when the calibration set is small.

``python -m benchmarks.threshold_far`` fits ``SPOTThreshold(risk=1e-3)`` on samples of known distributions
(exponential, log-normal, chi-squared with 8 degrees of freedom: shapes a reconstruction error takes) and reads
each fitted threshold's true false-alarm rate from the distribution's own tail. Per case, the median and mean
over ``--fits`` fits, three ways:

* ``spot``: the default (initial threshold at the 0.98 quantile: 1-2 peaks from 30-60 scores);
* ``10 peaks``: the initial threshold lowered to leave about 10 peaks;
* ``q0.99``: a plain 0.99 quantile (what ``calibrate_threshold`` fell back to when a tail fit failed, until the
  eighteenth session; now the quantile of the same risk, 1 - risk).

Seeded; numpy only. About 20 s.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import numpy as np

from detector.thresholds import make_threshold

RISK = 1e-3
SIZES = (30, 60, 200, 400)


def _lognormal_sf(x: float) -> float:
    return 0.5 * math.erfc(math.log(x) / math.sqrt(2.0)) if x > 0 else 1.0


def _chi2_8_sf(x: float) -> float:
    h = x / 2.0  # even degrees of freedom: exp(-h) * sum_{k<4} h^k / k!
    return math.exp(-h) * (1.0 + h + h * h / 2.0 + h ** 3 / 6.0) if x > 0 else 1.0


DISTRIBUTIONS: dict[str, tuple[Callable[[np.random.Generator, int], np.ndarray], Callable[[float], float]]] = {
    "exponential": (lambda rng, n: rng.exponential(size=n), lambda x: math.exp(-x) if x > 0 else 1.0),
    "log-normal": (lambda rng, n: rng.lognormal(0.0, 1.0, size=n), _lognormal_sf),
    "chi-squared(8)": (lambda rng, n: rng.chisquare(8, size=n), _chi2_8_sf),
}


def _threshold(method: str, x: np.ndarray) -> float:
    if method == "spot":
        return make_threshold("spot", risk=RISK).fit(x).threshold
    if method == "10 peaks":
        q0 = min(0.98, 1.0 - 10.5 / len(x))
        return make_threshold("spot", risk=RISK, init_quantile=q0).fit(x).threshold
    return make_threshold("quantile", q=0.99).fit(x).threshold


def run(fits: int, seed: int) -> list[dict]:
    rows = []
    for name, (sample, sf) in DISTRIBUTIONS.items():
        for n in SIZES:
            for method in ("spot", "10 peaks", "q0.99"):
                rng = np.random.default_rng(seed)  # the same samples for every method
                far = np.array([sf(_threshold(method, sample(rng, n))) for _ in range(fits)])
                rows.append({"distribution": name, "scores": n, "method": method,
                             "median_far": float(np.median(far)), "mean_far": float(far.mean())})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fits", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args.fits, args.seed)
    print(f"SPOT(risk={RISK:g}) false-alarm rate, median (mean) over {args.fits} fits")
    print(f"{'distribution':16s} {'scores':>6s}  " + "  ".join(f"{m:>20s}" for m in ("spot", "10 peaks", "q0.99")))
    for i in range(0, len(rows), 3):
        r = rows[i]
        cells = "  ".join(f"{x['median_far']:9.2e} ({x['mean_far']:8.2e})" for x in rows[i:i + 3])
        print(f"{r['distribution']:16s} {r['scores']:6d}  {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
