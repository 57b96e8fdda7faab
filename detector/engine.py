"""Batched inference over many streams and several models: one forward per model per batch."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .autoencoder import AutoencoderDetector
from .base import Detector
from .device import autocast_dtype, resolve_device
from .scoring import WindowScores

__all__ = ["InferenceEngine", "ModelScores"]


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
    ``swap`` replaces the whole model set atomically (hot reload) while scoring continues.
    """

    def __init__(self, device: str = "auto", precision: str = "float32", max_batch: int = 16384) -> None:
        self.device = resolve_device(device)
        autocast_dtype(precision, self.device)  # validates
        self.precision = precision
        self.max_batch = max_batch
        self._models: dict[str, Detector] = {}
        self._lock = threading.Lock()

    @property
    def models(self) -> dict[str, Detector]:
        return dict(self._models)

    def _place(self, detector: Detector) -> Detector:
        if isinstance(detector, AutoencoderDetector):
            detector.to(self.device)
            detector.model.eval()
        return detector

    def add(self, name: str, detector: Detector) -> None:
        with self._lock:
            self._models = {**self._models, name: self._place(detector)}

    def swap(self, models: Mapping[str, Detector]) -> None:
        """Replace the model set atomically; a batch in flight finishes on the old set."""
        placed = {name: self._place(det) for name, det in models.items()}
        with self._lock:
            self._models = placed

    def score(self, groups: Mapping[str, np.ndarray]) -> dict[str, ModelScores]:
        """{model name: windows (B, W, F)} -> {model name: ModelScores}."""
        models = self._models  # one consistent snapshot for the whole call
        out: dict[str, ModelScores] = {}
        with torch.inference_mode():
            for name, windows in groups.items():
                det = models.get(name)
                if det is None:
                    raise KeyError(f"model {name!r} is not loaded (loaded: {sorted(models)})")
                if isinstance(det, AutoencoderDetector):
                    raw = det.score_windows(windows, batch_size=self.max_batch, precision=self.precision)
                else:
                    raw = det.score_windows(windows)
                thr = det.threshold
                if thr is None:
                    raise RuntimeError(f"model {name!r} has no calibrated threshold")
                out[name] = ModelScores(raw=raw, normalised=thr.normalise(raw.score),
                                        over=thr.is_anomalous(raw.score))
        return out

    def memory_bytes(self) -> int:
        """GPU memory allocated by this process on the engine's device (0 on CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return 0
