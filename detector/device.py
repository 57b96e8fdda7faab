"""Device, precision and CPU-thread selection."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "available_cpus", "exact_float32", "inference_threads", "resolve_device",
           "tf32_possible"]

PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (physical cores), before anyone changes it


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when present, else ``cpu``; anything else is validated and returned."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # "Expected one of cpu, cuda, ... device type at start of device string: tpu"
        raise ValueError(f"device must be auto, cpu, cuda, cuda:<index> or mps, got {str(device)!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} requested but MPS (Apple silicon) is not available on this machine")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: GPU only (on the CPU, ``bfloat16`` is the fused kernels'
    own bfloat16 matrix products where the CPU has AVX512_BF16, ``detector.engine.InferenceEngine``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision] if device.type == "cuda" else None


def tf32_possible(device: torch.device) -> bool:
    """Whether float32 scoring on ``device`` may round as TF32: cuDNN's RNNs do by PyTorch's default
    (``torch.backends.cudnn.allow_tf32``), moving a score by up to a few tenths of a percent (0.19 % measured on an
    H200, benchmarks/RESULTS.md, checks on the GPU), not float32's 1e-7."""
    return device.type == "cuda" and bool(torch.backends.cudnn.allow_tf32)


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """cuDNN without TF32 inside (on a CUDA ``device``; nothing to do elsewhere): a threshold calibrated on scores
    rounded as TF32 lay 1e-4 above a flat sensor's score, and the same window scored in float32 (the CPU) was over
    it by up to 0.19 %. Process-wide while it lasts (training, not the daemon)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a Kubernetes CPU limit),
    rounded up. ``os.cpu_count()`` and torch's default see the node's cores, not the container's limit."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_quota(root: Path) -> float | None:
    """CPU quota in CPUs from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when unlimited or unknown."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def inference_threads(requested: int, cpus: int | None = None) -> int | None:
    """Intra-op threads for CPU inference. ``requested`` > 0 is used as given. 0 (auto): None (leave torch as it
    is) when ``OMP_NUM_THREADS`` is set; else ``cpus`` (default: the CPUs the container may use, at most torch's
    default of one per physical core; torch alone would count the node's cores). Measured on 2 vCPUs, every CPU
    for inference beside the polling thread gave the most events/s (benchmarks/RESULTS.md, item 15)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, min(available_cpus(), _TORCH_DEFAULT_THREADS) if cpus is None else cpus)
