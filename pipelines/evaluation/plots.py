"""One PNG per series/entity: signal, anomaly score, threshold, detections and labelled windows (matplotlib Agg)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipelines.evaluation.metrics import segments

MAX_FEATURES_DRAWN = 5  # multivariate: the features that move most inside labelled windows


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
    """Write one figure with three panels sharing the row axis:

    1. the signal (``(T,)`` or the most telling of ``(T, F)`` features), labelled windows shaded red;
    2. the anomaly score with its threshold, detections as black dots;
    3. an event track: labelled windows (red) and detected runs (black) as bars, so short events stay visible.

    Rows before ``probation`` (not scored) are shaded grey.
    """
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

    fig, (ax_sig, ax_score, ax_ev) = plt.subplots(
        3, 1, figsize=(15, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2, 0.6]}
    )
    for ax in (ax_sig, ax_score):
        for a, b in segments(y):
            ax.axvspan(a - 0.5, b + 0.5, color="tab:red", alpha=0.18, lw=0)
        if probation:
            ax.axvspan(-0.5, probation - 0.5, color="0.8", alpha=0.5, lw=0)
        ax.grid(alpha=0.3)

    cols = _pick_features(sig, y) if sig.shape[1] > 1 else np.array([0])
    for j in cols:
        label = feature_names[j] if feature_names else (f"f{j}" if sig.shape[1] > 1 else "value")
        ax_sig.plot(t, sig[:, j], lw=0.6, alpha=0.85 if len(cols) > 1 else 1.0, label=label)
    ax_sig.set_ylabel("signal")
    ax_sig.set_title(title, fontsize=10, loc="left")
    ax_sig.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)

    shown = np.where(np.isfinite(s), s, np.nan)
    ax_score.plot(t, shown, lw=0.6, color="tab:blue", label="anomaly score")
    ax_score.axhline(threshold, color="tab:orange", ls="--", lw=1.2, label=f"threshold\n{threshold:.4g}")
    if detected.any():
        ax_score.scatter(t[detected], s[detected], s=9, color="black", zorder=3, label="detection")
    if log_scores and np.any(shown > 0):
        ax_score.set_yscale("log")  # heavy-tailed raw errors; non-positive values are masked
    ax_score.set_ylabel("score")
    ax_score.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)

    # Spans show long runs; vertical lines keep one-row events visible at any width.
    lab = segments(y)
    for a, b in lab:
        ax_ev.axvspan(a - 0.5, b + 0.5, ymin=0.55, ymax=0.95, color="tab:red", lw=0)
    ax_ev.vlines([a for a, _ in lab], 0.55, 0.95, color="tab:red", lw=1.2)
    for a, b in segments(detected):
        ax_ev.axvspan(a - 0.5, b + 0.5, ymin=0.05, ymax=0.45, color="black", lw=0)
    ax_ev.vlines(t[detected], 0.05, 0.45, color="black", lw=1.0)
    ax_ev.set_yticks([0.25, 0.75], ["detected", "labelled"], fontsize=7)
    ax_ev.set_ylim(0, 1)
    ax_ev.set_xlabel("row")
    ax_ev.set_xlim(-0.5, len(s) - 0.5)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
