"""GPU benchmark: the engine sweep and the scoring half of the pipeline on a CUDA device, in under 5 minutes.

1. Engine: GRU and LSTM autoencoders, W=64, F in {8, 38}, H in {64, 128}, batch 1 ... 65,536, as eager cuDNN
   float32, autocast float16, and a CUDA graph of the float32 forward (captured once per batch size); windows/s,
   GFLOP/s (``model_cost``) and the ratio to ``torch.mm``'s float32 and float16 peaks measured in the same run.
2. Host to device copies of one micro-batch (4,096 windows, F=8): pageable vs pinned memory.
3. ``InferenceEngine.score`` (numpy in, scores out) at 4,096 ... 65,536 windows, float32 and float16.
4. Scoring half of the pipeline, no Kafka: JSON events from memory through ``Daemon.process`` + ``Daemon.flush``
   (decode, window buffers, engine on the GPU, alert state) at stride 1 and 8, with the engine-only rate of the
   same model at the daemon's batch for the ratio.

``--device cpu`` runs the same code on the CPU (graphs, autocast and pinned memory skipped): a smoke test.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detector.models import ModelConfig, build_model, model_cost

from . import common, harness

FULL = {"features": [8, 38], "hidden": [64, 128], "batch": [1, 64, 256, 1024, 4096, 16384, 65536],
        "min_time": 0.25, "events": 200_000, "streams": [1000, 100_000], "time_budget_s": 240}
QUICK = {"features": [8], "hidden": [64], "batch": [1, 256, 4096, 65536], "min_time": 0.1, "events": 50_000,
         "streams": [1000], "time_budget_s": 60}
WINDOW, LATENT = 64, 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, min_time: float) -> float:
    """Median seconds per call of ``fn`` (synchronised)."""
    def call() -> None:
        fn()
        _sync(device)

    return common.measure(call, min_time=min_time, min_calls=3).median_s


def _graph(model: torch.nn.Module, x: torch.Tensor):
    """A CUDA graph replaying ``model(x)`` on the static input ``x``; returns a callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(x)
    return g.replay


