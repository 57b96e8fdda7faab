"""The daemon's own counters and histograms as the benchmarks read them: a summary of a registry, Prometheus-style
quantiles of its histograms, and the check that a daemon run's rate counts only events it scored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SCORED_AT_LEAST", "WINDOWS_WITHIN", "check_scored", "metric_summary", "quantile"]

SCORED_AT_LEAST = 0.99  # of the events a daemon run read, with outcome "scored"
WINDOWS_WITHIN = 0.05  # relative difference of each model's windows scored from the scored events / stride


def check_scored(metrics: Mapping[str, Any], events: int, stride: int, models: list[str]) -> dict:
    """That a daemon run's rate (b) counts events it scored: ``anomalyd_events_total{outcome="scored"}`` at least
    ``SCORED_AT_LEAST`` of the ``events`` it read (and not more), and each model's ``anomalyd_windows_scored_total``
    within ``WINDOWS_WITHIN`` of those events / ``stride``. Raises ``RuntimeError`` naming the outcomes otherwise:
    records replayed to rebuild windows, unrouted, dead-lettered, late or still warming are read (and counted in
    ``events_seen``) without being scored, and must not pass for throughput. ``metrics``: :func:`metric_summary`'s.
    Returns the counts."""
    outcomes: dict[str, float] = {}
    for key, value in metrics.get("anomalyd_events", {}).items():
        outcome = _labels(key).get("outcome", "")
        outcomes[outcome] = outcomes.get(outcome, 0.0) + value
    windows = {model: 0.0 for model in models}
    for key, value in metrics.get("anomalyd_windows_scored", {}).items():
        model = _labels(key).get("model", "")
        if model in windows:
            windows[model] += value
    scored = outcomes.get("scored", 0.0)
    expected = scored / stride
    problems = []
    if not SCORED_AT_LEAST * events <= scored <= events:
        problems.append(f"{scored:,.0f} of the {events:,} events read were scored (outcomes: "
                        + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(outcomes.items()) if v) + ")")
    for model, n in windows.items():
        if abs(n - expected) > WINDOWS_WITHIN * max(expected, 1.0):
            problems.append(f"model {model} scored {n:,.0f} windows, {expected:,.0f} expected (scored events / "
                            f"stride {stride})")
    if problems:
        raise RuntimeError("the daemon's rate would count events it did not score: " + "; ".join(problems))
    return {"scored_events": scored, "outcomes": outcomes, "windows_scored": windows, "windows_expected": expected}


def _labels(key: str) -> dict[str, str]:
    """``metric_summary``'s counter key ``"k1=v1|k2=v2"`` -> {k1: v1, k2: v2}."""
    return dict(part.split("=", 1) for part in key.split("|") if "=" in part)


# ---------------------------------------------------------------------------------------------- metrics
def metric_summary(registry: Any) -> dict:
    """Counts, sums and buckets of the daemon's histograms and counters that the benchmarks report."""
    out: dict[str, Any] = {}
    for family in registry.collect():
        if family.name in ("anomalyd_event_to_score_seconds", "anomalyd_event_to_alert_seconds",
                           "anomalyd_inference_batch_size", "anomalyd_inference_seconds"):
            buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
            merged: dict[float, float] = {}
            for le, v in buckets:  # sum over label sets (models)
                merged[float(le)] = merged.get(float(le), 0.0) + v
            count = sum(s.value for s in family.samples if s.name.endswith("_count"))
            total = sum(s.value for s in family.samples if s.name.endswith("_sum"))
            out[family.name] = {"buckets": sorted(merged.items()), "count": count, "sum": total}
        elif family.name in ("anomalyd_alerts", "anomalyd_events", "anomalyd_windows_scored", "anomalyd_rebalances"):
            out[family.name] = {"|".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
                                for s in family.samples if s.name.endswith("_total")}
    return out


def quantile(hist: Mapping[str, Any], q: float) -> float | None:
    """Prometheus-style ``histogram_quantile``: linear interpolation inside the bucket holding rank q*count."""
    buckets, count = hist["buckets"], hist["count"]
    if not count:
        return None
    rank, prev_le, prev_c = q * count, 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le
