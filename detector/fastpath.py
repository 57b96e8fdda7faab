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
``python -m detector.fastpath build`` builds it ahead of time (e.g. in a Docker image).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from .filelock import exclusive_lock
from .models import ModelConfig, SequenceAutoencoder, model_cost

__all__ = ["FusedAutoencoder", "FusedUnavailable", "fused_available", "fused_mode", "load_extension",
           "executed_macs", "compile_flags", "DEFAULT_TILE"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_fused_rnn.cpp")
HEADERS = [Path(__file__).with_name("_fused_gates.h")]  # included by SOURCE: part of the build key
CFLAGS = ["-O3", "-ffast-math", "-fopenmp"]  # fast-math: libmvec expf/tanhf where not AVX-512; -march: compile_flags()
DEFAULT_TILE = 16  # windows per cache tile: 8-24 measured alike, 32 5-15 % slower (W=64, H=64 and 128; RESULTS item 14)
_STATE: dict[str, object] = {}  # "module" or "error", once per process


class FusedUnavailable(RuntimeError):
    """The fused extension was required (``ANOMALYD_FUSED_RNN=1``) but cannot be built or loaded."""


def fused_mode() -> str:
    """``auto`` | ``on`` | ``off`` from ``ANOMALYD_FUSED_RNN``."""
    raw = os.environ.get("ANOMALYD_FUSED_RNN", "auto").strip().lower()
    mode = {"0": "off", "false": "off", "no": "off", "1": "on", "true": "on", "yes": "on", "": "auto"}.get(raw, raw)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"ANOMALYD_FUSED_RNN must be auto, on/1 or off/0, got {raw!r}")
    return mode


def _march() -> str:
    """The ``-march`` target: ``ANOMALYD_FUSED_MARCH`` (e.g. ``x86-64-v3`` for AVX2 without AVX-512), else native."""
    march = os.environ.get("ANOMALYD_FUSED_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):
        raise ValueError(f"ANOMALYD_FUSED_MARCH must be a -march value such as native or x86-64-v3, got {march!r}")
    return march


def compile_flags() -> list[str]:
    """The compiler flags of the extension (part of its build key)."""
    return [*CFLAGS, f"-march={_march()}"]


def _cpu_id() -> str:
    """Model name and flags of this CPU (the build targets this CPU unless ANOMALYD_FUSED_MARCH says otherwise)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))


def _build_dir() -> Path:
    root = Path(os.environ.get("ANOMALYD_CACHE") or Path.home() / ".cache" / "anomalyd").expanduser()
    return root / "torch_extensions"


def _name() -> str:
    key = "\n".join([SOURCE.read_text(), *(h.read_text() for h in HEADERS), " ".join(compile_flags()),
                     torch.__version__, sys.version, _cpu_id()])
    return "anomalyd_fused_rnn_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def load_extension(build: bool = True) -> ModuleType | None:
    """The compiled extension module, building it first if needed and ``build``; None when unavailable.

    A failed build is remembered (``<name>.failed`` holds the error) and not retried until the source,
    flags, torch or CPU change, or the marker is deleted.
    """
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    if "error" in _STATE:
        return None
    name = _name()
    where = _build_dir() / name
    failed = where.with_suffix(".failed")
    try:
        if failed.exists():
            raise RuntimeError(f"an earlier build failed (delete {failed} to retry): {failed.read_text()[-500:]}")
        if not build and not (where / f"{name}.so").exists():
            return None
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError("no C++ compiler (c++ or $CXX) on PATH")
        from torch.utils.cpp_extension import load

        where.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(where.with_suffix(".lock")):
            (where / "lock").unlink(missing_ok=True)  # torch's own lock file, stale if a builder was killed
            try:
                module = load(name, [str(SOURCE)], extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"],
                              build_directory=str(where), verbose=False)
            except Exception as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
    except Exception as exc:  # no compiler, build error, import error: fall back to eager PyTorch
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("fused RNN extension unavailable, using eager PyTorch: %s", _STATE["error"])
        return None
    _STATE["module"] = module
    return module


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
    """

    def __init__(self, model: SequenceAutoencoder, tile: int = DEFAULT_TILE, module: ModuleType | None = None):
        self._ext = module or load_extension()
        if self._ext is None:
            raise FusedUnavailable(f"fused RNN extension unavailable: {_STATE.get('error')}")
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
                                    self._enc, self._dec, self._head, self.tile)

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
                                            c.latent_size, self._enc, self._dec, self._head, self.tile)
        return score, contrib


def _rnn_weights(rnn: torch.nn.RNNBase, layers: int) -> list[torch.Tensor]:
    out = []
    for layer in range(layers):
        for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"):
            out.append(getattr(rnn, f"{n}_l{layer}").detach().contiguous())
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m detector.fastpath build``: build (or find) the extension; exit 1 if it cannot be built."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        print("usage: python -m detector.fastpath build", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    module = load_extension()
    if module is None:
        print(f"fused RNN extension unavailable: {_STATE.get('error')}", file=sys.stderr)
        return 1
    print(f"fused RNN extension ready: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
