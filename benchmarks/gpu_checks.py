"""Checks on a CUDA device that the CPU-only test suite cannot make (run on a lent GPU machine, about a minute).

For GRU and LSTM autoencoders on synthetic sensor data (``detector.synthetic``, 4 features, W=32):

1. train on the GPU with automatic mixed precision (``TrainConfig.amp``, the default there) and calibrate;
2. save the checkpoint, load it on the CPU and on the GPU, and compare the two devices' scores on the test
   stretch (float32 on both; cuDNN may use TF32): relative difference and agreement of the over-threshold
   decisions;
3. the GPU ``InferenceEngine`` in float32 and float16 against the CPU engine (the fused kernel there);
4. ``InferenceEngine.warm_up`` on the GPU, and the first ``score`` call after it;
5. the engine's CUDA graphs (the default there) against eager scoring on the same GPU, in float32 and float16:
   scores, and the median time of one ``score`` call of 4,096 windows each way.

Prints one line per check (PASS / FAIL with numbers) and exits 1 if any failed.

    python -m benchmarks.gpu_checks [--json PATH]
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from detector.checkpoint import load_checkpoint, save_checkpoint
from detector.engine import InferenceEngine
from detector.models import ModelConfig
from detector.synthetic import make_dataset
from detector.training import TrainConfig, train_detector

from . import common

WINDOW = 32
SCORE_RTOL = 0.02  # TF32 and float32 reductions in another order: per-window scores agree to about 1e-3
DECISION_AGREEMENT = 0.995
FP16_RTOL = 0.05


def _windows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(x, WINDOW, axis=0).transpose(0, 2, 1))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """The largest relative difference, scaled by the typical score (not by near-zero ones)."""
    return float(np.max(np.abs(a - b)) / max(float(np.median(np.abs(b))), 1e-12))


def check_kind(kind: str, device: str, out: list[dict]) -> None:
    train, test = make_dataset(n_train=4000, n_test=3000, n_features=4, seed=3)
    cfg = ModelConfig(kind=kind, n_features=4, window=WINDOW, hidden_size=64, latent_size=16)
    t0 = time.perf_counter()
    det = train_detector(train, cfg, TrainConfig(epochs=6, device=device, amp=True, seed=0), log=None)
    trained_s = time.perf_counter() - t0
    ok = (det.threshold is not None and det.threshold.threshold > 0
          and next(det.model.parameters()).device.type == device and np.isfinite(det.summary["best_val_loss"]))
    out.append({"check": f"{kind}: train on {device} with AMP", "ok": bool(ok), "seconds": trained_s,
                "threshold": det.threshold.threshold if det.threshold else None,
                "best_val_loss": det.summary["best_val_loss"], "epochs": det.summary["epochs_run"]})

    wins = _windows(test.values)
    cpu, gpu = _reload(det, "cpu"), _reload(det, device)
    s_cpu, s_gpu = cpu.score_windows(wins).score, gpu.score_windows(wins).score
    rel = _rel(s_gpu, s_cpu)
    agree = float(np.mean(cpu.threshold.is_anomalous(s_cpu) == gpu.threshold.is_anomalous(s_gpu)))
    out.append({"check": f"{kind}: checkpoint scores, {device} vs cpu",
                "ok": rel < SCORE_RTOL and agree >= DECISION_AGREEMENT,
                "max_rel_diff": rel, "decision_agreement": agree, "windows": len(wins)})

    ref = InferenceEngine("cpu")
    ref.swap({"m": cpu})  # engines only read a detector: the loaded ones serve here too
    base = ref.score({"m": wins})["m"]
    for precision, rtol in (("float32", SCORE_RTOL), ("float16", FP16_RTOL)):
        eng = InferenceEngine(device, precision=precision)
        t0 = time.perf_counter()
        eng.swap({"m": gpu})  # warms up on a GPU
        swap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = eng.score({"m": wins[:4096]})["m"]
        first_s = time.perf_counter() - t0
        rel = _rel(res.raw.score, base.raw.score[:4096])
        agree = float(np.mean(res.over == base.over[:4096]))
        out.append({"check": f"{kind}: engine {device} {precision} vs cpu engine (fused={ref.fused})",
                    "ok": rel < rtol and agree >= DECISION_AGREEMENT, "max_rel_diff": rel,
                    "decision_agreement": agree, "swap_with_warm_up_s": swap_s, "first_score_s": first_s,
                    "cuda_graphs": eng.cuda_graphs})
        if device == "cuda":
            _graphs_vs_eager(kind, gpu, wins[:4096], precision, rtol, eng, out)


def _graphs_vs_eager(kind: str, det, wins: np.ndarray, precision: str, rtol: float, graphed: InferenceEngine,
                     out: list[dict]) -> None:
    eager = InferenceEngine("cuda", precision=precision, cuda_graphs=False)
    eager.swap({"m": det})
    a, b = eager.score({"m": wins})["m"], graphed.score({"m": wins})["m"]
    rel = _rel(b.raw.score, a.raw.score)
    bound = 1e-3 if precision == "float32" else rtol  # the same kernels in float32; float16 may pick others
    t_eager = common.measure(lambda: eager.score({"m": wins}), min_time=0.3, min_calls=5).median_s
    t_graph = common.measure(lambda: graphed.score({"m": wins}), min_time=0.3, min_calls=5).median_s
    out.append({"check": f"{kind}: engine CUDA graphs vs eager, {precision}",
                "ok": graphed.cuda_graphs and rel < bound and float(np.mean(a.over == b.over)) >= DECISION_AGREEMENT,
                "max_rel_diff": rel, "eager_ms_per_4096": t_eager * 1e3, "graph_ms_per_4096": t_graph * 1e3,
                "speedup": t_eager / t_graph})


def _reload(det, device: str):
    """The detector as an operator gets it on ``device``: saved, then loaded from the file alone."""
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(det, tmp)
        return load_checkpoint(tmp, device=device)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("gpu_checks", __doc__)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine")
        return 2
    out: list[dict] = []
    for kind in ("gru", "lstm"):
        try:
            check_kind(kind, args.device, out)
        except Exception as exc:  # report and go on with the other kind
            out.append({"check": f"{kind}: raised", "ok": False, "error": repr(exc)})
    for r in out:
        extra = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k not in ("check", "ok")}
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']}  {extra}")
    card = torch.cuda.get_device_name() if args.device == "cuda" else common.machine_info()["cpu"]
    common.write_json(args.json, "gpu_checks", {"card": card, "device": args.device, "torch": torch.__version__,
                                                "checks": out})
    return 0 if all(r["ok"] for r in out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
