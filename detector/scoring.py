"""Reconstruction error per window and per-feature contributions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["WindowScores", "reconstruction_error", "feature_shares"]


@dataclass(frozen=True)
class WindowScores:
    """Raw anomaly scores of a batch of windows (high = anomalous)."""

    score: np.ndarray  # (B,) mean squared error over the scored steps and features
    contributions: np.ndarray  # (B, F) mean squared error per feature; score == contributions.mean(1)

    def __len__(self) -> int:
        return int(self.score.shape[0])


def reconstruction_error(
    x: torch.Tensor, x_hat: torch.Tensor, last_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over the last ``last_k`` steps (default: the whole window).

    x, x_hat: (B, W, F) in scaled units. Returns (score (B,), contributions (B, F)).
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
    if last_k is not None:
        if last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        x, x_hat = x[:, -last_k:], x_hat[:, -last_k:]  # (B, k, F)
    sq = (x.float() - x_hat.float()).square()  # (B, k, F)
    contributions = sq.mean(dim=1)  # (B, F)
    return contributions.mean(dim=1), contributions


def feature_shares(contributions: np.ndarray) -> np.ndarray:
    """(B, F) contributions -> (B, F) shares that sum to 1 per row (uniform when all are zero)."""
    c = np.maximum(np.asarray(contributions, dtype=np.float64), 0.0)
    total = c.sum(axis=1, keepdims=True)
    F = c.shape[1]
    return np.where(total > 0, c / np.where(total > 0, total, 1.0), 1.0 / F)
