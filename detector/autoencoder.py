"""A fitted GRU/LSTM autoencoder bundled with its scaler and threshold: the unit the daemon serves."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from .base import Detector
from .device import autocast_dtype, resolve_device
from .fastpath import FusedAutoencoder
from .models import ModelConfig, SequenceAutoencoder, build_model
from .scaling import Scaler
from .scoring import WindowScores, reconstruction_error
from .thresholds import Threshold

__all__ = ["AutoencoderDetector", "check_scoring_settings"]


def check_scoring_settings(model_cfg: ModelConfig, feature_names: list[str] | None,
                           score_last_k: int | None) -> None:
    """ValueError for what ``load_checkpoint`` refuses: feature names that are not ``n_features`` distinct
    non-empty strings, or a ``score_last_k`` that is not None or an integer in 1..window (9 of a window of 4
    silently scored the whole window). Checked before anything is trained or saved."""
    if feature_names is not None:
        if len(feature_names) != model_cfg.n_features:
            raise ValueError(f"{len(feature_names)} feature names for {model_cfg.n_features} features")
        if not all(isinstance(n, str) and n for n in feature_names) or len(set(feature_names)) != len(feature_names):
            raise ValueError(f"feature names must be distinct non-empty strings, got {list(feature_names)!r:.200}")
    if score_last_k is not None and (isinstance(score_last_k, bool) or not isinstance(score_last_k, int)
                                     or not 1 <= score_last_k <= model_cfg.window):
        raise ValueError(f"score_last_k must be None or an integer in 1..{model_cfg.window} (the window), "
                         f"got {score_last_k!r}")


def _overflowed(score: torch.Tensor, contributions: torch.Tensor,
                xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN score and contributions for windows with a scaled input beyond float32 (a reading that overflows once
    scaled, e.g. a sentinel 3e38): the engine makes them the most anomalous. Left alone, the outcome depended on
    the path: an eager model's state could turn NaN (or not, as weights and signs fell), and the fused gates
    clamp NaN into an ordinary score. No branch on the data: a CUDA graph captures this."""
    bad = ~torch.isfinite(xs).flatten(1).all(dim=1)  # (B,)
    return score.masked_fill(bad, float("nan")), contributions.masked_fill(bad[:, None], float("nan"))


class AutoencoderDetector(Detector):
    """Model + scaler + threshold + feature names + training summary.

    ``AutoencoderDetector(model_cfg, train_cfg).fit(X)`` trains one; ``detector.training.train_detector`` is
    the same as a function; ``detector.checkpoint.load_checkpoint`` rebuilds one from disk.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: Any = None,
        *,
        model: SequenceAutoencoder | None = None,
        scaler: Scaler | None = None,
        threshold: Threshold | None = None,
        feature_names: list[str] | None = None,
        score_last_k: int | None = None,
        summary: dict | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.kind = model_cfg.kind
        self.window = model_cfg.window
        self.n_features = model_cfg.n_features
        self.device = resolve_device(device)
        self.model = (model if model is not None else build_model(model_cfg)).to(self.device).eval()
        self.scaler = scaler
        self.threshold = threshold
        check_scoring_settings(model_cfg, feature_names or None, score_last_k)
        self.feature_names = list(feature_names or [f"f{i}" for i in range(model_cfg.n_features)])
        self.score_last_k = score_last_k
        self.summary = summary or {}
        self._scale_t: tuple[torch.Tensor, torch.Tensor] | None = None

    def fit(self, X: np.ndarray, feature_names: list[str] | None = None) -> AutoencoderDetector:
        from .training import TrainConfig, train_detector

        fitted = train_detector(X, self.model_cfg, self.train_cfg or TrainConfig(), feature_names=feature_names)
        self.__dict__.update(fitted.__dict__)
        return self

    def to(self, device: str | torch.device) -> AutoencoderDetector:
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._scale_t = None
        return self

    def scaling_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaler's (center, scale) on the detector's device, made once (again after :meth:`to`)."""
        if self.scaler is None:
            raise RuntimeError("AutoencoderDetector has no fitted scaler")
        if self._scale_t is None:
            self._scale_t = (
                torch.as_tensor(self.scaler.center, device=self.device),
                torch.as_tensor(self.scaler.scale, device=self.device),
            )
        return self._scale_t

    def score_tensor(
        self, x: torch.Tensor, precision: str = "float32",
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None, autocast_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unscaled) windows already on the device (B, W, F) -> (score (B,), contributions (B, F)).

        ``forward`` replaces ``self.model`` for the forward pass; it must compute the same function. A
        ``detector.fastpath.FusedAutoencoder`` of this model on the CPU also does the scaling and the error.
        ``autocast_cache=False`` while a CUDA graph captures this (autocast's cached weight casts would outlive
        the capture's memory pool).
        """
        center, scale = self.scaling_tensors()
        dtype = autocast_dtype(precision, self.device)
        if isinstance(forward, FusedAutoencoder) and dtype is None and x.device.type == "cpu":
            return forward.score(x.float(), center, scale, self.score_last_k)  # marks such windows NaN itself
        xs = (x - center) / scale  # (B, W, F)
        ctx = (torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=autocast_cache) if dtype
               else nullcontext())
        with ctx:
            x_hat = (forward or self.model)(xs)  # (B, W, F)
        return _overflowed(*reconstruction_error(xs, x_hat, self.score_last_k), xs)

    def score_windows(
        self, windows: np.ndarray, batch_size: int = 8192, precision: str = "float32",
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> WindowScores:
        windows = self.checked_windows(windows)
        scores, contribs = [], []
        with torch.inference_mode():
            for start in range(0, max(len(windows), 1), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(windows[start : start + batch_size]))
                s, c = self.score_tensor(chunk.to(self.device, non_blocking=True), precision, forward)
                scores.append(s.float().cpu().numpy())
                contribs.append(c.float().cpu().numpy())
        return WindowScores(
            score=np.concatenate(scores).astype(np.float64), contributions=np.concatenate(contribs)
        )

    def checked_windows(self, windows: np.ndarray) -> np.ndarray:
        """``windows`` as float32 (B, W, F); ValueError naming the expected shape otherwise."""
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 3 or windows.shape[1:] != (self.window, self.n_features):
            raise ValueError(
                f"expected windows of shape (B, {self.window}, {self.n_features}), got {windows.shape}"
            )
        return windows

    def __repr__(self) -> str:
        c = self.model_cfg
        return (
            f"AutoencoderDetector(kind={c.kind}, W={c.window}, F={c.n_features}, H={c.hidden_size}, "
            f"L={c.latent_size}, layers={c.num_layers}, device={self.device})"
        )
