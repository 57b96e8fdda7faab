"""NAB-format corpus: loading, the streaming run of a detector over every file, result files, scoring.

Layout of a corpus directory (as in numenta/NAB)::

    data/<category>/<name>.csv        columns timestamp,value
    labels/combined_windows.json      {"<category>/<name>.csv": [[start, end], ...]}  (inclusive timestamps)
    config/profiles.json              cost profiles (optional; NAB's three profiles are the default)

Streaming rules: a detector sees a file's probationary prefix (``probation_length(N)`` rows) to fit itself,
then must give every row one score in [0, 1] using only that row and the rows before it.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipelines.evaluation.nab_scorer import (
    DEFAULT_PROFILES,
    PROBATION_FRACTION,
    CostProfile,
    Window,
    load_profiles,
    probation_length,
    score_corpus,
)


@dataclass
class NabFile:
    """One series of the corpus."""

    name: str  # "<category>/<name>.csv", the key used by combined_windows.json
    timestamps: list[str]  # as written in the CSV
    values: np.ndarray  # (N,) float64
    windows: list[Window]  # labelled windows as inclusive row indices
    probation: int  # rows a detector may fit on

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]

    def rows_per_day(self) -> int:
        """Rows per day from the median time step of the probationary prefix (0 if it cannot be told)."""
        ts = np.array(self.timestamps[: max(self.probation, 2)], dtype="datetime64[s]").astype(np.int64)
        step = float(np.median(np.diff(ts))) if len(ts) > 1 else 0.0
        return round(86400 / step) if step > 0 else 0

    def labels(self) -> np.ndarray:
        """(N,) 0/1: 1 for rows inside a labelled window."""
        lab = np.zeros(self.values.size, dtype=np.int8)
        for a, b in self.windows:
            lab[a : b + 1] = 1
        return lab


class StreamingDetector(Protocol):
    """What the NAB runner needs: one causal pass over a series."""

    name: str

    def score_stream(self, values: np.ndarray, probation: int, period: int = 0) -> np.ndarray:
        """Fit on ``values[:probation]`` only, then return (N,) scores in [0, 1], each from past rows only.
        ``period``: rows per day told by the prefix's timestamps (0 if unknown)."""
        ...


def load_corpus(data_dir: str | Path, probation_fraction: float = PROBATION_FRACTION) -> list[NabFile]:
    """Read every ``data/<category>/<name>.csv`` of a NAB-format directory with its windows."""
    root = Path(data_dir)
    data = root / "data"
    labels_path = root / "labels" / "combined_windows.json"
    if not data.is_dir():
        raise FileNotFoundError(f"{data} not found: expected a NAB corpus with data/<category>/<name>.csv")
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} not found")
    labels = json.loads(labels_path.read_text())
    files = []
    for path in sorted(data.glob("*/*.csv")):
        name = f"{path.parent.name}/{path.name}"
        if name not in labels:
            raise ValueError(f"{name} has no entry in {labels_path}")
        timestamps, values = _read_series(path)
        ts = np.array(timestamps, dtype="datetime64[s]")
        windows = [_window_rows(ts, a, b, name) for a, b in labels[name]]
        files.append(NabFile(name, timestamps, values, windows, probation_length(len(values), probation_fraction)))
    if not files:
        raise FileNotFoundError(f"no CSV files under {data}/<category>/")
    return files


def load_corpus_profiles(data_dir: str | Path) -> dict[str, CostProfile]:
    """The corpus's ``config/profiles.json`` if present, else NAB's three default profiles."""
    path = Path(data_dir) / "config" / "profiles.json"
    return load_profiles(path) if path.is_file() else dict(DEFAULT_PROFILES)


def _read_series(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
            raise ValueError(f"{path}: expected header 'timestamp,value', got {header}")
        rows = [(lineno, r) for lineno, r in enumerate(reader, start=2) if r]
    timestamps, values = [], np.empty(len(rows), dtype=np.float64)
    for i, (lineno, r) in enumerate(rows):
        try:
            values[i] = float(r[1])
        except (ValueError, IndexError):
            values[i] = np.nan
        if not np.isfinite(values[i]):  # one NaN made every later score NaN: the file scored as if silent
            raise ValueError(f"{path}:{lineno}: value must be a finite number, got {r[1:2] or r}")
        timestamps.append(r[0])
    return timestamps, values


def _window_rows(ts: np.ndarray, start: str, end: str, name: str) -> Window:
    """Map an inclusive timestamp window to row indices (``ts``: the file's sorted datetime64 timestamps):
    first row >= start, last row <= end."""
    a = int(np.searchsorted(ts, np.datetime64(start.split(".")[0], "s"), side="left"))
    b = int(np.searchsorted(ts, np.datetime64(end.split(".")[0], "s"), side="right")) - 1
    if a > b or a >= len(ts):
        raise ValueError(f"{name}: window [{start}, {end}] contains no rows")
    return a, b


def run_corpus(
    corpus: list[NabFile],
    make_detector: Callable[[], StreamingDetector],
    log: Callable[[str], None] = print,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Run a fresh detector over each file; returns per-file scores (N,) and per-file seconds."""
    results: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for f in corpus:
        det = make_detector()
        t0 = time.perf_counter()
        scores = np.asarray(det.score_stream(f.values.copy(), f.probation, f.rows_per_day()), dtype=np.float64)
        seconds[f.name] = time.perf_counter() - t0
        if scores.shape != f.values.shape:
            raise ValueError(f"{det.name} returned {scores.shape} scores for {f.name} with {f.values.size} rows")
        results[f.name] = np.clip(np.nan_to_num(scores, nan=0.0), 0.0, 1.0)
        log(f"  {f.name}: {f.values.size} rows, {seconds[f.name]:.1f}s")
    return results, seconds


def score_results(
    corpus: list[NabFile], results: Mapping[str, np.ndarray], profiles: Mapping[str, CostProfile]
) -> dict[str, object]:
    """NAB scores of one detector's results: ``{profile: score, ..., "files": n, "details": {...}}``."""
    windows = {f.name: f.windows for f in corpus}
    scored = score_corpus(results, windows, profiles)
    out: dict[str, object] = {name: r.score for name, r in scored.items()}
    out["files"] = len(results)
    out["windows"] = sum(len(f.windows) for f in corpus if f.name in results)
    out["details"] = {name: r.to_dict() for name, r in scored.items()}
    return out


def write_result_files(out_dir: str | Path, corpus: list[NabFile], results: Mapping[str, np.ndarray]) -> None:
    """Write NAB result files ``out_dir/<category>/<name>.csv``: timestamp,value,anomaly_score,label."""
    root = Path(out_dir)
    for f in corpus:
        if f.name not in results:
            continue
        path = root / f.name
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = f.labels()
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "value", "anomaly_score", "label"])
            for ts, v, s, lab in zip(f.timestamps, f.values, results[f.name], labels, strict=True):
                w.writerow([ts, repr(float(v)), repr(float(s)), int(lab)])


def read_result_files(results_dir: str | Path) -> dict[str, np.ndarray]:
    """Read result files written by :func:`write_result_files` (or by NAB) back into ``{name: scores}``."""
    out = {}
    for path in sorted(Path(results_dir).glob("*/*.csv")):
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            out[f"{path.parent.name}/{path.name}"] = np.array([float(r["anomaly_score"]) for r in reader])
    return out
