"""Fused CPU inference for the GRU/LSTM autoencoders: a small C++ extension, built once per machine.

Eager PyTorch runs the LSTM as one oneDNN kernel but the GRU as ~10 small ops per time step, and both
recompute the decoder's input projection at every step although the decoder's input (the latent) is the same
at every step. ``_fused_rnn.cpp`` runs the whole autoencoder forward in C++: per step one register-blocked
matrix product plus one fused, vectorised gate pass, the decoder input projection once per window, cache-sized
batch tiles handed out dynamically to the intra-op threads, no BLAS threads (see ``benchmarks/RESULTS.md`` for
the measured effect). Same weights and state-dict keys as the eager model; outputs equal within float32 rounding (about
1e-7), and a window's output does not depend on the batch it is scored in.

The extension is compiled with ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja) on first use
into ``$ANOMALYD_CACHE/torch_extensions`` (default ``~/.cache/anomalyd``), keyed by source, flags, torch
version and CPU, and loaded from there afterwards. ``ANOMALYD_FUSED_RNN``: ``0``/``off`` never uses it,
``1``/``on`` requires it (an error when it cannot be built), unset/``auto`` uses it when it can be built.
It is built for this CPU (``-march=native``); ``ANOMALYD_FUSED_MARCH`` names another target (``x86-64-v3``: the
AVX2 kernel, which the tests build and check on any AVX2 machine). The module's ``isa`` says which was built.
``python -m detector.fastpath build`` builds it ahead of time. Where no compiler is at hand (the container
image's runtime), kernels built ahead of time for the portable x86-64 levels (``build --portable``: x86-64-v4 and
x86-64-v3, each checked against eager PyTorch) are loaded from the same folder, the best one this CPU runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from .models import ModelConfig, SequenceAutoencoder, build_model, model_cost
from .native_build import build_dir, compile_cached, compiler, import_built  # the build cache (shared)

__all__ = ["FusedAutoencoder", "FusedUnavailable", "fused_available", "fused_mode", "load_extension", "bf16_available",
           "executed_macs", "compile_flags", "self_check", "prebuilt_candidates", "DEFAULT_TILE",
           "PORTABLE_TARGETS", "env_mode", "window_kernel", "saturating_windows", "bf16_speedup"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_fused_rnn.cpp")
HEADERS = [Path(__file__).with_name(h) for h in ("_fused_gates.h", "_window_ring.h", "_bf16_mm.h")]  # in the key
CFLAGS = ["-O3", "-ffast-math", "-fopenmp"]  # fast-math: libmvec expf/tanhf where not AVX-512; -march: compile_flags()
DEFAULT_TILE = 16  # windows per cache tile: 8-24 measured alike, 32 5-15 % slower (W=64, H=64 and 128; RESULTS item 14)
_STATE: dict[str, object] = {}  # "module" or "error", once per process
_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})  # abm: LZCNT
PORTABLE_TARGETS: dict[str, frozenset[str]] = {  # -march levels of `build --portable`, best first: cpuinfo flags
    "x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": _V3,
}


class FusedUnavailable(RuntimeError):
    """The fused extension was required (``ANOMALYD_FUSED_RNN=1``) but cannot be built or loaded."""


def env_mode(variable: str) -> str:
    """``auto`` | ``on`` | ``off`` from the environment variable ``variable`` (unset: auto; 1/true/yes: on;
    0/false/no: off); a ValueError naming the variable otherwise."""
    raw = os.environ.get(variable, "auto").strip().lower()
    mode = {"0": "off", "false": "off", "no": "off", "1": "on", "true": "on", "yes": "on", "": "auto"}.get(raw, raw)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{variable} must be auto, on/1 or off/0, got {raw!r}")
    return mode


def fused_mode() -> str:
    """``auto`` | ``on`` | ``off`` from ``ANOMALYD_FUSED_RNN``."""
    return env_mode("ANOMALYD_FUSED_RNN")


def _march() -> str:
    """The ``-march`` target: ``ANOMALYD_FUSED_MARCH`` (e.g. ``x86-64-v3`` for AVX2 without AVX-512), else native."""
    march = os.environ.get("ANOMALYD_FUSED_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):
        raise ValueError(f"ANOMALYD_FUSED_MARCH must be a -march value such as native or x86-64-v3, got {march!r}")
    return march


def compile_flags(march: str | None = None) -> list[str]:
    """The compiler flags of the extension (part of its build key) for ``march`` (default: the configured one)."""
    return [*CFLAGS, f"-march={march or _march()}"]


def _cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for ln in text.splitlines() if ln.startswith("flags") for f in ln.split(":", 1)[1].split()}


def _cpu_id() -> str:
    """Model name and flags of this CPU (the build targets this CPU unless ANOMALYD_FUSED_MARCH says otherwise)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))


