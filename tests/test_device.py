"""CPU-thread selection (detector.device): container CPU limits and the auto rule for inference threads."""

import os

from detector import device
from detector.device import available_cpus, inference_threads


def test_available_cpus_is_capped_by_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity  # unlimited
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU (a Kubernetes limit of 500m)
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{150000 * affinity} 100000\n")  # more than the mask allows
    assert available_cpus(tmp_path) == affinity


def test_available_cpus_reads_cgroup_v1(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1


def test_inference_threads_auto_uses_the_containers_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert inference_threads(3, cpus=8) == 3  # explicit wins
    assert inference_threads(0, cpus=8) == 8
    assert inference_threads(0, cpus=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert inference_threads(0, cpus=8) is None  # the operator's environment decides
    assert inference_threads(4, cpus=8) == 4


def test_inference_threads_auto_never_exceeds_torchs_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "_TORCH_DEFAULT_THREADS", 1)
    assert inference_threads(0) == 1


def test_float32_on_a_gpu_whose_cudnn_may_use_tf32_is_calibrated_exact_and_served_with_the_margin():
    """cuDNN's RNNs round as TF32 by PyTorch's default (0.19 % measured against the CPU): a threshold calibrated so
    lay 1e-4 above a flat sensor's score, and that sensor served on the CPU was over it in every window. Training
    now scores its calibration windows without TF32, and a GPU engine in float32 keeps the reduced-precision margin
    while TF32 is allowed. (The flags are Python-side: checked here without a GPU.)"""
    import torch

    from detector.device import exact_float32, tf32_possible

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert tf32_possible(cuda) and not tf32_possible(cpu)
        with exact_float32(cuda):
            assert torch.backends.cudnn.allow_tf32 is False and not tf32_possible(cuda)
        assert torch.backends.cudnn.allow_tf32 is True  # restored
        with exact_float32(cpu):
            assert torch.backends.cudnn.allow_tf32 is True  # nothing to do off the GPU
    finally:
        torch.backends.cudnn.allow_tf32 = before
