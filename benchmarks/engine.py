"""Engine benchmark: windows/s of GRU-AE and LSTM-AE inference against the machine's float32 matmul peak.

For window 64, features 8 and 38, hidden 64 and 128, batch 1 ... 4096 and 1 or 2 intra-op threads, it times
``model(x)`` (eager PyTorch: nn.GRU / nn.LSTM), eager in chunks of 256 windows (batches above 256), and the
fused C++ forward of ``detector.fastpath`` on random float32 windows. MACs per window come from
``detector.models.model_cost`` (the model's nominal work; the fused path skips the decoder's per-step input
projection, ``detector.fastpath.executed_macs``); GFLOP/s = 2 * MACs * windows/s, and its ratio to the
``torch.mm`` peak on 2048^2 squares measured in the same run (at the start and at the end; the larger is used).
It then runs 2 processes x 1 thread side by side against 1 process x 2 threads (batch 256).

``--bf16`` adds the fused forward with bfloat16 matrix products (``models.precision: bfloat16`` on the CPU, where
the CPU has AVX512_BF16) as impl ``fused-bf16``, and the ``torch.mm`` bfloat16 peak; "% peak" stays relative to
the float32 peak. It also scores held-out readings of the benchmark fleet with the trained GRU and LSTM detectors
through a float32 and a bfloat16 engine: how far the scores move, and how many windows change side of the
threshold.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import torch

from detector.engine import InferenceEngine
from detector.fastpath import FusedAutoencoder, bf16_available, executed_macs, load_extension
from detector.models import ModelConfig, build_model, model_cost

from . import common

FULL = {"features": [8, 38], "hidden": [64, 128], "batch": [1, 16, 64, 256, 1024, 4096], "threads": [1, 2],
        "min_time": 0.4, "proc_s": 4.0, "eager_budget_s": 300}
QUICK = {"features": [8], "hidden": [64], "batch": [1, 64, 256, 1024], "threads": [1, 2], "min_time": 0.2,
         "proc_s": 2.0, "eager_budget_s": 40}
WINDOW, LATENT, CHUNK = 64, 16, 256


def _model(kind: str, f: int, h: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, n_features=f, window=WINDOW, hidden_size=h, latent_size=LATENT)).eval()


def _impls(model: torch.nn.Module, batch: int, fused_ok: bool, bf16: bool = False) -> dict:
    out = {"eager": model}
    if batch > CHUNK:
        out[f"eager/{CHUNK}"] = lambda x: torch.cat([model(c) for c in x.split(CHUNK)])
    if fused_ok:
        out["fused"] = FusedAutoencoder(model)
    if bf16:
        out["fused-bf16"] = FusedAutoencoder(model, bf16=True)
    return out


def sweep(cfg: dict, fused_ok: bool, peak: dict[int, float], bf16: bool = False) -> list[dict]:
    """Every point; eager batches >= 1024 are timed with one call, and skipped once eager timing has used
    ``eager_budget_s`` (eager PyTorch at 2 threads can collapse by 100x on a shared machine)."""
    rows = []
    eager_s = 0.0
    for threads in cfg["threads"]:
        torch.set_num_threads(threads)
        for f in cfg["features"]:
            for h in cfg["hidden"]:
                for kind in ("gru", "lstm"):
                    mcfg = ModelConfig(kind=kind, n_features=f, window=WINDOW, hidden_size=h, latent_size=LATENT)
                    macs = model_cost(mcfg).macs_per_window
                    model = _model(kind, f, h)
                    for b in cfg["batch"]:
                        x = torch.randn(b, WINDOW, f)
                        for impl, fn in _impls(model, b, fused_ok, bf16).items():
                            eager = impl.startswith("eager")
                            if eager and eager_s > cfg["eager_budget_s"]:
                                continue
                            t0 = time.perf_counter()
                            with torch.inference_mode():
                                big = eager and b >= 1024  # one warm call always: a cold first call is slower
                                t = common.measure(lambda fn=fn, x=x: fn(x), min_time=cfg["min_time"],
                                                   min_calls=1 if big else 3, warmup=1)
                            eager_s += time.perf_counter() - t0 if eager else 0.0
                            rate = b / t.median_s
                            gflops = 2 * macs * rate / 1e9
                            rows.append({"kind": kind, "F": f, "H": h, "batch": b, "threads": threads, "impl": impl,
                                         "windows_s": rate, "windows_s_best": b / t.best_s,
                                         "windows_cpu_s": b / t.cpu_s if t.cpu_s > 0 else None,
                                         "mac_window": macs,
                                         "executed_mac_window": executed_macs(mcfg) if impl.startswith("fused")
                                         else macs,
                                         "gflops": gflops, "pct_peak": 100 * gflops / peak[threads],
                                         "calls": t.calls})
                        common.log(f"  threads={threads} {kind} F={f} H={h} B={b}: " + ", ".join(
                            f"{r['impl']} {r['windows_s']:,.0f}/s" for r in rows if
                            (r["threads"], r["kind"], r["F"], r["H"], r["batch"]) == (threads, kind, f, h, b)))
    return rows


def _proc_worker(kind: str, impl: str, seconds: float, barrier, queue) -> None:
    torch.set_num_threads(1)
    model = _model(kind, 8, 64)
    fn = FusedAutoencoder(model) if impl == "fused" else model
    x = torch.randn(CHUNK, WINDOW, 8)
    with torch.inference_mode():
        fn(x)
        barrier.wait()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(x)
            n += CHUNK
        queue.put((n, time.perf_counter() - t0))


def processes(seconds: float, impls: list[str], n_procs: int = 2) -> list[dict]:
    """Aggregate windows/s of ``n_procs`` processes x 1 thread, batch 256, running side by side."""
    ctx = mp.get_context("spawn")
    rows = []
    for kind in ("gru", "lstm"):
        for impl in impls:
            barrier, queue = ctx.Barrier(n_procs), ctx.Queue()
            procs = [ctx.Process(target=_proc_worker, args=(kind, impl, seconds, barrier, queue))
                     for _ in range(n_procs)]
            for p in procs:
                p.start()
            got = [queue.get(timeout=300) for _ in procs]
            for p in procs:
                p.join()
            rate = sum(n for n, _ in got) / max(t for _, t in got)
            rows.append({"kind": kind, "impl": impl, "procs": n_procs, "batch": CHUNK, "windows_s": rate})
            common.log(f"  {n_procs} processes x 1 thread {kind} {impl}: {rate:,.0f} windows/s")
    return rows


def bf16_scores(steps: int = 800) -> list[dict]:
    """Per kind: the trained benchmark detector (``common.trained_detector``, fitted on the fleet's first 1,500
    steps) on the windows of steps 1,500 to 1,500 + ``steps`` of 4 streams, scored by a float32 and a
    bfloat16-products engine: relative score change (median, 99th percentile, max) and threshold-side changes."""
    fleet = common.Fleet(4, 8)
    wins = np.concatenate([np.lib.stride_tricks.sliding_window_view(
        fleet.values(np.arange(1500, 1500 + steps), np.full(steps, s)).astype(np.float32), WINDOW, axis=0
    ).transpose(0, 2, 1) for s in range(4)])  # (B, W, F)
    rows = []
    for kind in ("gru", "lstm"):
        det = common.trained_detector(kind, fleet, window=WINDOW, log=common.log)
        (a := InferenceEngine("cpu", "float32")).swap({kind: det})
        (b := InferenceEngine("cpu", "bfloat16")).swap({kind: det})
        want, got = a.score({kind: wins})[kind], b.score({kind: wins})[kind]
        rel = np.abs(got.raw.score - want.raw.score) / want.raw.score
        rows.append({"kind": kind, "windows": len(wins), "median_rel": float(np.median(rel)),
                     "p99_rel": float(np.quantile(rel, 0.99)), "max_rel": float(rel.max()),
                     "over_float32": int(want.over.sum()), "over_bf16": int(got.over.sum()),
                     "changed_side": int((want.over != got.over).sum())})
    return rows


def summary(rows: list[dict], procs: list[dict]) -> list[dict]:
    """Fused vs eager and GRU vs LSTM at F=8 H=64, per batch and thread count."""
    def get(kind, impl, b, th):
        return next((r["windows_s"] for r in rows if (r["kind"], r["impl"], r["batch"], r["threads"], r["F"], r["H"])
                     == (kind, impl, b, th, 8, 64)), None)

    out = []
    for th in sorted({r["threads"] for r in rows}):
        for b in sorted({r["batch"] for r in rows}):
            g_e, l_e, g_f, l_f = get("gru", "eager", b, th), get("lstm", "eager", b, th), get("gru", "fused", b, th), \
                get("lstm", "fused", b, th)
            out.append({"threads": th, "batch": b, "gru_eager": g_e, "gru_fused": g_f, "lstm_eager": l_e,
                        "lstm_fused": l_f, "gru_speedup": g_f / g_e if g_f and g_e else None,
                        "lstm_speedup": l_f / l_e if l_f and l_e else None,
                        "gru_over_lstm_eager": g_e / l_e if g_e and l_e else None,
                        "gru_over_lstm_fused": g_f / l_f if g_f and l_f else None})
    for p in procs:
        one = get(p["kind"], p["impl"], CHUNK, 1)
        two = get(p["kind"], p["impl"], CHUNK, 2)
        p["vs_1proc_1thread"] = p["windows_s"] / one if one else None
        p["vs_1proc_2threads"] = p["windows_s"] / two if two else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("engine", __doc__)
    p.add_argument("--bf16", action="store_true",
                   help="also the fused forward with bfloat16 matrix products (needs AVX512_BF16)")
    args = p.parse_args(argv)
    if args.bf16 and not bf16_available():
        p.error("--bf16: this CPU has no AVX512_BF16, or the fused extension is unavailable")
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    fused_ok = load_extension() is not None
    if not fused_ok:
        common.log("fused extension unavailable: eager only")
    default_threads = torch.get_num_threads()
    common.log("matmul peak ...")
    peak0 = {t: common.matmul_peak(t) for t in cfg["threads"]}
    peak_bf16 = {t: common.matmul_peak(t, torch.bfloat16) for t in cfg["threads"]} if args.bf16 else None
    rows = sweep(cfg, fused_ok, peak0, args.bf16)
    torch.set_num_threads(default_threads)
    procs = processes(cfg["proc_s"], ["eager", "fused"] if fused_ok else ["eager"])
    peak1 = {t: common.matmul_peak(t) for t in cfg["threads"]}
    peak = {t: max(peak0[t], peak1[t]) for t in cfg["threads"]}
    for r in rows:  # % of the peak counting the model's MACs, and counting those the kernel executes (fewer: fused)
        r["pct_peak"] = 100 * r["gflops"] / peak[r["threads"]]
        r["pct_peak_executed"] = r["pct_peak"] * r["executed_mac_window"] / r["mac_window"]
        # the same statistic as the peak's (its best call): a call slowed by another tenant of the machine
        # lowers the median, not the best
        r["pct_peak_best"] = 100 * 2 * r["mac_window"] * r["windows_s_best"] / 1e9 / peak[r["threads"]]
    summ = summary(rows, procs)
    print("torch.mm float32 peak (GFLOP/s, start/end): " + ", ".join(
        f"{t} thread(s) {peak0[t]:.0f}/{peak1[t]:.0f}" for t in cfg["threads"]))
    if peak_bf16:
        print("torch.mm bfloat16 peak (GFLOP/s): " + ", ".join(f"{t} thread(s) {v:.0f}" for t, v in peak_bf16.items()))
    agreement = bf16_scores() if args.bf16 else []
    if agreement:
        print(common.table(agreement, [("kind", "kind", ""), ("windows", "windows", ",d"),
                                       ("median_rel", "median |d score|/score", ".4f"), ("p99_rel", "p99", ".4f"),
                                       ("max_rel", "max", ".4f"), ("over_float32", "over f32", "d"),
                                       ("over_bf16", "over bf16", "d"), ("changed_side", "changed side", "d")],
                           "\nbfloat16 products against float32: trained detectors on held-out fleet readings"))
    print(common.table(rows, [("kind", "kind", ""), ("F", "F", "d"), ("H", "H", "d"), ("batch", "batch", "d"),
                              ("threads", "thr", "d"), ("impl", "impl", ""), ("windows_s", "windows/s", ",.0f"),
                              ("windows_cpu_s", "win/CPU-s", ",.0f"), ("mac_window", "MAC/win", ",d"),
                              ("gflops", "GFLOP/s", ".1f"), ("pct_peak", "% peak", ".0f"),
                              ("pct_peak_executed", "% peak exec.", ".0f"), ("pct_peak_best", "% peak best", ".0f")],
                       "\nEngine sweep (W=64, L=16; % peak counts the model's MACs, exec. those the kernel executes; "
                       "windows/s and % peak from the median call, % peak best from the best call, as the peak)"))
    print(common.table(summ, [("threads", "thr", "d"), ("batch", "batch", "d"), ("gru_eager", "GRU eager", ",.0f"),
                              ("gru_fused", "GRU fused", ",.0f"), ("gru_speedup", "x", ".2f"),
                              ("lstm_eager", "LSTM eager", ",.0f"), ("lstm_fused", "LSTM fused", ",.0f"),
                              ("lstm_speedup", "x", ".2f"), ("gru_over_lstm_eager", "GRU/LSTM eager", ".2f"),
                              ("gru_over_lstm_fused", "GRU/LSTM fused", ".2f")],
                       "\nF=8 H=64: fused vs eager, GRU vs LSTM (windows/s)"))
    print(common.table(procs, [("kind", "kind", ""), ("impl", "impl", ""), ("procs", "procs", "d"),
                               ("windows_s", "windows/s", ",.0f"), ("vs_1proc_1thread", "vs 1x1", ".2f"),
                               ("vs_1proc_2threads", "vs 1x2", ".2f")],
                       "\n2 processes x 1 thread, batch 256, F=8 H=64 (vs 1 process x 1 / x 2 threads)"))
    common.write_json(args.json, "engine", {
        "quick": args.quick, "config": cfg, "window": WINDOW, "latent": LATENT, "fused_available": fused_ok,
        "matmul_peak_gflops": {"start": peak0, "end": peak1, "used": peak, "bfloat16": peak_bf16}, "rows": rows,
        "summary": summ, "bf16_scores": agreement,
        "processes": procs, "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
