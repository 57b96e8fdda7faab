"""Shared pieces of the benchmarks: arguments, JSON output, tables, timing, machine facts, models and data."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.autoencoder import AutoencoderDetector
from detector.models import ModelConfig
from detector.synthetic import SensorModel

from .cpu_sampler import HZ, parse_stat, thread_ticks

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- arguments, output
def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The common options: ``--quick``, ``--json PATH``, ``--threads N``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sizes, about a minute")
    p.add_argument("--json", type=Path, default=None, help=f"output file (default {default_json(name)})")
    return p


def entity_args(doc: str | None, argv: list[str] | None, kind: bool = True) -> argparse.Namespace:
    """The accuracy scripts' command line: an SMD/ASD-style directory and (``kind``) the autoencoder kind."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="an SMD/ASD-style directory: train/, test/, test_label/")
    if kind:
        p.add_argument("--kind", choices=["gru", "lstm"], default="lstm")
    return p.parse_args(argv)


def cache_dir() -> Path:
    return Path(os.environ.get("ANOMALYD_CACHE") or Path.home() / ".cache" / "anomalyd").expanduser()


def default_json(name: str) -> Path:
    return cache_dir() / "bench" / f"{name}.json"


def write_json(path: Path | None, name: str, payload: dict) -> Path:
    """Write ``payload`` plus machine facts; returns the path."""
    path = path or default_json(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine_info(), **payload}, indent=1, default=_jsonable))
    print(f"\nwrote {path}")
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], title: str = "") -> str:
    """Format ``rows`` as a plain text table; ``columns`` = (key, header, format spec); missing keys print '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f) if f else str(r[k])) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if j and c[:1].isdigit() else c.ljust(w) for c, w in zip(row, widths,
                                                                                                   strict=True)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- machine facts
def machine_info() -> dict:
    """CPU, cores, load, torch and git facts, so a JSON file says where its numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "git": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    switches = {k: v for k, v in os.environ.items() if k in _SWITCHES}
    if switches:
        info["env"] = switches  # the fast paths' on/off switches this run had
    return info


_SWITCHES = ("ANOMALYD_FUSED_RNN", "ANOMALYD_NATIVE_DECODE", "ANOMALYD_CUDA_GRAPHS", "ANOMALYD_FUSED_MARCH",
             "ANOMALYD_NATIVE_WINDOWS")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Per-call wall and CPU seconds over ``calls`` calls (median wall, best wall, mean CPU)."""

    calls: int
    median_s: float
    best_s: float
    cpu_s: float


def measure(fn: Callable[[], Any], min_time: float = 0.5, min_calls: int = 3, max_calls: int = 1000,
            warmup: int = 1) -> Timing:
    """Call ``fn`` until ``min_time`` seconds and ``min_calls`` calls have passed (after ``warmup`` calls; one
    timed call when a warm-up call alone took longer than ``min_time``)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if warmup and (time.perf_counter() - t0) / warmup > min_time:
        min_calls = 1
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < max_calls and (len(walls) < min_calls or time.perf_counter() - start < min_time):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return Timing(len(walls), float(np.median(walls)), float(min(walls)), float(np.mean(cpus)))


