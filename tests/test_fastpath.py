"""The fused C++ forward (detector.fastpath) computes the same function as the eager GRU/LSTM autoencoders."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from detector import fastpath, native_build
from detector.engine import InferenceEngine
from detector.fastpath import FusedAutoencoder, executed_macs
from detector.models import ModelConfig, build_model, model_cost
from detector.scoring import reconstruction_error

pytestmark = pytest.mark.usefixtures("cxx")


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("layers,W,F,H,L", [(1, 16, 4, 16, 4), (2, 9, 3, 8, 2), (3, 5, 7, 12, 3),
                                              (1, 12, 8, 64, 16)])  # the benchmarked H: 192 / 256 gate columns
def test_fused_forward_matches_eager(kind, layers, W, F, H, L):
    torch.manual_seed(layers)
    cfg = ModelConfig(kind=kind, n_features=F, window=W, hidden_size=H, latent_size=L, num_layers=layers)
    model = build_model(cfg).eval()
    x = 3 * torch.randn(11, W, F)  # (B, W, F)
    with torch.inference_mode():
        want = model(x)
        first = None
        for tile in (1, 4, 32):  # tiles that split the batch unevenly and one larger than it
            got = FusedAutoencoder(model, tile=tile)(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            first = got if first is None else first
            assert torch.equal(got, first)  # a window's output does not depend on the batch around it
        assert FusedAutoencoder(model)(x[:0]).shape == (0, W, F)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("H", [4, 8, 24, 64])  # on AVX-512: scalar columns only, 8 of them, 16 + 8, whole vectors
def test_far_out_readings_saturate_the_gates_as_in_eager(kind, H):
    """A reading 1e2 to 3e7 away from the scaler's centre (a sentinel such as -9999) saturates every gate: the
    scalar gate columns gave NaN past about 88 (libm's vector calls under -ffast-math), and the score went to the
    ceiling with no feature named."""
    torch.manual_seed(H)
    model = build_model(ModelConfig(kind=kind, n_features=3, window=6, hidden_size=H, latent_size=4)).eval()
    x = fastpath.saturating_windows(12, 6, 3)  # (B, W, F)
    with torch.inference_mode():
        torch.testing.assert_close(FusedAutoencoder(model)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_a_window_with_nan_reconstructs_as_nan_as_in_eager(kind):
    """A window with a NaN reconstructs as NaN (the fused gates clamped it: finite numbers where the eager model
    gives NaN), and the other windows as before."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, n_features=3, window=8, hidden_size=8, latent_size=2)).eval()
    x = torch.randn(4, 8, 3)
    x[1, 2, 0], x[2, 7, 2] = float("nan"), float("nan")
    with torch.inference_mode():
        want, got = model(x), FusedAutoencoder(model, tile=2)(x)
    assert torch.isnan(want[1:3]).all() and torch.isnan(got[1:3]).all()
    torch.testing.assert_close(got[[0, 3]], want[[0, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("last_k", [None, 1, 5, 99])
def test_fused_score_matches_scaling_forward_and_error(kind, last_k):
    torch.manual_seed(1)
    cfg = ModelConfig(kind=kind, n_features=3, window=10, hidden_size=8, latent_size=2)
    model = build_model(cfg).eval()
    x = 5 + 2 * torch.randn(9, 10, 3)  # raw windows (B, W, F)
    center, scale = torch.tensor([5.0, 4.0, 6.0]), torch.tensor([2.0, 0.5, 3.0])
    with torch.inference_mode():
        xs = (x - center) / scale
        want_score, want_contrib = reconstruction_error(xs, model(xs), last_k)
        score, contrib = FusedAutoencoder(model, tile=4).score(x, center, scale, last_k)
    torch.testing.assert_close(score, want_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(contrib, want_contrib, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last_k"):
        FusedAutoencoder(model).score(x, center, scale, 0)


def test_fused_sees_in_place_weight_updates_and_rejects_bad_input():
    cfg = ModelConfig(kind="gru", n_features=2, window=6, hidden_size=4, latent_size=2)
    model = build_model(cfg).eval()
    fused = FusedAutoencoder(model)
    x = torch.randn(3, 6, 2)
    with torch.no_grad():
        model.output.bias.add_(1.0)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 CPU windows"):
        fused(x.double())


def test_executed_macs_subtract_the_hoisted_decoder_projection():
    cfg = ModelConfig(kind="lstm", n_features=8, window=64, hidden_size=64, latent_size=16)
    assert model_cost(cfg).macs_per_window - executed_macs(cfg) == 63 * 4 * 64 * 16


def test_engine_uses_fused_forward_and_scores_like_the_detector(trained, synthetic, monkeypatch):
    _, test = synthetic
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(test.values[:80], 32, axis=0).transpose(0, 2, 1))
    engine = InferenceEngine(device="cpu", fused=True)
    engine.swap(trained)
    assert engine.fused
    out = engine.score({"gru": windows, "lstm": windows})
    for kind in ("gru", "lstm"):
        np.testing.assert_allclose(out[kind].raw.score, trained[kind].score_windows(windows).score, rtol=1e-4)
    monkeypatch.setenv("ANOMALYD_FUSED_RNN", "0")
    assert not InferenceEngine(device="cpu").fused
    monkeypatch.setenv("ANOMALYD_FUSED_RNN", "maybe")
    with pytest.raises(ValueError, match="ANOMALYD_FUSED_RNN"):
        fastpath.fused_mode()


def test_a_window_that_overflows_once_scaled_is_most_anomalous_on_both_paths(trained, synthetic):
    """A reading finite in float32 but not once scaled, before the scored last steps: the eager model's state is
    NaN from there, and the engine makes that the ceiling; the fused gates clamped NaN into an ordinary score."""
    import copy

    from detector.engine import SCORE_CEILING

    _, test = synthetic
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(test.values[:40], 32, axis=0).transpose(0, 2, 1))
    windows[3, 2, :] = 3.0e38  # a sentinel value, step 2 of 32
    models = {k: copy.deepcopy(d) for k, d in trained.items()}
    for d in models.values():
        d.score_last_k = 4
    outs = []
    for fused in (True, False):
        engine = InferenceEngine(device="cpu", fused=fused)
        engine.swap(models)
        assert engine.fused == fused
        outs.append(engine.score({k: windows for k in models}))
    for kind in models:
        for out in outs:
            assert out[kind].over[3] and out[kind].normalised[3] == SCORE_CEILING
        np.testing.assert_array_equal(outs[0][kind].over, outs[1][kind].over)


def _run_fastpath(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detector.fastpath", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


_AVX2 = {"avx2", "fma"} <= fastpath._cpu_flags()


@pytest.mark.skipif(not _AVX2, reason="the AVX2 kernel needs an x86-64 CPU with AVX2")
def test_avx2_build_matches_eager_on_any_avx2_machine():
    """The kernel built for x86-64-v3 (AVX2, no AVX-512: other register blocks, libmvec gate maths) is also
    right; on an AVX-512 machine such as this one it is otherwise never built. First build about a minute."""
    done = _run_fastpath("build", "--check", ANOMALYD_FUSED_MARCH="x86-64-v3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checked against eager PyTorch: avx2 kernel, -march=x86-64-v3" in done.stdout


def test_prebuilt_candidates_follow_the_cpu_flags():
    v3 = set(fastpath.PORTABLE_TARGETS["x86-64-v3"])
    v4 = set(fastpath.PORTABLE_TARGETS["x86-64-v4"])
    assert fastpath.prebuilt_candidates(v4 | {"sse4_2"}) == ["x86-64-v4", "x86-64-v3"]  # best first
    assert fastpath.prebuilt_candidates(v3) == ["x86-64-v3"]
    assert fastpath.prebuilt_candidates(v3 - {"fma"}) == []
    assert fastpath.prebuilt_candidates(v4, march="x86-64-v3") == ["x86-64-v3"]  # ANOMALYD_FUSED_MARCH decides
    assert fastpath.prebuilt_candidates(v4, march="znver4") == []  # not a portable level


@pytest.mark.skipif(not _AVX2, reason="the portable kernels need an x86-64 CPU with AVX2")
def test_portable_kernels_load_without_a_compiler(tmp_path):
    """What the container image does: ``build --portable`` where a compiler is (the build stage), then a process
    without one (the runtime) loads the best portable kernel its CPU runs, checked against eager PyTorch."""
    built = _run_fastpath("build", "--portable")  # cached under ANOMALYD_CACHE, as the other builds
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    best = fastpath.prebuilt_candidates(fastpath._cpu_flags())[0]
    check = ("import logging; logging.basicConfig(level=logging.INFO)\n"
             "from detector import fastpath; print(fastpath.self_check())")
    no_compiler = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "ANOMALYD_FUSED_MARCH": ""}
    done = subprocess.run([sys.executable, "-c", check], env=no_compiler, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [{"x86-64-v4": "avx512", "x86-64-v3": "avx2"}[best]]
    assert f"the prebuilt {best} kernel" in done.stderr
    empty = subprocess.run([sys.executable, "-c", "from detector import fastpath; print(fastpath.load_extension())"],
                           env={**no_compiler, "ANOMALYD_CACHE": str(tmp_path)}, capture_output=True, text=True,
                           timeout=300)
    assert empty.stdout.split() == ["None"]  # eager PyTorch, and the log says how to get a kernel
    assert "no C++ compiler" in empty.stderr and "build --portable" in empty.stderr


def test_march_is_validated(monkeypatch):
    monkeypatch.setenv("ANOMALYD_FUSED_MARCH", "native; rm -rf /")
    with pytest.raises(ValueError, match="ANOMALYD_FUSED_MARCH"):
        fastpath.compile_flags()
    monkeypatch.setenv("ANOMALYD_FUSED_MARCH", "x86-64-v3")
    assert "-march=x86-64-v3" in fastpath.compile_flags()


def test_a_portable_level_this_cpu_lacks_is_refused_not_built(monkeypatch):
    """x86-64-v4 on a CPU with AVX2 only: its kernel would die of SIGILL at the first call; eager PyTorch instead."""
    monkeypatch.setattr(fastpath, "_STATE", {})
    monkeypatch.setattr(fastpath, "_cpu_flags", lambda: set(fastpath.PORTABLE_TARGETS["x86-64-v3"]))
    monkeypatch.setenv("ANOMALYD_FUSED_MARCH", "x86-64-v4")
    assert fastpath.load_extension() is None
    assert "x86-64-v4 needs avx512bw, avx512cd, avx512dq, avx512f, avx512vl" in fastpath._STATE["error"]


def test_a_failed_build_is_not_retried_with_the_same_compiler_until_the_marker_ages(tmp_path):
    """A failed build leaves a marker naming the compiler, so that each process does not pay for the failure
    again; another compiler, or a marker FAILED_RETRY_S old, tries again. One process per load, as in use (torch
    remembers a build within a process), in a cache of its own (tmp_path)."""
    calls = tmp_path / "calls"

    def failing_compiler(name: str) -> str:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
        path.chmod(0o755)
        return str(path)

    def load(cxx: str) -> tuple[str, int]:
        code = "from detector import fastpath; print(fastpath.load_extension(), fastpath._STATE.get('error'))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "CXX": cxx, "ANOMALYD_CACHE": str(tmp_path / "cache")})
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, len(calls.read_text().splitlines()) if calls.exists() else 0

    cxx_a, cxx_b = failing_compiler("cxx-a"), failing_compiler("cxx-b")
    out, tried = load(cxx_a)
    assert out.startswith("None") and tried > 0  # the build ran the compiler, which failed: eager PyTorch
    marker = next((tmp_path / "cache" / "torch_extensions").glob("*.failed"))
    assert cxx_a in marker.read_text()
    out, again = load(cxx_a)
    assert again == tried and "failed less than 24 h ago" in out  # the same compiler: not tried again
    out, tried_b = load(cxx_b)
    assert out.startswith("None") and tried_b > tried  # another compiler: tried
    assert cxx_b in marker.read_text()
    marker.write_text(marker.read_text().replace(cxx_b, cxx_a))
    aged = marker.stat().st_mtime - native_build.FAILED_RETRY_S - 60
    os.utime(marker, (aged, aged))
    out, tried_c = load(cxx_a)
    assert out.startswith("None") and tried_c > tried_b  # an old marker: tried again


def test_the_kernels_own_checks_leave_every_gpu_alone(monkeypatch):
    """self_check and bf16_speedup seed and restore the CPU's generator only: torch.random.fork_rng() saves every
    visible GPU's RNG state (a CUDA context each) and torch.manual_seed seeds them. Here torch.cuda's RNG calls are
    recorders, with two GPUs said to be visible (this machine has none)."""
    touched = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": touched.append(("get", device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": touched.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: touched.append(("seed", seed)))
    fastpath.self_check()
    if fastpath.bf16_available():
        fastpath.bf16_speedup(batch=8, reps=1)
    assert touched == []
