"""One PNG per series/entity: signal, anomaly score, threshold, detections and labelled windows (matplotlib Agg)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipelines.evaluation.metrics import segments

MAX_FEATURES_DRAWN = 8  # multivariate: the features that move most inside labelled windows


def safe_filename(name: str) -> str:
    """A file-system safe stem for a series name ("realKnownCause/nyc_taxi.csv" -> "realKnownCause__nyc_taxi")."""
    stem = name[:-4] if name.endswith(".csv") else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", stem).strip("_") or "series"


def _pick_features(signal: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the features with the largest standardised deviation inside labelled rows (else overall)."""
    sd = signal.std(axis=0)
    z = (signal - signal.mean(axis=0)) / np.where(sd > 0, sd, 1.0)  # (T, F)
    rows = labels.astype(bool) if labels.any() else np.ones(len(signal), dtype=bool)
    strength = np.abs(z[rows]).mean(axis=0)
    return np.argsort(-strength)[:MAX_FEATURES_DRAWN]


def plot_detection(
    path: str | Path,
    title: str,
    signal: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    labels: np.ndarray,
    probation: int = 0,
    feature_names: list[str] | None = None,
    log_scores: bool = False,
) -> Path:
    """Write one figure: the signal with labelled windows shaded and detections marked; below, the score
    with its threshold. ``signal`` is (T,) or (T, F); ``scores`` (T,); ``labels`` (T,) 0/1; rows before
    ``probation`` (not scored) are shaded grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = np.asarray(signal, dtype=np.float64)
    sig = sig[:, None] if sig.ndim == 1 else sig  # (T, F)
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    t = np.arange(len(s))
    detected = np.isfinite(s) & (s >= threshold)
    detected[:probation] = False

    fig, (ax_sig, ax_score) = plt.subplots(
        2, 1, figsize=(14, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for ax in (ax_sig, ax_score):
        for a, b in segments(y):
            ax.axvspan(a - 0.5, b + 0.5, color="tab:red", alpha=0.15, lw=0)
        if probation:
            ax.axvspan(-0.5, probation - 0.5, color="0.85", alpha=0.6, lw=0)
        ax.grid(alpha=0.3)

    cols = _pick_features(sig, y) if sig.shape[1] > 1 else np.array([0])
    for j in cols:
        label = feature_names[j] if feature_names else (f"f{j}" if sig.shape[1] > 1 else "value")
        ax_sig.plot(t, sig[:, j], lw=0.7, label=label)
    if detected.any():
        top = np.nanmax(sig[:, cols]) if np.isfinite(sig[:, cols]).any() else 1.0
        ax_sig.scatter(t[detected], np.full(int(detected.sum()), top), marker="v", s=18, color="black",
                       zorder=3, label="detection")
    ax_sig.set_ylabel("signal")
    ax_sig.legend(loc="upper left", fontsize=7, ncol=min(len(cols) + 1, 5), framealpha=0.8)
    ax_sig.set_title(title, fontsize=10, loc="left")

    shown = np.where(np.isfinite(s), s, np.nan)
    ax_score.plot(t, shown, lw=0.7, color="tab:blue", label="anomaly score")
    ax_score.axhline(threshold, color="tab:orange", ls="--", lw=1.0, label=f"threshold {threshold:.4g}")
    if detected.any():
        ax_score.scatter(t[detected], s[detected], s=10, color="black", zorder=3, label="detection")
    if log_scores and np.any(shown > 0):
        ax_score.set_yscale("log")  # heavy-tailed raw errors; non-positive values are masked
    ax_score.set_ylabel("score")
    ax_score.set_xlabel("row")
    ax_score.legend(loc="upper left", fontsize=7, ncol=3, framealpha=0.8)
    ax_score.text(1.0, 1.02, "red: labelled anomaly windows", transform=ax_score.transAxes, fontsize=7,
                  ha="right", va="bottom", color="tab:red")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