def _name(march: str | None = None) -> str:
    """The build's name: a hash of source, flags, torch and Python, and of the CPU for a native build only (a
    portable level's build runs on every CPU with its flags, so an image can carry it)."""
    march = march or _march()
    key = "\n".join([SOURCE.read_text(), *(h.read_text() for h in HEADERS), " ".join(compile_flags(march)),
                     torch.__version__, sys.version, *([_cpu_id()] if march == "native" else [])])
    return "anomalyd_fused_rnn_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def prebuilt_candidates(flags: set[str], march: str = "native") -> list[str]:
    """The portable levels whose prebuilt kernel a CPU with ``flags`` may load, best first (only ``march`` itself
    when ANOMALYD_FUSED_MARCH names a level)."""
    wanted = list(PORTABLE_TARGETS) if march == "native" else [march]
    return [t for t in wanted if t in PORTABLE_TARGETS and PORTABLE_TARGETS[t] <= flags]


def _load_prebuilt() -> ModuleType:
    """The best kernel built ahead of time for a portable level this CPU runs, imported without a compiler."""
    candidates = prebuilt_candidates(_cpu_flags(), _march())
    for target in candidates:
        module = import_built(_name(target))
        if module is not None:
            log.info("fused RNN extension: the prebuilt %s kernel (%s)", target, module.__file__)
            return module
    raise RuntimeError(f"no prebuilt kernel for {candidates or 'this CPU (no portable x86-64 level)'} under "
                       f"{build_dir()} (python -m detector.fastpath build --portable makes them)")


def _check_cpu_runs(march: str) -> None:
    """A portable level with instructions this CPU lacks is refused (its kernel would die of SIGILL at the first
    call); the kernel itself refuses to import on a CPU without the instruction sets it was compiled for."""
    need, flags = PORTABLE_TARGETS.get(march), _cpu_flags()
    if need is not None and flags and not need <= flags:
        raise RuntimeError(f"ANOMALYD_FUSED_MARCH={march} needs {', '.join(sorted(need - flags))}, which this CPU "
                           "lacks")


def load_extension(build: bool = True) -> ModuleType | None:
    """The compiled extension module, building it first if needed and ``build``; None when unavailable.

    Without a C++ compiler, the best prebuilt portable kernel this CPU runs (``build --portable``). A failed
    build is remembered (``<name>.failed`` holds the compiler and the error), so that every process does not
    pay for it again: it is tried again when the source, flags, torch, CPU or compiler change, once the marker
    is ``native_build.FAILED_RETRY_S`` old, or when the marker is deleted.
    """
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    if "error" in _STATE:
        return None
    name = _name()
    try:
        _check_cpu_runs(_march())
        if compiler() is None:
            try:
                module = _load_prebuilt()
            except RuntimeError as exc:
                raise RuntimeError(f"no C++ compiler (c++ or $CXX) on PATH, and {exc}") from None
        elif not build and not (build_dir() / name / f"{name}.so").exists():
            return None
        else:
            module = compile_cached(name, [SOURCE], compile_flags(), ["-fopenmp"], HEADERS)
    except Exception as exc:  # no compiler, build error, import error: fall back to eager PyTorch
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("fused extension unavailable, using eager PyTorch for CPU models and numpy for the window buffers: "
                    "%s", _STATE["error"])
        return None
    _STATE["module"] = module
    return module


