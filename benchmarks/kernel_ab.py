"""Kernel A/B: the fused forward built from an older revision's sources against the working tree's, in one
process, timed alternately (this shared machine's drift then hits both alike).

    python -m benchmarks.kernel_ab --base d7274f3~1 --kind gru --hidden 64      # item 14 of RESULTS.md
    python -m benchmarks.kernel_ab --base 6ad6478~1 --kind lstm                 # item 20
    python -m benchmarks.kernel_ab --base eec1bd4 --kind gru --cpu-time         # items 54-55 (and --kind lstm)

A base before e7aec8d (bfloat16 products) has ae_forward/ae_score without their last argument, ``bf16``, which
``FusedAutoencoder`` now passes: such a module is called through :class:`Float32Only`, which drops it (float32).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from . import common

SOURCES = ("detector/_fused_rnn.cpp", "detector/_fused_gates.h", "detector/_window_ring.h", "detector/_bf16_mm.h")


def _build(name: str, root: Path):
    from torch.utils.cpp_extension import load

    from detector import fastpath

    return load(name, [str(root / "_fused_rnn.cpp")], extra_cflags=fastpath.compile_flags(),
                extra_ldflags=["-fopenmp"], build_directory=str(root), verbose=False)


class Float32Only:
    """A kernel module built before e7aec8d, as ``FusedAutoencoder`` calls one now: its ``ae_forward`` and
    ``ae_score`` take the arguments of the current ones but the trailing ``bf16`` (False: float32 products, all
    such a kernel has); every other attribute is the module's own. ``bf16_supported`` says False."""

    def __init__(self, module) -> None:
        self._module = module

    @staticmethod
    def bf16_supported() -> bool:
        return False

    def ae_forward(self, *args):
        return self._module.ae_forward(*self._float32(args))

    def ae_score(self, *args):
        return self._module.ae_score(*self._float32(args))

    @staticmethod
    def _float32(args: tuple) -> tuple:
        *rest, bf16 = args
        if bf16:
            raise ValueError("this kernel predates the bfloat16 products (e7aec8d): float32 only")
        return tuple(rest)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def adapt(module):
    """``module`` as ``FusedAutoencoder`` calls it: as it is when it has the bfloat16 products' argument (it
    reports ``bf16_supported``, added with it in e7aec8d), else through :class:`Float32Only`."""
    return module if hasattr(module, "bf16_supported") else Float32Only(module)


def _checkout(rev: str, dest: Path) -> None:
    """The kernel sources of ``rev`` into ``dest`` (the gate header only where the revision has it)."""
    for path in SOURCES:
        got = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=common.REPO, capture_output=True)
        if got.returncode == 0:
            (dest / Path(path).name).write_bytes(got.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose kernel is A (B: the working tree)")
    p.add_argument("--kind", choices=["gru", "lstm"], default="gru")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--reps", type=int, default=6, help="alternating timings per batch; the best of each is kept")
    p.add_argument("--score", action="store_true",
                   help="time score() (scaling, forward, error over the last step) instead of the forward alone")
    p.add_argument("--cpu-time", action="store_true",
                   help="windows per CPU-second of the process (time.process_time) instead of per wall-clock second: "
                        "the time slices other tenants of a shared machine take do not count (1 thread)")
    args = p.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    from detector.fastpath import FusedAutoencoder
    from detector.models import ModelConfig, build_model

    with tempfile.TemporaryDirectory() as tmp:
        a_dir, b_dir = Path(tmp, "a"), Path(tmp, "b")
        a_dir.mkdir()
        b_dir.mkdir()
        _checkout(args.base, a_dir)
        for path in SOURCES:
            src = common.REPO / path
            if src.exists():
                (b_dir / src.name).write_bytes(src.read_bytes())
        mods = {"A": adapt(_build("kernel_ab_a", a_dir)), "B": adapt(_build("kernel_ab_b", b_dir))}
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind=args.kind, n_features=args.features, window=64,
                                        hidden_size=args.hidden, latent_size=16)).eval()
        fused = {k: FusedAutoencoder(model, module=m) for k, m in mods.items()}
        x = torch.randn(256, 64, args.features)
        with torch.no_grad():
            want = model(x)
            for k, f in fused.items():
                print(f"{k}: largest difference from eager PyTorch {(f(x) - want).abs().max().item():.2e}")
        for b in args.batches:
            x = torch.randn(b, 64, args.features)
            center, scale = torch.zeros(args.features), torch.ones(args.features)
            best = {"A": 0.0, "B": 0.0}
            for _ in range(args.reps):
                for k, f in fused.items():
                    t, n = clock(), 0
                    while clock() - t < 0.4:
                        f.score(x, center, scale, 1) if args.score else f(x)
                        n += b
                    best[k] = max(best[k], n / (clock() - t))
            print(f"{'score' if args.score else 'forward'} {args.kind} F={args.features} H={args.hidden} batch {b}, "
                  f"{args.threads} thread(s): "
                  f"A {best['A']:,.0f} windows per {'CPU-' if args.cpu_time else ''}second, B {best['B']:,.0f}, "
                  f"B/A {best['B'] / best['A']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
