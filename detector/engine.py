"""Batched inference over many streams and several models: one forward per model per batch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .autoencoder import AutoencoderDetector
from .base import Detector
from .cuda_graphs import GraphedScorer, graphs_mode
from .device import autocast_dtype, resolve_device, tf32_possible
from .fastpath import FusedAutoencoder, bf16_available, bf16_speedup, fused_available
from .scoring import WindowScores

__all__ = ["InferenceEngine", "ModelScores", "EAGER_CPU_CHUNK", "SCORE_CEILING", "WARM_UP_BATCHES",
           "REDUCED_PRECISION_MARGIN"]

log = logging.getLogger(__name__)

EAGER_CPU_CHUNK = 256
"""Eager PyTorch on CPU scores in chunks of this many windows: 1.3-1.7x faster than one big batch at batch
4096 (the recurrent state and gate buffers stay in cache; see benchmarks/RESULTS.md)."""

WARM_UP_BATCHES = (1, 64, 512, 4096)
"""Batch sizes :meth:`InferenceEngine.warm_up` scores once per model. On a GPU the first forward pays cuDNN/cuBLAS
set-up and lazy kernel loading: 0.27-0.33 s on an H200 (benchmarks/RESULTS.md, GPU section), which the first
micro-batch of a fresh daemon would otherwise wait for."""

REDUCED_PRECISION_MARGIN = 1e-2
"""Scoring with bfloat16 or float16 products (``precision`` other than float32, where it takes effect), or in
float32 on a GPU whose cuDNN may round as TF32 (PyTorch's default, :func:`detector.device.tf32_possible`), a window is
over its model's threshold only when its score is this much (relative) above it, and normalised scores are
divided by ``1 + margin``: those roundings move a window's score by up to a few tenths of a percent (about 2 % at
most on trained models, benchmarks/RESULTS.md item 42), and a threshold calibrated on scores without any spread
(a flat sensor) lies only 1e-4 above them, so that every window of that flat sensor alarmed."""

SCORE_CEILING = 1e6
"""Normalised scores are capped here (a million times the threshold). A window the model cannot reconstruct in
float32 (a reading near the float32 limit overflows the scaled input or the squared error) scores NaN or +inf;
it is anomalous, so it scores the ceiling: finite in alerts (strict JSON) and in the score histogram's sum."""


@dataclass(frozen=True)
class ModelScores:
    """Scores of one model's group of windows."""

    raw: WindowScores  # raw error and per-feature contributions
    normalised: np.ndarray  # (B,) 1.0 == at the model's threshold
    over: np.ndarray  # (B,) bool, raw score above the threshold


