"""Side-by-side Markdown comparison of the models evaluated in one run (autoencoders against the baseline)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Column = tuple[str, str, str]  # (summary key, title, format spec)
NAB_COLUMNS: list[Column] = [
    ("standard", "NAB standard", ".1f"),
    ("reward_low_FP_rate", "NAB low-FP", ".1f"),
    ("reward_low_FN_rate", "NAB low-FN", ".1f"),
]
MULTIVARIATE_COLUMNS: list[Column] = [
    ("f1", "best F1 (no PA)", ".3f"),
    ("f1_point_adjusted", "F1 point-adjusted", ".3f"),
    ("f1_event", "event F1 @ calibrated thr.", ".3f"),
    ("auc_pr", "AUC-PR", ".3f"),
]
COST_COLUMNS: list[Column] = [
    ("params", "params", ",.0f"),
    ("macs_per_window", "MACs / window", ",.0f"),
    ("train_seconds", "training time (s)", ",.1f"),
    ("rows_per_second", "scoring (rows/s)", ",.0f"),
]


def _fmt(value: object, spec: str = ".3f") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    if math.isnan(value):
        return "n/a"
    return format(value, spec)


def comparison_table(
    summaries: Mapping[str, Mapping[str, object]], accuracy_columns: Sequence[Column]
) -> str:
    """A Markdown table with one row per model: cost columns, then the accuracy columns."""
    columns = [*COST_COLUMNS, *accuracy_columns]
    lines = [
        "| model | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model, summary in summaries.items():
        cells = [_fmt(summary.get(key), spec) for key, _, spec in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nab_report(summaries: Mapping[str, Mapping[str, object]], data_dir: str, seconds: float) -> str:
    """Markdown report of a NAB run (scores on NAB's 0-100 scale)."""
    first = next(iter(summaries.values()))
    head = (
        f"### NAB: {first.get('files')} files, {first.get('windows')} windows ({data_dir})\n\n"
        "Scores on NAB's 0-100 scale (null detector 0, perfect 100), one threshold per profile swept over "
        f"the corpus. Wall time of the whole run: {seconds:.0f} s.\n\n"
    )
    return head + comparison_table(summaries, NAB_COLUMNS) + "\n"


def multivariate_report(summaries: Mapping[str, Mapping[str, object]], data_dir: str, seconds: float) -> str:
    """Markdown report of a multivariate run: overall table, then event F1 and AUC-PR per entity."""
    first = next(iter(summaries.values()))
    out = [
        f"### Multivariate: {first.get('entities')} entities ({data_dir})\n",
        "F1 figures pool TP/FP/FN over entities; AUC-PR is the mean of per-entity average precision; point-"
        f"adjusted F1 is shown only for comparison with papers. Wall time of the whole run: {seconds:.0f} s.\n",
        comparison_table(summaries, MULTIVARIATE_COLUMNS),
        "",
        "Per entity (event F1 / AUC-PR):",
        "",
    ]
    models = list(summaries)
    out.append("| entity | " + " | ".join(models) + " |")
    out.append("|---|" + "---:|" * len(models))
    per = {m: summaries[m].get("per_entity", {}) for m in models}
    for entity in per[models[0]]:
        cells = []
        for m in models:
            met = per[m].get(entity, {})
            cells.append(f"{_fmt(met.get('f1_event'))} / {_fmt(met.get('auc_pr'))}")
        out.append(f"| {entity} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