def matmul_peak(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, min_time: float = 1.0,
                device: str = "cpu") -> float:
    """GFLOP/s of ``torch.mm`` on (n, n) squares of ``dtype`` with ``threads`` intra-op threads (best call)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

        def call() -> None:
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()

        t = measure(call, min_time=min_time, min_calls=3)
        return 2 * n**3 / t.best_s / 1e9
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- models and data
def random_detector(kind: str, window: int, n_features: int, hidden: int, latent: int = 16,
                    seed: int = 0) -> AutoencoderDetector:
    """An untrained detector with identity scaling and a fixed threshold: speed does not depend on weights."""
    from detector.scaling import Scaler
    from detector.thresholds import make_threshold

    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, n_features=n_features, window=window, hidden_size=hidden, latent_size=latent)
    scaler = Scaler("standard").fit(np.random.default_rng(seed).normal(size=(256, n_features)).astype(np.float32))
    thr = make_threshold("quantile")
    thr.fit(np.random.default_rng(seed).random(1000))
    return AutoencoderDetector(cfg, scaler=scaler, threshold=thr)


class Fleet:
    """``S`` sensor streams ``s-<i>`` with ``F`` features: one seasonal sensor model, phase-shifted per stream."""

    def __init__(self, n_streams: int, n_features: int = 8, seed: int = 0) -> None:
        self.n_streams, self.n_features = n_streams, n_features
        self.model = SensorModel(n_features, period=48.0, noise=0.05, seed=seed)
        self.shift = np.random.default_rng(seed).integers(0, 10_000, size=n_streams)  # (S,)
        self.names = [f"s-{i:06d}" for i in range(n_streams)]
        self.feature_names = [f"f{j}" for j in range(n_features)]

    def values(self, steps: np.ndarray, streams: np.ndarray) -> np.ndarray:
        """(N,) step and (N,) stream index per event -> (N, F) float32 readings."""
        return self.model.normal(steps.astype(np.float64) + self.shift[streams])

    def history(self, steps: int, streams: int = 4) -> np.ndarray:
        """(streams * steps, F) training data: ``steps`` consecutive readings of each of the first streams."""
        return np.concatenate([self.values(np.arange(steps), np.full(steps, s)) for s in range(streams)])

    def events(self, first_step: int, n_events: int) -> tuple[np.ndarray, np.ndarray]:
        """Round-robin order (every stream once per step): (N,) stream index, (N,) step."""
        k = np.arange(n_events)
        return k % self.n_streams, first_step + k // self.n_streams


def trained_detector(kind: str, fleet: Fleet, window: int = 64, hidden: int = 64, latent: int = 16,
                     log: Callable[[str], None] = print) -> AutoencoderDetector:
    """A small detector trained on the fleet's history (cached under the bench cache by its configuration)."""
    from detector.checkpoint import load_checkpoint, save_checkpoint
    from detector.training import TrainConfig, train_detector

    where = cache_dir() / "bench" / "models" / f"{kind}-W{window}-F{fleet.n_features}-H{hidden}-L{latent}"
    if (where / "model.json").is_file():
        return load_checkpoint(where)
    log(f"training a {kind} model W={window} F={fleet.n_features} H={hidden} once (cached in {where}) ...")
    cfg = ModelConfig(kind=kind, n_features=fleet.n_features, window=window, hidden_size=hidden, latent_size=latent)
    train = TrainConfig(epochs=4, lr=3e-3, batch_size=128, patience=2, max_windows=3000, device="cpu",
                        threshold="spot", threshold_params={"risk": 1e-4})
    det = train_detector(fleet.history(1500), cfg, train, feature_names=fleet.feature_names, log=None)
    save_checkpoint(det, where)
    return det


def json_messages(fleet: Fleet, stream: np.ndarray, step: np.ndarray, t0_ms: int, interval_ms: int = 1000,
                  anomaly: np.ndarray | None = None, by_name: bool = False) -> list[bytes]:
    """Kafka values ``{"stream", "ts", "values": [F numbers]}`` for events (N,), or ``"values": {name: number}``
    with ``by_name``; ``anomaly`` (N,) bool adds a level shift of +8 to those events' readings."""
    import orjson

    vals = fleet.values(step, stream)
    if anomaly is not None:
        vals[anomaly] += 8.0
    vals = np.round(vals.astype(np.float64), 4).tolist()
    ts = (t0_ms + step * interval_ms).tolist()
    names = fleet.names
    if by_name:
        vals = [dict(zip(fleet.feature_names, v, strict=True)) for v in vals]
    return [orjson.dumps({"stream": names[s], "ts": t, "values": v}) for s, t, v in zip(stream.tolist(), ts, vals,
                                                                                       strict=True)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``)."""
    return parse_stat(Path(f"/proc/{pid}/stat").read_text())[0] / HZ


def jit_cpu_seconds(pid: int | str) -> float:
    """CPU seconds so far of a JVM's JIT compiler threads ("C1/C2 CompilerThread<n>"; Linux ``/proc``); threads
    that have exited are not counted, which can only make a difference of two readings smaller."""
    return sum(ticks for ticks, name in thread_ticks(pid).values() if "CompilerThre" in name) / HZ


def cpu_now(spec: Mapping[str, Any]) -> tuple[float, float]:
    """CPU seconds so far of this process and of the broker (``spec["broker_pid"]``; NaN when not known)."""
    try:
        broker = cpu_seconds(spec["broker_pid"]) if spec.get("broker_pid") else float("nan")
    except OSError:
        broker = float("nan")
    return cpu_seconds(), broker


def cpu_used(first: tuple[float, float], last: tuple[float, float], seconds: float, events: int) -> dict:
    """CPU of this process and of the broker between two :func:`cpu_now` readings: seconds, and the cores they
    kept busy together (the host is saturated when that nears its CPU count)."""
    own, broker = last[0] - first[0], last[1] - first[1]
    return {"self_s": own, "broker_s": broker, "cores": (own + broker) / seconds,
            "us_per_event": 1e6 * (own + broker) / max(events, 1), "host_cpus": os.cpu_count()}


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds per thread of this process, from ``/proc/self/task``: by Python thread name, else by the
    OS name (librdkafka's ``rdk:...``, OpenMP workers), threads of one name summed."""
    import threading

    py_names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            name = py_names.get(int(task.name)) or (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out
