import warnings

import numpy as np
import pytest
import torch

from detector.models import GRUAutoencoder, LSTMAutoencoder, ModelConfig, build_model, model_cost
from detector.thresholds import SPOTThreshold
from detector.training import TrainConfig, _fill_missing, calibrate_threshold, train_detector


@pytest.mark.parametrize("kind,cls", [("gru", GRUAutoencoder), ("lstm", LSTMAutoencoder)])
@pytest.mark.parametrize("layers", [1, 2])
def test_forward_contract(kind, cls, layers):
    cfg = ModelConfig(kind=kind, n_features=5, window=12, hidden_size=16, num_layers=layers, latent_size=4,
                      dropout=0.1 if layers > 1 else 0.0)
    model = build_model(cfg)
    assert type(model) is cls
    x = torch.randn(3, 12, 5)  # (B, W, F)
    assert model(x).shape == (3, 12, 5)
    assert model.encode(x).shape == (3, 4)


def test_cost_counts_parameters_and_gru_is_three_quarters_of_lstm():
    gru = ModelConfig(kind="gru", n_features=8, window=64, hidden_size=64, latent_size=16)
    lstm = ModelConfig(kind="lstm", n_features=8, window=64, hidden_size=64, latent_size=16)
    cg, cl = model_cost(gru), model_cost(lstm)
    assert cg.params == sum(p.numel() for p in build_model(gru).parameters())
    # encoder + decoder recurrences dominate: 3 gate blocks vs 4
    assert 0.72 < cg.macs_per_window / cl.macs_per_window < 0.78
    # hand count for the GRU: W*3H(F+H) + H*L + L*H + W*3H(L+H) + W*H*F
    H, W, F, L = 64, 64, 8, 16
    assert cg.macs_per_window == W * 3 * H * (F + H) + H * L + L * H + W * 3 * H * (L + H) + W * H * F


@pytest.mark.parametrize("bad", [{"kind": "rnn"}, {"window": 0}, {"hidden_size": -1}, {"dropout": 1.5}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_config_dict_round_trip_rejects_unknown_keys():
    cfg = ModelConfig(kind="lstm", n_features=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 4})


@pytest.mark.parametrize("field", ["n_features", "window", "hidden_size", "num_layers", "latent_size", "dropout"])
def test_config_rejects_booleans(field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be"):
        ModelConfig(**{field: True if field != "dropout" else False})


def test_config_from_dict_needs_a_dict():
    with pytest.raises(ValueError, match="ModelConfig must be a dict"):
        ModelConfig.from_dict(None)  # type: ignore[arg-type]


# The training data preparation (detector.training) has no test file of its own among these; it is tested here.
def test_fill_missing_never_looks_ahead_and_leaves_empty_columns_empty():
    nan = np.nan
    X = np.array([[nan, nan, 1], [1, nan, nan], [5, nan, 3], [nan, nan, nan], [9, nan, nan]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN column used to warn (mean of empty slice)
        out = _fill_missing(X)
    # leading NaNs take the first valid value (not a mean over later, validation, rows); then carry forward; an
    # empty column stays empty (training fills it with the scaler's centre, as the daemon does)
    expected = np.array([[1, nan, 1], [1, nan, 1], [5, nan, 3], [5, nan, 3], [9, nan, 3]], np.float32)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32 and np.isnan(X).sum() == 10  # the input is left alone


def test_a_feature_that_first_reports_in_the_validation_part_lends_no_value_to_training_rows():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2)).astype(np.float32)
    X[:190, 1] = np.nan  # feature 1 reports only in the last rows: inside the validation part (the last 20 %)
    X[190:, 1] = 17.0
    det = train_detector(X, ModelConfig(kind="gru", n_features=2, window=8, hidden_size=4, latent_size=2),
                         TrainConfig(epochs=1, threshold="quantile", threshold_params={"q": 0.9}), log=None)
    assert det.scaler.center[1] == 0.0  # training rows held no value of it (was 17, copied from validation)


def test_a_threshold_that_cannot_be_fitted_falls_back_to_spot_then_to_the_quantile_of_the_same_risk():
    scores = np.random.default_rng(1).exponential(size=150)
    said = []
    fallback = calibrate_threshold(scores, "dspot", {"risk": 1e-3, "depth": 200}, said.append)  # needs 220 here
    assert fallback.kind == "spot" and "using 'spot' with the same risk" in said[0]  # closer to its risk than the
    assert fallback.threshold == SPOTThreshold(risk=1e-3).fit(scores).threshold  # quantile on few scores (RESULTS)
    with pytest.raises(ValueError, match="risk must be in"):  # parameters it refuses are no lack of data
        calibrate_threshold(scores, "spot", {"risk": 0.05}, said.append)


def test_a_tail_fit_extrapolated_far_beyond_the_scores_is_said():
    """Few validation windows and one outlier: the tail fit put the threshold 1e5 to 1e38 above every other score
    (detection effectively off), and training logged only the threshold."""
    for n, outlier in ((60, 100.0), (200, 1e4)):  # the threshold above the outlier, or just below it
        scores = np.random.default_rng(7).exponential(size=n)
        scores[10] = outlier
        said: list[str] = []
        thr = calibrate_threshold(scores, "spot", {}, said.append)
        assert thr.threshold > 1e3 and len(said) == 1 and "times the second largest validation score" in said[0]
    clean: list[str] = []
    calibrate_threshold(np.random.default_rng(7).exponential(size=1000), "spot", {}, clean.append)
    assert clean == []


def test_a_tail_fit_that_overflows_falls_back_instead_of_failing_the_training():
    rng = np.random.default_rng(0)  # excesses spanning 100 decades: r ** -gamma overflows a double
    scores = np.concatenate([np.zeros(4900), 10.0 ** rng.uniform(-100, 0, size=100)])
    said = []
    thr = calibrate_threshold(scores, "spot", {"risk": 1e-5}, said.append)
    assert thr.kind == "quantile" and "0.9999 quantile" in said[0]  # 1 - risk, at most 0.9999
    assert thr.threshold == pytest.approx(np.quantile(scores, 0.9999))


@pytest.mark.parametrize(("kind", "params"), [("quantile", {"q": 0.99}), ("spot", {"risk": 1e-3}),
                                              ("dspot", {"risk": 1e-3, "depth": 20})])
def test_scores_without_spread_leave_room_for_float32_rounding_and_are_said(kind, params):
    """A sensor flat in validation: every window scores c. The daemon scores the same window with the fused kernel
    (calibration ran eager PyTorch), about 1e-7 relative apart; a margin of 1e-9 made every normal window over."""
    c = 0.0300195134
    said = []
    thr = calibrate_threshold(np.full(500, c), kind, params, said.append)
    assert "every validation window scores 0.0300195" in said[0]
    assert not thr.is_anomalous(np.array([c * (1 + 1e-6), c * (1 - 1e-6)])).any()
    assert thr.is_anomalous(np.array([c * 1.01])).all()