def window_kernel(native: bool | None = None):
    """The extension's ``window_add`` (``_window_ring.h``) for :class:`detector.windows.WindowBuffer`, or None for
    numpy: ``native`` True requires it, False never uses it, None follows ``ANOMALYD_NATIVE_WINDOWS`` (auto: when
    the extension can be had, building it if needed). Raises RuntimeError when required but unavailable."""
    mode = env_mode("ANOMALYD_NATIVE_WINDOWS") if native is None else ("on" if native else "off")
    if mode == "off":
        return None
    kernel = getattr(load_extension(), "window_add", None)  # a prebuilt kernel of an older version lacks it
    if kernel is None and mode == "on":
        raise RuntimeError("the native window kernel is required (native=True or ANOMALYD_NATIVE_WINDOWS=on) but "
                           "the fused extension is unavailable or lacks it (python -m detector.fastpath build)")
    return kernel


def fused_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused path will be used for models on ``device`` (CPU only), building it if needed.

    Raises :class:`FusedUnavailable` when ``ANOMALYD_FUSED_RNN=on`` and it cannot be built.
    """
    mode = fused_mode()
    if mode == "off" or torch.device(device).type != "cpu":
        return False
    ok = load_extension() is not None
    if not ok and mode == "on":
        raise FusedUnavailable(f"ANOMALYD_FUSED_RNN=on but the extension is unavailable: {_STATE.get('error')}")
    return ok


def bf16_available() -> bool:
    """Whether the fused kernels can run their matrix products in bfloat16 here: the extension is available and
    this CPU has AVX512_BF16 (``models.precision: bfloat16`` on the CPU; see ``_bf16_mm.h``)."""
    return _has_bf16(load_extension() if fused_mode() != "off" else None)


@contextmanager
def _cpu_seeded(seed: int) -> Iterator[None]:
    """The CPU's generator seeded with ``seed``, and restored after: only the CPU's (``fork_rng`` saves every
    visible GPU's state, a CUDA context each, and ``torch.manual_seed`` seeds them)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def bf16_speedup(batch: int = 256, reps: int = 3) -> float:
    """Windows/s of the fused GRU forward (W=64, F=8, H=64) with bfloat16 products over float32's, this CPU, one
    thread, best of ``reps`` alternating runs (about 0.1 s). AVX512_BF16 is not always faster: 1.35-1.75x on an AMD
    Zen 4 (benchmarks/RESULTS.md, item 42), 0.62-0.86x on an Intel Xeon without AMX (item 57)."""
    with _cpu_seeded(0):
        model = build_model(ModelConfig(kind="gru", n_features=8, window=64, hidden_size=64, latent_size=16))
        x = torch.randn(batch, 64, 8)  # (B, W, F)
    forwards = {bf16: FusedAutoencoder(model, bf16=bf16) for bf16 in (False, True)}
    best = dict.fromkeys(forwards, math.inf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(reps):
                for bf16, forward in forwards.items():
                    t0 = time.perf_counter()
                    forward(x)
                    best[bf16] = min(best[bf16], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best[False] / best[True]


def _has_bf16(module: ModuleType | None) -> bool:
    """Whether ``module`` (an extension, or None) runs bfloat16 products on this CPU (an older build lacks them)."""
    return bool(module is not None and hasattr(module, "bf16_supported") and module.bf16_supported())


def executed_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates per window the fused path executes: ``model_cost`` less the decoder's hoisted
    input projection (computed once per window instead of once per step)."""
    gates = 4 if cfg.kind == "lstm" else 3
    saved = (cfg.window - 1) * gates * cfg.hidden_size * cfg.latent_size
    return model_cost(cfg).macs_per_window - saved


class FusedAutoencoder:
    """Inference-only callable equivalent to ``model(x)`` for float32 CPU windows (B, W, F) -> (B, W, F).

    Holds references (not copies) to the model's parameters, so in-place weight updates are seen; build a
    new one after moving the model to another device or dtype. No autograd.

    ``bf16``: the matrix products round their inputs to bfloat16 and accumulate in float32 (1.35-1.75x faster on
    an AMD Zen 4, slower on an Intel Xeon without AMX: :func:`bf16_speedup`; needs AVX512_BF16,
    :func:`bf16_available`; scores then differ from float32 by a few 0.1 %).
    """

    def __init__(self, model: SequenceAutoencoder, tile: int = DEFAULT_TILE, module: ModuleType | None = None,
                 bf16: bool = False):
        self._ext = module or load_extension()
        if self._ext is None:
            raise FusedUnavailable(f"fused RNN extension unavailable: {_STATE.get('error')}")
        if bf16 and not _has_bf16(self._ext):
            raise FusedUnavailable("bfloat16 products need a CPU with AVX512_BF16 (and an extension built with them)")
        self.bf16 = bool(bf16)
        params = list(model.parameters())
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            raise ValueError("FusedAutoencoder needs a float32 model on the CPU")
        cfg: ModelConfig = model.cfg
        self.cfg = cfg
        self.tile = int(tile)
        self._lstm = cfg.kind == "lstm"
        self._enc = _rnn_weights(model.encoder, cfg.num_layers)
        self._dec = _rnn_weights(model.decoder, cfg.num_layers)
        self._head = [p.detach().contiguous() for p in (model.to_latent.weight, model.to_latent.bias,
                                                        model.from_latent.weight, model.from_latent.bias,
                                                        model.output.weight, model.output.bias)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) float32 CPU -> reconstruction (B, W, F); releases the GIL while it runs."""
        c = self.cfg
        if x.dim() != 3 or x.shape[2] != c.n_features or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"expected float32 CPU windows (B, W, {c.n_features}), got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
        return self._ext.ae_forward(x.detach().contiguous(), self._lstm, c.hidden_size, c.latent_size,
                                    self._enc, self._dec, self._head, self.tile, self.bf16)

    def score(self, x: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
              last_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw windows (B, W, F) -> (score (B,), contributions (B, F)): ``(x - center) / scale``, the forward and
        ``detector.scoring.reconstruction_error`` in one pass per cache tile (no reconstruction tensor)."""
        c = self.cfg
        if x.dim() != 3 or x.shape[2] != c.n_features or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"expected float32 CPU windows (B, W, {c.n_features}), got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
        if last_k is not None and last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        k = x.shape[1] if last_k is None else min(last_k, x.shape[1])
        center = center.detach().to(torch.float32).contiguous()
        scale = scale.detach().to(torch.float32).contiguous()
        score, contrib = self._ext.ae_score(x.detach().contiguous(), center, scale, k, self._lstm, c.hidden_size,
                                            c.latent_size, self._enc, self._dec, self._head, self.tile, self.bf16)
        return score, contrib


def _rnn_weights(rnn: torch.nn.RNNBase, layers: int) -> list[torch.Tensor]:
    out = []
    for layer in range(layers):
        for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"):
            out.append(getattr(rnn, f"{n}_l{layer}").detach().contiguous())
    return out


def self_check(module: ModuleType | None = None) -> str:
    """The kernel against eager PyTorch on small GRU and LSTM models (whole register blocks and a remainder, and
    inputs far enough out to saturate every gate), and where this CPU has AVX512_BF16 its bfloat16 products within
    bfloat16's rounding; raises AssertionError on a mismatch. Returns the kernel's ``isa``."""
    module = module or load_extension()
    if module is None:
        raise FusedUnavailable(f"fused RNN extension unavailable: {_STATE.get('error')}")
    bf16 = _has_bf16(module)
    with _cpu_seeded(3):
        for kind in ("gru", "lstm"):
            model = build_model(ModelConfig(kind=kind, n_features=8, window=12, hidden_size=64, latent_size=16))
            x = 3 * torch.randn(37, 12, 8)  # (B, W, F)
            with torch.inference_mode():
                want = model.eval()(x)
                torch.testing.assert_close(FusedAutoencoder(model, tile=16, module=module)(x), want, rtol=1e-5,
                                           atol=1e-5)
                if bf16:
                    torch.testing.assert_close(FusedAutoencoder(model, tile=16, module=module, bf16=True)(x), want,
                                               rtol=0.05, atol=0.02)
            saturating = build_model(ModelConfig(kind=kind, n_features=3, window=6, hidden_size=24, latent_size=4))
            x = saturating_windows(12, 6, 3)
            with torch.inference_mode():  # H=24: 16 vector columns and 8 scalar ones on AVX-512
                torch.testing.assert_close(FusedAutoencoder(saturating, module=module)(x), saturating.eval()(x),
                                           rtol=1e-4, atol=1e-4)
    return str(module.isa)


def saturating_windows(batch: int, window: int, features: int) -> torch.Tensor:
    """``(B, W, F)`` windows of ``randn`` with one reading, and one whole feature, per window far out (1e2 to 3e7,
    signs alternating): every gate saturates, where a kernel's gate maths must stay finite as PyTorch's does."""
    x = torch.randn(batch, window, features)  # (B, W, F)
    for i in range(batch):
        mag = (1e2, 1e3, 1e4, 1e5, 1e6, 3e7)[i % 6] * (-1) ** i
        if i % 2:
            x[i, i % window, i % features] = mag  # one reading
        else:
            x[i, :, i % features] = mag  # a whole feature
    return x


def _build_portable() -> int:
    """Build and check, each in its own process, every portable level this CPU runs (a level it cannot run
    cannot be checked, so it is not shipped)."""
    flags = _cpu_flags()
    targets = prebuilt_candidates(flags)
    for target in PORTABLE_TARGETS:
        if target not in targets:
            print(f"skipped {target}: this CPU lacks {', '.join(sorted(PORTABLE_TARGETS[target] - flags))}")
    for target in targets:
        safe_path = ["-P"] if sys.flags.safe_path else []  # -P: the same package as this process (not the cwd's)
        done = subprocess.run([sys.executable, *safe_path, "-m", "detector.fastpath", "build", "--check"],
                              env={**os.environ, "ANOMALYD_FUSED_MARCH": target})
        if done.returncode:
            print(f"{target}: build or check failed", file=sys.stderr)
            return 1
    if not targets:
        print("no portable x86-64 level runs on this CPU: nothing built (eager PyTorch is used)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m detector.fastpath build [--check] [--portable]``; exit 1 if a build or check fails."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m detector.fastpath", description="Build the fused CPU kernels.")
    p.add_argument("command", choices=["build"])
    p.add_argument("--check", action="store_true", help="check the kernel against eager PyTorch")
    p.add_argument("--portable", action="store_true",
                   help=f"build and check the portable levels this CPU runs ({', '.join(PORTABLE_TARGETS)}) "
                        "instead of the native kernel, for a runtime without a compiler")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.portable:
        return _build_portable()
    module = load_extension()
    if module is None:
        print(f"fused RNN extension unavailable: {_STATE.get('error')}", file=sys.stderr)
        return 1
    if args.check:
        print(f"checked against eager PyTorch: {self_check(module)} kernel, -march={_march()}"
              + (", and its bfloat16 products (AVX512_BF16)" if _has_bf16(module) else ""))
    print(f"fused RNN extension ready: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
