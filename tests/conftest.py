"""Shared fixtures: tiny detectors trained once per session on synthetic data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.models import ModelConfig
from detector.synthetic import make_dataset
from detector.training import TrainConfig, train_detector
from tests.needs import need_cxx

torch.set_num_threads(1)
# Child processes (`python -m pipelines.cli ...`, whatever their working directory) import this checkout's code: the
# cache's shared virtualenv has its editable install pointed at whichever checkout ran scripts/setup.sh last.
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
sys.modules.setdefault("triton", None)  # type: ignore[arg-type]  # as pipelines.cli.main: no triton exit report


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Each test starts with one intra-op thread: a daemon's adaptive ScoringThreads leaves two behind, and the
    fused kernels' results then vary in the last bit with the batch around a window (tests that follow compare
    bits)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def cxx() -> None:
    """The C++ compiler for the native extensions; ``pytestmark = pytest.mark.usefixtures("cxx")``."""
    need_cxx()


TINY_TRAIN = TrainConfig(epochs=20, lr=3e-3, batch_size=64, patience=4, max_windows=2500, seed=0,
                         device="cpu", threshold="spot", threshold_params={"risk": 1e-3})


@pytest.fixture(scope="session")
def synthetic():
    """(train (T, 4), test SyntheticSeries with one anomaly of each of the five kinds)."""
    return make_dataset(n_train=2000, n_test=2000, n_features=4, seed=1)


@pytest.fixture(scope="session")
def trained(synthetic):
    """{"gru": AutoencoderDetector, "lstm": AutoencoderDetector}, W=32 H=32, trained in seconds on CPU."""
    train, _ = synthetic
    out = {}
    for kind in ("gru", "lstm"):
        cfg = ModelConfig(kind=kind, n_features=4, window=32, hidden_size=32, latent_size=8)
        out[kind] = train_detector(train, cfg, TINY_TRAIN, feature_names=[f"s{i}" for i in range(4)], log=None)
    return out


def window_labels(labels: np.ndarray, window: int) -> np.ndarray:
    """Row labels -> label of the window ending at each row (True if it contains an anomalous row)."""
    c = np.concatenate([[0], np.cumsum(labels.astype(np.int64))])
    end = np.arange(1, len(labels) + 1)
    start = np.maximum(end - window, 0)
    return (c[end] - c[start]) > 0
