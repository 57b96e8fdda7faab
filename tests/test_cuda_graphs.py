"""CUDA-graph scoring (detector.cuda_graphs): bucket choice and mode everywhere; graphs against eager on a GPU."""

import numpy as np
import pytest
import torch

from detector.cuda_graphs import MIN_BUCKET, GraphedScorer, bucket_for, bucket_sizes, graphs_mode
from detector.engine import InferenceEngine


def test_buckets_are_powers_of_two_then_the_largest_batch():
    assert bucket_sizes(4096) == (64, 128, 256, 512, 1024, 2048, 4096)
    assert bucket_sizes(5000) == (64, 128, 256, 512, 1024, 2048, 4096, 5000)
    assert bucket_sizes(10) == (10,)
    assert bucket_sizes(MIN_BUCKET) == (MIN_BUCKET,)
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(0)


def test_bucket_for_picks_the_smallest_that_holds_the_chunk():
    buckets = bucket_sizes(5000)
    assert [bucket_for(n, buckets) for n in (1, 64, 65, 904, 4096, 4097, 5000)] == [64, 64, 128, 1024, 4096,
                                                                                     5000, 5000]
    for n in range(1, 5001, 37):  # never more than twice the chunk above the smallest bucket
        b = bucket_for(n, buckets)
        assert n <= b and (b <= 2 * n or b == MIN_BUCKET)
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(5001, buckets)


def test_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv("ANOMALYD_CUDA_GRAPHS", raising=False)
    assert graphs_mode() == "auto"
    monkeypatch.setenv("ANOMALYD_CUDA_GRAPHS", "0")
    assert graphs_mode() == "off"
    monkeypatch.setenv("ANOMALYD_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="ANOMALYD_CUDA_GRAPHS"):
        graphs_mode()


def test_scorer_refuses_a_detector_on_the_cpu(trained):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, the detector is on cpu"):
        GraphedScorer(trained["gru"], max_batch=256)


def test_cpu_engine_never_uses_graphs(monkeypatch):
    monkeypatch.setenv("ANOMALYD_CUDA_GRAPHS", "on")  # like ANOMALYD_FUSED_RNN: applies where it can
    assert not InferenceEngine("cpu").cuda_graphs
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        InferenceEngine("cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_checks.py runs it)")
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_graphed_scores_match_eager_on_cuda(kind, synthetic):
    from detector.models import ModelConfig
    from detector.training import TrainConfig, train_detector

    train, test = synthetic
    cfg = ModelConfig(kind=kind, n_features=train.shape[1], window=16, hidden_size=8, latent_size=4)
    det = train_detector(train[:800], cfg, TrainConfig(epochs=1, max_windows=300, device="cpu",
                                                       threshold="quantile"), log=None)
    wins = np.lib.stride_tricks.sliding_window_view(test.values[:700], 16, axis=0).transpose(0, 2, 1)
    graphed = InferenceEngine("cuda", max_batch=256, cuda_graphs=True)
    graphed.add("m", det)
    eager = InferenceEngine("cuda", max_batch=256, cuda_graphs=False)
    eager.add("m", det)  # moves det again, which drops its scaling tensors: the graphs must keep what they read
    torch.randn(1 << 20, device="cuda")  # new allocations that would reuse memory the graphs had lost
    for n in (1, 70, 256, len(wins)):  # padded buckets, the largest one, and several chunks
        a, b = eager.score({"m": wins[:n]})["m"], graphed.score({"m": wins[:n]})["m"]
        np.testing.assert_allclose(b.raw.score, a.raw.score, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(b.raw.contributions, a.raw.contributions, rtol=1e-3, atol=1e-6)