def mm_peak(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        return 2 * n**3 / _timed(lambda: torch.mm(a, b), device, 0.5) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def engine_sweep(cfg: dict, device: torch.device, peaks: dict, deadline: float) -> list[dict]:
    rows = []
    cuda = device.type == "cuda"
    for f in cfg["features"]:
        for h in cfg["hidden"]:
            for kind in ("gru", "lstm"):
                mcfg = ModelConfig(kind=kind, n_features=f, window=WINDOW, hidden_size=h, latent_size=LATENT)
                macs = model_cost(mcfg).macs_per_window
                torch.manual_seed(0)
                model = build_model(mcfg).to(device).eval()
                for b in cfg["batch"]:
                    if time.monotonic() > deadline:
                        common.log("time budget reached: sweep cut short")
                        return rows
                    x = torch.randn(b, WINDOW, f, device=device)
                    impls = {"fp32": lambda m=model, x=x: m(x)}
                    if cuda:
                        impls["fp16 autocast"] = lambda m=model, x=x: _autocast(m, x)
                    with torch.inference_mode():
                        for impl, fn in impls.items():
                            rows.append(_row(kind, f, h, b, impl, macs, _timed(fn, device, cfg["min_time"]), peaks))
                    if cuda:
                        with torch.inference_mode():
                            try:
                                replay = _graph(model, x)
                                t = _timed(replay, device, cfg["min_time"])
                                rows.append(_row(kind, f, h, b, "fp32 CUDA graph", macs, t, peaks))
                            except RuntimeError as exc:  # e.g. out of memory at the largest batch
                                common.log(f"  CUDA graph at B={b} failed: {exc}")
                    common.log(f"  {kind} F={f} H={h} B={b}: " + ", ".join(
                        f"{r['impl']} {r['windows_s']:,.0f}/s" for r in rows[-3:] if r["batch"] == b
                        and r["kind"] == kind and (r["F"], r["H"]) == (f, h)))
                del model
                if cuda:
                    torch.cuda.empty_cache()
    return rows


def _autocast(model, x):
    with torch.autocast("cuda", dtype=torch.float16):
        return model(x)


def _row(kind, f, h, b, impl, macs, seconds, peaks) -> dict:
    rate = b / seconds
    gflops = 2 * macs * rate / 1e9
    peak = peaks["fp16"] if impl.startswith("fp16") else peaks["fp32"]
    return {"kind": kind, "F": f, "H": h, "batch": b, "impl": impl, "windows_s": rate, "gflops": gflops,
            "pct_peak": 100 * gflops / peak if peak else None}


def copies(device: torch.device) -> dict:
    """Seconds to copy one 4,096-window micro-batch (W=64, F=8) to the device: pageable vs pinned."""
    if device.type != "cuda":
        return {}
    host = torch.randn(4096, WINDOW, 8)
    pinned = host.pin_memory()
    out = {}
    for name, src in (("pageable", host), ("pinned", pinned)):
        t = _timed(lambda s=src: s.to(device, non_blocking=True), device, 0.3)
        out[name] = {"seconds": t, "gb_s": host.numel() * 4 / t / 1e9}
    return out


def scoring(cfg: dict, device: torch.device, deadline: float, engine_rows: list[dict]) -> list[dict]:
    """The daemon's decode -> buffers -> engine -> alerts path from memory, on ``device``; appends the rates of
    ``InferenceEngine.score`` itself (numpy windows in, scores out: copies, scaling, forward, error, threshold)
    to ``engine_rows``."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.model_store import ModelStore
    from pipelines.replay import _StderrDeadLetters
    from pipelines.sinks import FanoutSink
    from pipelines.source import RecordBatch

    from .pipeline import models_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mdir, names = models_dir(Path(tmp), "gru")
        det = ModelStore(mdir).load(names[0], device=str(device)).detector
        from detector.engine import InferenceEngine

        engine = InferenceEngine(str(device))
        engine.swap({"m": det})
        for precision in ("float32", "float16") if device.type == "cuda" else ("float32",):
            eng = InferenceEngine(str(device), precision=precision, max_batch=65536)
            eng.swap({"m": det})
            for b in (4096, 16384, 65536):
                wins = np.ascontiguousarray(np.random.default_rng(1).normal(size=(b, WINDOW, 8)), np.float32)
                rate = b / _timed(lambda w=wins, en=eng: en.score({"m": w}), device, 0.5)
                engine_rows.append({"precision": precision, "batch": b, "windows_s": rate})
                common.log(f"  engine.score {precision} B={b}: {rate:,.0f} windows/s (host -> device -> host)")
        for S in cfg["streams"]:
            fleet = common.Fleet(S, harness.FEATURES)
            stream, step = fleet.events(harness.WINDOW + 8, cfg["events"])
            messages = common.json_messages(fleet, stream, step, harness.T0_MS, harness.INTERVAL_MS)
            keys = [fleet.names[s].encode() for s in stream.tolist()]
            decode_s = _decode_rate(messages, keys)
            common.log(f"  S={S}: decode alone {decode_s:,.0f} events/s")
            for stride in (1, 8):
                if time.monotonic() > deadline:
                    common.log("time budget reached: scoring cut short")
                    return rows
                spec = {"bootstrap": "127.0.0.1:9", "client": "kafka-python", "topic": "memory", "models_dir": mdir,
                        "models": names, "stride": stride, "max_batch_windows": 16384, "device": str(device)}
                tmpd = Path(tmp) / f"s{S}-{stride}"
                tmpd.mkdir()
                daemon = Daemon(load_config(harness.daemon_config(tmpd, spec)))
                daemon.producer, daemon.sinks = _StderrDeadLetters(), FanoutSink([])
                harness.seed_windows(daemon, fleet, harness.WINDOW + 8, stride)
                n, chunk = len(messages), 5000
                t0 = time.perf_counter()
                windows = 0
                for start in range(0, n, chunk):
                    m = min(chunk, n - start)
                    daemon.process(RecordBatch(["memory"] * m, np.zeros(m, np.int32),
                                               np.arange(start, start + m, dtype=np.int64),
                                               np.full(m, harness.T0_MS, np.int64), keys[start:start + m],
                                               messages[start:start + m]))
                    if daemon.routes[0].pending_windows >= 16384 or start + m == n:
                        windows += daemon.routes[0].pending_windows
                        daemon.flush()
                _sync(device)
                rate = n / (time.perf_counter() - t0)
                wins = np.ascontiguousarray(np.random.default_rng(0).normal(size=(16384, WINDOW, 8)), np.float32)
                e = 16384 / _timed(lambda w=wins: engine.score({"m": w}), device, 0.5)
                rows.append({"streams": S, "stride": stride, "events_s": rate, "windows": windows,
                             "engine_windows_s": e, "engine_events_s": e * stride,
                             "ratio_to_engine": rate / (e * stride), "decode_events_s": decode_s,
                             "ratio_to_decode": rate / decode_s})
                common.log(f"  S={S} stride {stride}: {rate:,.0f} events/s (engine {e * stride:,.0f} events/s)")
    return rows


def _decode_rate(messages: list[bytes], keys: list[bytes]) -> float:
    """Events/s of the daemon's decoder alone over the same messages (the client's share of the CPU work,
    without the network): the rate the scoring half would reach if the engine and the buffers cost nothing."""
    from pipelines.decode import FeatureSpec, SpecCache, decode_batch

    specs = SpecCache(lambda s: FeatureSpec(tuple(f"f{j}" for j in range(harness.FEATURES))))
    n, chunk = len(messages), 5000
    ts = [harness.T0_MS] * chunk
    for _pass in (1, 2):  # the first pass fills the per-stream cache, as a running consumer has it
        t0 = time.perf_counter()
        for start in range(0, n, chunk):
            decode_batch(messages[start:start + chunk], keys[start:start + chunk], ts[:min(chunk, n - start)],
                         specs, 65536)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("gpu", __doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    device = torch.device(args.device)
    if device.type == "cpu":  # smoke test sizes
        cfg = {**QUICK, "batch": [1, 256], "events": 10_000}
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (or --device cpu for a smoke test)")
        return 2
    started = time.perf_counter()
    deadline = time.monotonic() + cfg["time_budget_s"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else common.machine_info()["cpu"]
    if device.type == "cuda":
        peaks = {"fp32": mm_peak(device, torch.float32), "fp16": mm_peak(device, torch.float16)}
    else:
        peaks = {"fp32": common.matmul_peak(torch.get_num_threads()), "fp16": None}
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    common.log(f"versions: {versions}")
    common.log(f"{card}: mm peak fp32 {peaks['fp32']:,.0f} GFLOP/s, fp16 {peaks['fp16'] or 0:,.0f} GFLOP/s")
    rows = engine_sweep(cfg, device, peaks, deadline - 0.35 * cfg["time_budget_s"])
    copy = copies(device)
    engine_rows: list[dict] = []
    score_rows = scoring(cfg, device, deadline, engine_rows)
    print(common.table(rows, [("kind", "kind", ""), ("F", "F", "d"), ("H", "H", "d"), ("batch", "batch", ",d"),
                              ("impl", "impl", ""), ("windows_s", "windows/s", ",.0f"), ("gflops", "GFLOP/s", ",.0f"),
                              ("pct_peak", "% peak", ".1f")],
                       f"\n{card}: engine (W=64, L=16); peak fp32 {peaks['fp32']:,.0f}, fp16 {peaks['fp16'] or 0:,.0f}"
                       " GFLOP/s"))
    for name, c in copy.items():
        print(f"host->device 4,096 windows ({name}): {1000 * c['seconds']:.2f} ms, {c['gb_s']:.1f} GB/s")
    print(common.table(engine_rows, [("precision", "precision", ""), ("batch", "batch", ",d"),
                                     ("windows_s", "windows/s", ",.0f")],
                       "\nInferenceEngine.score, GRU W=64 F=8 H=64 (numpy in, scores out)"))
    print(common.table(score_rows, [("streams", "streams", ",d"), ("stride", "stride", "d"),
                                    ("events_s", "events/s", ",.0f"), ("engine_events_s", "engine ev/s", ",.0f"),
                                    ("ratio_to_engine", "ratio", ".2f"),
                                    ("decode_events_s", "decode ev/s", ",.0f"), ("ratio_to_decode", "/decode", ".2f")],
                       "\nScoring half of the pipeline from memory (GRU W=64 F=8 H=64)"))
    common.write_json(args.json, "gpu", {"quick": args.quick, "device": str(device), "card": card, "peaks": peaks,
                                         "versions": versions,
                                         "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                                         "config": cfg, "engine": rows, "copies": copy, "engine_score": engine_rows,
                                         "scoring": score_rows,
                                         "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
