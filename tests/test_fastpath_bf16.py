"""bfloat16 matrix products in the fused kernels (detector/_bf16_mm.h): models.precision bfloat16 on the CPU.

Where the CPU has AVX512_BF16 the numeric tests run; where it does not, they check the clear refusal instead.
"""

import logging

import numpy as np
import pytest
import torch

from detector import fastpath
from detector.engine import InferenceEngine
from detector.fastpath import FusedAutoencoder, FusedUnavailable
from detector.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("cxx")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def _linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """a . w^T (+ b) with both operands rounded to bfloat16, accumulated in float32: the kernel's definition."""
    y = _bf16(a) @ _bf16(w).T
    return y if b is None else y + b


def _gru_reference(model, x: torch.Tensor) -> torch.Tensor:
    """The one-layer GRU autoencoder step by step, every matrix product through :func:`_linear`."""
    enc, dec, W = model.encoder, model.decoder, x.shape[1]

    def run(inputs, h, rnn):
        outs = []
        for t in range(W):
            gi = _linear(inputs(t), rnn.weight_ih_l0, rnn.bias_ih_l0)
            gh = _linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)
            (ir, iz, i_n), (hr, hz, h_n) = gi.chunk(3, 1), gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
            outs.append(h)
        return h, torch.stack(outs, 1)  # (B, H), (B, W, H)

    h, _ = run(lambda t: x[:, t], torch.zeros(x.shape[0], model.cfg.hidden_size), enc)
    z = _linear(h, model.to_latent.weight, model.to_latent.bias)  # (B, L)
    h0 = torch.tanh(_linear(z, model.from_latent.weight, model.from_latent.bias))  # (B, H)
    _, out = run(lambda t: z, h0, dec)
    return _linear(out, model.output.weight, model.output.bias)  # (B, W, F)


def _model(kind: str, layers: int = 1, F: int = 5, H: int = 64, L: int = 7, W: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind=kind, n_features=F, window=W, hidden_size=H, latent_size=L,
                                   num_layers=layers)).eval()


def test_bf16_refused_clearly_where_the_cpu_lacks_it_else_rounds_as_specified():
    """Odd widths (F=5, L=7: a pair half-filled; H=20: a partial column vector) against the step-by-step
    reference; the kernel's output is much closer to it than to float32, so the rounding really happens."""
    model = _model("gru", F=5, H=20, L=7)
    if not fastpath.bf16_available():
        with pytest.raises(FusedUnavailable, match="AVX512_BF16"):
            FusedAutoencoder(model, bf16=True)
        return
    x = 2 * torch.randn(13, 12, 5)  # (B, W, F)
    with torch.inference_mode():
        got = FusedAutoencoder(model, tile=4, bf16=True)(x)
        ref, fp32 = _gru_reference(model, x), model(x)
    off_ref, off_fp32 = (got - ref).abs().max().item(), (got - fp32).abs().max().item()
    assert off_ref < 5e-5 and off_fp32 > 10 * off_ref, (off_ref, off_fp32)  # float32 sums in another order only


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("layers,H", [(1, 64), (2, 32)])
def test_bf16_forward_close_to_float32_and_independent_of_the_batch(kind, layers, H):
    if not fastpath.bf16_available():
        pytest.skip("this CPU has no AVX512_BF16 (the refusal is tested above)")
    model = _model(kind, layers=layers, F=8, H=H, L=16, W=32, seed=layers)
    x = torch.randn(37, 32, 8)
    with torch.inference_mode():
        want = model(x)
        outs = [FusedAutoencoder(model, tile=tile, bf16=True)(x) for tile in (1, 16, 64)]
    torch.testing.assert_close(outs[0], want, rtol=0.05, atol=0.02)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # a window's result does not depend on its tile