class InferenceEngine:
    """Holds named detectors on one device and scores groups of windows with as few device calls as possible.

    ``score({"gru": windows_a, "lstm": windows_b})`` runs one forward per model (chunked only above
    ``max_batch``) under ``torch.inference_mode``, with optional float16/bfloat16 autocast on GPU.
    ``swap`` replaces the whole model set atomically (hot reload) while scoring continues. On a GPU, ``add`` and
    ``swap`` first run :meth:`warm_up` on the new models, so no micro-batch waits for the device's set-up.

    On CPU, autoencoders run through the fused C++ forward of :mod:`detector.fastpath` when it is available
    (``fused=None``: as ``ANOMALYD_FUSED_RNN`` says, default auto; ``True`` requires it; ``False``: eager
    PyTorch). The detectors themselves are not changed: their own ``score_windows`` stays eager. There,
    ``precision="bfloat16"`` runs the fused kernels' matrix products in bfloat16 where the CPU has AVX512_BF16
    (:attr:`bf16_products`); every other CPU case computes in float32.

    On a GPU, autoencoders are scored through CUDA graphs of the whole scoring step (:mod:`detector.cuda_graphs`),
    captured when a model is added (``cuda_graphs=None``: as ``ANOMALYD_CUDA_GRAPHS`` says, default auto: used
    unless a capture fails; ``True`` requires them; ``False``: eager).
    """

    def __init__(self, device: str = "auto", precision: str = "float32", max_batch: int = 16384,
                 fused: bool | None = None, cuda_graphs: bool | None = None) -> None:
        self.device = resolve_device(device)
        autocast_dtype(precision, self.device)  # validates
        self.precision = precision
        self.max_batch = max_batch
        if fused is None:
            fused = fused_available(self.device)
        elif fused and self.device.type != "cpu":
            raise ValueError(f"the fused forward runs on the CPU only, the engine's device is {self.device}")
        elif fused and not fused_available(self.device):
            raise RuntimeError("fused=True but the fused RNN extension is unavailable (see the log)")
        self.fused = bool(fused)
        self.bf16_products = False  # the fused kernels' matrix products in bfloat16 (CPU, precision bfloat16)
        if self.device.type == "cpu" and precision == "bfloat16":
            self.bf16_products = self.fused and bf16_available()
            if not self.bf16_products:
                log.warning("precision bfloat16 on the CPU needs the fused kernels and a CPU with AVX512_BF16 (%s); "
                            "scoring in float32", "no AVX512_BF16 here" if self.fused else "fused kernels off")
            elif (speedup := bf16_speedup()) < 0.9:  # an Intel Xeon without AMX: 0.62-0.86x
                log.warning("bfloat16 products are slower than float32 on this CPU (%.2fx its windows/s, measured "
                            "now): precision float32 would score faster", speedup)
            else:
                log.info("bfloat16 products: %.2fx float32's windows/s on this CPU (measured now)", speedup)
        reduced = self.bf16_products or (self.device.type == "cuda" and precision != "float32") \
            or tf32_possible(self.device)
        self.margin = REDUCED_PRECISION_MARGIN if reduced else 0.0  # see REDUCED_PRECISION_MARGIN
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the engine's device is {self.device}")
        mode = graphs_mode() if cuda_graphs is None else ("on" if cuda_graphs else "off")
        self._graphs_mode = mode if self.device.type == "cuda" else "off"
        self._models: dict[str, Detector] = {}
        self._forwards: dict[str, FusedAutoencoder | GraphedScorer] = {}  # per model, when not eager
        self._lock = threading.Lock()

    @property
    def models(self) -> dict[str, Detector]:
        return dict(self._models)

    @property
    def cuda_graphs(self) -> bool:
        """Whether this engine captures CUDA graphs (a model whose capture failed in auto mode is scored eagerly)."""
        return self._graphs_mode != "off"

    def _place(self, detector: Detector) -> tuple[Detector, Callable[[torch.Tensor], torch.Tensor] | None]:
        """Move a detector to the engine's device; its fused forward when the engine uses one."""
        forward = None
        if isinstance(detector, AutoencoderDetector):
            detector.to(self.device)
            detector.model.eval()
            if self.fused and all(p.dtype == torch.float32 for p in detector.model.parameters()):
                forward = FusedAutoencoder(detector.model, bf16=self.bf16_products)
        return detector, forward

    def _graphed(self, name: str, det: Detector) -> GraphedScorer | None:
        """``det``'s CUDA-graph scorer when this engine uses graphs; None to score it eagerly."""
        if self._graphs_mode == "off" or not isinstance(det, AutoencoderDetector) or det.scaler is None:
            return None
        try:
            return GraphedScorer(det, self.max_batch, self.precision)
        except RuntimeError as exc:
            if self._graphs_mode == "on":
                raise
            log.warning("model %r: CUDA graph capture failed, scoring it eagerly: %s", name, exc)
            return None

    def add(self, name: str, detector: Detector) -> None:
        det, forward = self._place(detector)
        if self.device.type == "cuda":
            self._warm({name: det}, {name: forward} if forward else {}, WARM_UP_BATCHES)
            forward = self._graphed(name, det) or forward
        with self._lock:
            forwards = {k: v for k, v in self._forwards.items() if k != name}
            if forward is not None:
                forwards[name] = forward
            self._models, self._forwards = {**self._models, name: det}, forwards

    def swap(self, models: Mapping[str, Detector]) -> None:
        """Replace the model set atomically; a batch in flight finishes on the old set."""
        placed = {name: self._place(det) for name, det in models.items()}
        if self.device.type == "cuda":  # before the swap: scoring goes on with the old set meanwhile
            self._warm({n: d for n, (d, _) in placed.items()}, {n: f for n, (_, f) in placed.items() if f},
                       WARM_UP_BATCHES)
            placed = {n: (d, self._graphed(n, d) or f) for n, (d, f) in placed.items()}
        with self._lock:
            self._models = {name: det for name, (det, _) in placed.items()}
            self._forwards = {name: fwd for name, (_, fwd) in placed.items() if fwd is not None}

    def warm_up(self, batch_sizes: tuple[int, ...] = WARM_UP_BATCHES) -> None:
        """Score zero windows once per batch size with every loaded autoencoder (scores are discarded; no model,
        scaler or threshold state changes). Done automatically on a GPU; on the CPU there is nothing to warm."""
        with self._lock:
            models, forwards = self._models, self._forwards
        self._warm(models, forwards, batch_sizes)

    def _warm(self, models: Mapping[str, Detector], forwards: Mapping[str, Callable],
              batch_sizes: tuple[int, ...]) -> None:
        with torch.inference_mode():
            for name, det in models.items():
                if not isinstance(det, AutoencoderDetector) or det.scaler is None:
                    continue
                forward = forwards.get(name)
                if isinstance(forward, GraphedScorer):
                    forward.score_windows(np.zeros((1, det.window, det.n_features), dtype=np.float32))
                    continue
                for b in batch_sizes:
                    b = min(b, self.max_batch)
                    windows = np.zeros((b, det.window, det.n_features), dtype=np.float32)
                    det.score_windows(windows, batch_size=b, precision=self.precision, forward=forward)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def score(self, groups: Mapping[str, np.ndarray]) -> dict[str, ModelScores]:
        """{model name: windows (B, W, F)} -> {model name: ModelScores}."""
        with self._lock:
            models, forwards = self._models, self._forwards  # one consistent snapshot for the whole call
        out: dict[str, ModelScores] = {}
        with torch.inference_mode():
            for name, windows in groups.items():
                det = models.get(name)
                if det is None:
                    raise KeyError(f"model {name!r} is not loaded (loaded: {sorted(models)})")
                forward = forwards.get(name)
                if isinstance(forward, GraphedScorer):
                    raw = forward.score_windows(windows)
                elif isinstance(det, AutoencoderDetector):
                    batch = self.max_batch
                    if forward is None and self.device.type == "cpu":
                        batch = min(batch, EAGER_CPU_CHUNK)  # cache-sized eager chunks
                    raw = det.score_windows(windows, batch_size=batch, precision=self.precision, forward=forward)
                else:
                    raw = det.score_windows(windows)
                thr = det.threshold
                if thr is None:
                    raise RuntimeError(f"model {name!r} has no calibrated threshold")
                score = raw.score
                if not np.isfinite(score).all():  # overflow (eager: NaN, fused: +inf): the most anomalous
                    score = np.where(np.isnan(score), np.inf, score)
                if self.margin:
                    score = score / (1.0 + self.margin)
                out[name] = ModelScores(raw=raw, normalised=np.minimum(thr.normalise(score), SCORE_CEILING),
                                        over=thr.is_anomalous(score))
        return out

    def memory_bytes(self) -> int:
        """GPU memory allocated by this process on the engine's device (0 on CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return 0