def test_bf16_scores_of_a_trained_detector_stay_close(trained, synthetic):
    """The engine with precision bfloat16 (when the CPU has it): scores within a few percent of float32 and the
    same windows over threshold, bar a handful at the threshold itself."""
    _, test = synthetic
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(test.values[:600], 32, axis=0).transpose(0, 2, 1))  # (B, W, F)
    base = InferenceEngine(device="cpu", fused=True)
    bf16 = InferenceEngine(device="cpu", precision="bfloat16", fused=True)
    assert bf16.bf16_products == fastpath.bf16_available()
    base.swap(trained)
    bf16.swap(trained)
    want, got = base.score({"gru": windows})["gru"], bf16.score({"gru": windows})["gru"]
    rel = np.abs(got.raw.score - want.raw.score) / want.raw.score
    if bf16.bf16_products:
        assert 0 < np.median(rel) < 0.01 and rel.max() < 0.1, (np.median(rel), rel.max())
        assert np.count_nonzero(got.over != want.over) <= max(2, len(windows) // 100)
    else:
        assert np.array_equal(got.raw.score, want.raw.score)


def test_bf16_without_the_fused_kernels_scores_in_float32_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="detector.engine"):
        engine = InferenceEngine(device="cpu", precision="bfloat16", fused=False)
    assert not engine.bf16_products
    assert "scoring in float32" in caplog.text and "fused kernels off" in caplog.text


def test_bf16_products_do_not_put_a_flat_sensor_over_its_threshold():
    """A threshold calibrated on scores without spread (a flat sensor) lies 1e-4 above them; bfloat16 products move
    a window's score by a few tenths of a percent, and 6 of 10 such models alarmed on the flat windows they were
    calibrated on. With reduced precision a window must be REDUCED_PRECISION_MARGIN over (scores divided by it)."""
    from detector.autoencoder import AutoencoderDetector
    from detector.engine import REDUCED_PRECISION_MARGIN
    from detector.scaling import Scaler
    from detector.training import calibrate_threshold

    if not fastpath.bf16_available():
        pytest.skip("this CPU has no AVX512_BF16: precision bfloat16 scores in float32 (tested above)")
    torch.set_num_threads(1)
    over, ratios = 0, []
    for seed in range(10):
        torch.manual_seed(seed)
        cfg = ModelConfig(kind="gru", n_features=4, window=16, hidden_size=32, latent_size=8)
        scaler = Scaler().fit(np.random.default_rng(0).normal(size=(100, 4)))
        scaler.center, scaler.scale = np.array([1, 2, 3, 4], np.float32), np.ones(4, np.float32)
        det = AutoencoderDetector(cfg, model=build_model(cfg), scaler=scaler)
        flat = np.broadcast_to(scaler.center, (30, 16, 4)).copy()  # (B, W, F): every window alike
        det.threshold = calibrate_threshold(det.score_windows(flat).score, "spot", {}, lambda _m: None)
        f32, b16 = InferenceEngine("cpu", fused=True), InferenceEngine("cpu", precision="bfloat16", fused=True)
        f32.add("m", det)
        b16.add("m", det)
        want, got = f32.score({"m": flat[:1]})["m"], b16.score({"m": flat[:1]})["m"]
        assert f32.margin == 0 and b16.margin == REDUCED_PRECISION_MARGIN and not want.over[0]
        over += int(got.over[0])
        ratios.append(got.normalised[0] * (1 + REDUCED_PRECISION_MARGIN) / det.threshold.normalise(got.raw.score)[0])
    assert over == 0
    np.testing.assert_allclose(ratios, 1.0, rtol=1e-6)  # normalised: the raw score over the threshold, / (1 + m)


def test_the_engine_says_how_fast_bf16_products_are_here(caplog):
    """bfloat16 products were 1.35-1.75x float32 on a Zen 4 but 0.62-0.68x on an Intel Xeon without AMX: asked for,
    they are timed once against float32 and the engine says which is faster (a warning when float32 is)."""
    import re

    if not fastpath.bf16_available():
        pytest.skip("this CPU has no AVX512_BF16: precision bfloat16 scores in float32 (tested above)")
    with caplog.at_level(logging.INFO, logger="detector.engine"):
        engine = InferenceEngine(device="cpu", precision="bfloat16", fused=True)
    assert engine.bf16_products
    (said,) = [r for r in caplog.records if "bfloat16 products" in r.getMessage()]
    speedup = float(re.search(r"(\d+\.\d+)x", said.getMessage()).group(1))
    assert 0.1 < speedup < 10 and (said.levelno == logging.WARNING) == (speedup < 0.9)
