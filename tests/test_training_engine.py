import logging

import numpy as np
import pytest
import torch

from detector.base import sliding_windows
from detector.engine import SCORE_CEILING, InferenceEngine
from detector.models import ModelConfig
from detector.scaling import Scaler
from detector.training import TrainConfig, load_series, train_detector

CFG = ModelConfig(kind="gru", n_features=4, window=16, hidden_size=8, latent_size=4)
FAST = TrainConfig(epochs=2, max_windows=300, device="cpu", threshold="quantile", threshold_params={"q": 0.99})


def test_training_is_deterministic_on_cpu(synthetic):
    train, _ = synthetic
    a = train_detector(train[:800], CFG, FAST, log=None)
    b = train_detector(train[:800], CFG, FAST, log=None)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        assert np.array_equal(va.numpy(), vb.numpy())
    assert a.threshold.threshold == b.threshold.threshold


def test_progress_line_per_epoch_and_summary(synthetic):
    train, _ = synthetic
    lines: list[str] = []
    det = train_detector(train[:800], CFG, FAST, log=lines.append)
    epoch_lines = [ln for ln in lines if ln.startswith("epoch")]
    assert len(epoch_lines) == 2 and "val_loss" in epoch_lines[0] and "time" in epoch_lines[0]
    assert det.summary["epochs_run"] == 2 and det.summary["train_seconds"] > 0


def test_early_stopping_stops_before_max_epochs(synthetic):
    train, _ = synthetic
    cfg = TrainConfig(epochs=50, lr=0.0, patience=2, max_windows=200, device="cpu", threshold="quantile")
    det = train_detector(train[:600], CFG, cfg, log=None)  # lr 0: val loss never improves after epoch 1
    assert det.summary["epochs_run"] == 3


@pytest.mark.parametrize(("scale", "reading", "said"), [(1.0, 1e30, "training windows whose error is not finite"),
                                                       (0.1, 3e38, "training windows with values beyond float32")])
def test_a_reading_beyond_float32_leaves_its_windows_out_and_the_rest_trains(synthetic, scale, reading, said):
    """1e30: finite after scaling, but its windows' squared error is inf, so the loss of every batch holding one was
    inf and its clipped step zero (nearly every batch: no training), reported as "loss inf" with no word of why.
    3e38 with data of scale 0.1: inf after scaling, and one such window in a batch made every gradient NaN, the
    weights with them. Those windows are left out, said so; the rest trains as it would without them."""
    train, _ = synthetic
    rows = train[:800] * np.float32(scale)
    spiked = rows.copy()
    spiked[300, 0] = reading
    lines: list[str] = []
    det = train_detector(spiked, CFG, FAST, log=lines.append)
    assert any(ln.startswith("left out ") and said in ln for ln in lines), lines
    assert all("loss inf" not in ln for ln in lines), lines
    assert all(np.isfinite(v.numpy()).all() for v in det.model.state_dict().values())
    clean = train_detector(rows, CFG, FAST, log=None)  # the same rows without the spike
    assert det.summary["best_val_loss"] <= 1.01 * clean.summary["best_val_loss"]  # it trained as well
    assert np.isfinite(det.score_windows(np.lib.stride_tricks.sliding_window_view(
        rows[:100], (16, 4))[:, 0]).score).all()


def test_validation_windows_beyond_float32_are_a_clear_error(synthetic):
    train, _ = synthetic
    spiked = train[:800].copy()
    spiked[-10, 2] = 1e30  # in the validation part
    with pytest.raises(ValueError, match=r"validation windows score beyond float32 .* 1e\+30"):
        train_detector(spiked, CFG, FAST, log=None)


def test_load_series_csv_and_npy(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("timestamp,temp,vib\n1,1.5,0.1\n2,,0.2\n3,2.5,0.3\n")
    X, names = load_series(csv)
    assert names == ["temp", "vib"] and X.shape == (3, 2) and np.isnan(X[1, 0])
    np.save(tmp_path / "d.npy", np.ones((5, 3), dtype=np.float32))
    X, names = load_series(tmp_path / "d.npy")
    assert X.shape == (5, 3) and names == ["f0", "f1", "f2"]
    for shape in ((), (2, 3, 4)):  # a scalar ended in an IndexError traceback (exit 1), not an error naming the file
        np.save(tmp_path / "odd.npy", np.ones(shape, dtype=np.float32))
        with pytest.raises(ValueError, match=r"odd\.npy: an array of shape .*training data is \(rows, features\)"):
            load_series(tmp_path / "odd.npy")
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        load_series(tmp_path / "bad.csv")


@pytest.mark.parametrize("text,problem", [
    ("timestamp,temp,temp\n1,1,2\n", "d.csv:1: feature 'temp' is named twice"),  # a model the daemon refuses
    ("timestamp,temp,vib,\n1,1,2,\n", "d.csv:1: column 4 has no name"),
    ("0,0.1,0.2\n1,0.3,0.4\n", "d.csv:1: the first row is numbers"),  # no header: a row taken for names
    ("ts\n1\n", "d.csv:1: no feature columns, only a time column"),
    (",temp\n0,1\n", "d.csv:1: column 1 has no name .*unnamed index column"),
    ("temp,vib\n1,2,3\n", "d.csv:2: 3 cells, the header has 2"),  # a cell silently dropped
    ("temp,vib\n1,2\n\n3,1e39\n", "d.csv:4: a value that is infinite or beyond float32"),
    ("temp,vib\n1,inf\n", "d.csv:2: a value that is infinite"),
    # newest first: trained on time run backwards, calibrated on the oldest rows
    ("ts,temp\n3,1\n2,1\n1,1\n", "d.csv:3: ts 2 is earlier than the row before \\(line 2, 3\\)"),
    ("time,temp\n2026-01-02T00:00:00,1\n2026-01-01T23:59:59,1\n2026-01-01T23:59:58,1\n",
     "d.csv:3: time 2026-01-01T23:59:59 is earlier"),
])
def test_training_csv_problems_name_the_file_and_line(tmp_path, text, problem):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_series(tmp_path / "d.csv")


def test_rows_in_time_order_or_with_times_that_are_not_read_load(tmp_path):
    for times in (["1", "1", "2"], ["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:01Z"],
                  ["b", "a", "c"]):  # equal times; ISO 8601 with a zone; not times: not checked
        (tmp_path / "d.csv").write_text("timestamp,temp\n" + "".join(f"{t},1\n" for t in times))
        assert load_series(tmp_path / "d.csv")[0].shape == (3, 1)


def test_local_times_across_a_dst_fall_back_load_with_a_warning(tmp_path, caplog):
    """Local times without a UTC offset repeat an hour when daylight saving time ends: rows in time order were
    refused, and the advice to sort the file would have interleaved the two hours."""
    (tmp_path / "d.csv").write_text("timestamp,a\n2024-11-03 01:30:00,0\n2024-11-03 01:45:00,1\n"
                                     "2024-11-03 01:00:00,2\n2024-11-03 01:15:00,3\n2024-11-03 02:00:00,4\n")
    with caplog.at_level(logging.WARNING, logger="anomalyd"):
        assert load_series(tmp_path / "d.csv")[0].shape == (5, 1)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'd.csv'}:4: timestamp 2024-11-03 01:00:00 is earlier than the row before (line 3, "
        "2024-11-03 01:45:00): taken as the hour repeated when daylight saving time ends; times with a UTC offset, "
        "or in UTC, leave no doubt"]


def test_local_times_across_fall_backs_a_year_apart_load(tmp_path):
    times = ["2023-11-05 01:50", "2023-11-05 01:00", "2023-11-05 02:00", "2024-11-03 01:50", "2024-11-03 01:00",
             "2024-11-03 02:00"]
    (tmp_path / "d.csv").write_text("timestamp,a\n" + "".join(f"{t},1\n" for t in times))
    assert load_series(tmp_path / "d.csv")[0].shape == (6, 1)


@pytest.mark.parametrize("times,line", [
    (["2024-11-03 03:00", "2024-11-03 02:00", "2024-11-03 01:00"], 3),  # newest first, hourly: a step at each row
    (["2024-11-03 01:00", "2024-11-03 01:45", "2024-11-03 01:30", "2024-11-03 01:20"], 4),  # two steps in a row
    (["2024-11-03 01:45", "2024-11-03 00:44", "2024-11-03 01:50"], 3),  # more than an hour back
    (["2024-11-03 01:10", "2024-11-03 01:00", "2024-11-03 01:20", "2024-11-03 01:05"], 5),  # two within a day
    (["2024-11-03 01:10", "2024-11-03 01:00", "2024-11-05 01:20", "2024-11-05 01:05"], 5),  # two days apart
])
def test_local_times_stepping_back_otherwise_are_refused_with_advice_on_offsets(tmp_path, caplog, times, line):
    (tmp_path / "d.csv").write_text("timestamp,a\n" + "".join(f"{t},1\n" for t in times))
    with caplog.at_level(logging.WARNING, logger="anomalyd"), pytest.raises(
            ValueError, match=rf"d\.csv:{line}: timestamp .* oldest first \(times in local time without a UTC "
                              "offset should carry their offset or be in UTC"):
        load_series(tmp_path / "d.csv")
    assert not caplog.records  # nothing taken for a fall-back before the refusal


@pytest.mark.parametrize("times", [["2024-11-03T01:45:00-05:00", "2024-11-03T01:00:00-05:00"], ["3600", "0"]])
def test_times_with_an_offset_or_numbers_never_step_back(tmp_path, times):
    (tmp_path / "d.csv").write_text("timestamp,a\n" + "".join(f"{t},1\n" for t in times))
    with pytest.raises(ValueError, match=r"d\.csv:3: .*oldest first$"):
        load_series(tmp_path / "d.csv")


def test_a_csv_with_a_bom_and_an_upper_case_npy_suffix_load(tmp_path):
    """A spreadsheet's BOM was part of the first name ('\ufefftimestamp': the time column trained as a feature)."""
    (tmp_path / "d.csv").write_bytes("timestamp,temp\n1,2\n".encode("utf-8-sig"))
    X, names = load_series(tmp_path / "d.csv")
    assert names == ["temp"] and X.tolist() == [[2.0]]
    np.save(tmp_path / "d.npy", np.ones((4, 2), dtype=np.float32))
    (tmp_path / "d.npy").rename(tmp_path / "D.NPY")
    assert load_series(tmp_path / "D.NPY")[0].shape == (4, 2)
    for header, names in (("timestamp,1,2", ["1", "2"]), ("0,1,2", ["0", "1", "2"])):  # numbered channels; pandas'
        (tmp_path / "n.csv").write_text(f"{header}\n5,6,7\n")  # default column names
        assert load_series(tmp_path / "n.csv")[1] == names
    np.save(tmp_path / "big.npy", np.array([[1.0], [1e39]]))  # float64, beyond float32
    with pytest.raises(ValueError, match="big.npy: row 1 holds a value that is infinite or beyond float32"):
        load_series(tmp_path / "big.npy")
    np.save(tmp_path / "s.npy", np.array([["1", "x"]]))
    with pytest.raises(ValueError, match="s.npy: not numbers"):
        load_series(tmp_path / "s.npy")


def test_a_feature_without_values_in_a_training_part_is_warned_about(synthetic):
    """Empty in the training rows, with values only in the validation tail: filled there, and said."""
    train, _ = synthetic
    x = train[:800].copy()
    x[:700, 2] = np.nan  # the training part is the first 640 rows
    lines: list[str] = []
    train_detector(x, CFG, FAST, log=lines.append, feature_names=["a", "b", "c", "d"])
    assert any(line.startswith("warning: no values in the training part of a series for c: filled with the "
                               "scaler's centre") for line in lines), lines
    lines.clear()
    train_detector(train[:800], CFG, FAST, log=lines.append)
    assert not any("no values" in line for line in lines)


def test_a_feature_one_series_lacks_is_filled_as_the_daemon_fills_it():
    """Series A has no sensor 2 (series B reads it, near 300). Training filled A's with 0, the daemon fills a
    feature a stream never reported with the scaler's centre: A's validation windows scored far over B's, the
    pooled threshold rose about 2,000x over B's normal scores, and served A scored nothing like calibrated A."""
    from detector.windows import WindowBuffer

    torch.set_num_threads(1)
    rng, t = np.random.default_rng(0), np.arange(800)

    def stream(phase: float) -> np.ndarray:
        x = np.stack([np.sin(t / 7 + phase), np.cos(t / 11 + phase), 300 + 5 * np.sin(t / 5 + phase)], 1)
        return (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)

    a, b = stream(0.0)[:400], np.concatenate([stream(1.0)] * 3)
    a[:, 2] = np.nan
    cfg = ModelConfig(kind="gru", n_features=3, window=12, hidden_size=16, latent_size=4)
    det = train_detector([a, b], cfg, TrainConfig(epochs=8, device="cpu", threshold="quantile",
                                                  threshold_params={"q": 0.99}), log=None)
    assert abs(det.scaler.center[2] - 300) < 10  # B's values only
    buffer = WindowBuffer(12, 3, native=False)
    buffer.set_fill(det.scaler.center)  # as the daemon's route does
    served = det.score_windows(buffer.add(np.zeros(len(a), np.int64), np.arange(len(a), dtype=np.int64), a).windows)
    b_val = det.score_windows(sliding_windows(b[-480:], 12)).score
    assert det.threshold.threshold < 50 * np.median(b_val)  # 2,000x with the 0 fill
    assert np.mean(served.score > det.threshold.threshold) < 0.2  # A, served, is as normal as calibrated


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="need at least"):
        train_detector(np.zeros((20, 4), np.float32), CFG, FAST, log=None)


@pytest.mark.parametrize(("names", "last_k", "problem"), [
    (["a", "a", "b", "c"], None, "feature names must be distinct non-empty strings"),
    (["a", "", "b", "c"], None, "feature names must be distinct non-empty strings"),
    (["a", "b", "c"], None, "3 feature names for 4 features"),
    (None, 0, r"score_last_k must be None or an integer in 1\.\.16"),
    (None, 17, r"score_last_k must be None or an integer in 1\.\.16"),
])
def test_what_a_checkpoint_could_not_load_is_refused_before_training(names, last_k, problem):
    """Each trained, and was saved as a version the daemon's loader refuses (17 of a window of 16: the whole
    window was scored, silently)."""
    cfg = TrainConfig(**{**FAST.to_dict(), "score_last_k": last_k})
    lines: list[str] = []
    with pytest.raises(ValueError, match=problem):
        train_detector(np.zeros((20, 4), np.float32), CFG, cfg, feature_names=names, log=lines.append)
    assert lines == []  # refused before the data, let alone an epoch


@pytest.mark.parametrize("method", ["robust", "standard"])
def test_scaler(method):
    rng = np.random.default_rng(0)
    X = rng.normal(5, 2, size=(1000, 3)).astype(np.float32)
    X[:, 2] = 7.0  # constant sensor: no division by zero
    s = Scaler(method).fit(X)
    Z = s.transform(X)
    assert abs(np.median(Z[:, 0]) if method == "robust" else Z[:, 0].mean()) < 0.05
    assert np.isfinite(Z).all() and np.allclose(Z[:, 2], 0)
    np.testing.assert_allclose(Scaler.from_dict(s.to_dict()).transform(X), Z)
    np.testing.assert_allclose(s.inverse_transform(Z), X, rtol=1e-5, atol=1e-4)


def test_a_scaler_beyond_float32_is_refused_naming_the_feature(synthetic):
    """Quartiles 4e38 apart (each value within float32): the robust scale was inf, every value of the feature
    scaled to 0, training ran on, and the save at the end failed with a JSON error naming nothing."""
    X = np.zeros((400, 4), np.float32)
    X[:, 1] = np.resize(np.array([-2e38, 2e38], np.float32), 400)
    with pytest.raises(ValueError, match=r"feature 1: its values' spread \(or size\) is too large for float32 "
                                         r"\(center 0, scale inf\)"):
        Scaler("robust").fit(X)
    lines: list[str] = []
    with pytest.raises(ValueError, match=r"feature 1 \('b'\): its values' spread"):
        train_detector(X, CFG, FAST, feature_names=["a", "b", "c", "d"], log=lines.append)
    assert lines == []  # before any epoch
    with pytest.raises(ValueError, match=r"feature 2: .* too large for float32 \(center inf"):  # float64 values
        Scaler("standard").fit(np.array([[0.0, 1, 1e39], [1, 2, 1e39]]))
    assert np.isfinite(Scaler("standard").fit(X).scale).all()  # its standard deviation, 2e38, fits


def test_engine_scores_several_models_in_one_call(trained, synthetic):
    _, test = synthetic
    engine = InferenceEngine(device="auto")
    engine.swap(trained)
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(test.values[:100], 32, axis=0).transpose(0, 2, 1))
    out = engine.score({"gru": windows, "lstm": windows[:10]})
    assert out["gru"].normalised.shape == (69,) and out["lstm"].over.shape == (10,)
    direct = trained["gru"].score_windows(windows).score
    np.testing.assert_allclose(out["gru"].raw.score, direct, rtol=1e-5)
    np.testing.assert_allclose(out["gru"].normalised, direct / trained["gru"].threshold.threshold, rtol=1e-5)
    with pytest.raises(KeyError, match="not loaded"):
        engine.score({"nope": windows})


def test_engine_warm_up_runs_each_model_once_per_batch_size_and_changes_nothing(trained, synthetic):
    _, test = synthetic
    engine = InferenceEngine(device="cpu", fused=False, max_batch=100)
    engine.swap(trained)
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(test.values[:100], 32, axis=0).transpose(0, 2, 1))
    before = engine.score({"gru": windows})["gru"]
    thresholds = {name: det.threshold.to_dict() for name, det in trained.items()}
    calls = []
    hooks = [det.model.register_forward_hook(lambda m, i, o, n=name: calls.append((n, i[0].shape[0])))
             for name, det in trained.items()]
    try:
        engine.warm_up((1, 64, 4096))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(calls) == sorted((n, b) for n in trained for b in (1, 64, 100))  # 4096 capped at max_batch
    after = engine.score({"gru": windows})["gru"]
    np.testing.assert_array_equal(after.raw.score, before.raw.score)
    assert {name: det.threshold.to_dict() for name, det in trained.items()} == thresholds


@pytest.mark.parametrize("fused", [False, None], ids=["eager", "fused-if-built"])
def test_engine_scores_a_float32_overflow_as_the_ceiling_not_nan(trained, synthetic, fused):
    """A reading near the float32 limit overflows the scaled input (eager PyTorch then gives NaN, the fused
    kernel +inf): the window is the most anomalous there is, with a finite normalised score, not an error."""
    _, test = synthetic
    engine = InferenceEngine(device="cpu", fused=fused)
    engine.swap(trained)
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(test.values[:40], 32, axis=0).transpose(0, 2, 1)).astype(np.float32)
    windows[3, 20, :] = [3e38, -3e38, 3e38, 1.0]
    for name in trained:
        out = engine.score({name: windows})[name]
        assert np.isfinite(out.normalised).all()
        assert out.normalised[3] == SCORE_CEILING and out.over[3]
        assert (out.normalised[:3] < SCORE_CEILING).all()


def test_engine_bad_device():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            InferenceEngine(device="cuda")
    if not torch.backends.mps.is_available():  # was a RuntimeError at the first tensor: `check` crashed, exit 1
        with pytest.raises(ValueError, match=r"MPS \(Apple silicon\) is not available"):
            InferenceEngine(device="mps")
    with pytest.raises(ValueError, match="precision"):
        InferenceEngine(device="cpu", precision="int4")


def test_several_series_are_split_and_windowed_each_on_its_own(synthetic):
    """One series per stream: each keeps its own validation tail (a fifth, at least W + 20 rows) and no window
    crosses from one series into the next. Together as one series they would give 90 validation rows and 345
    training windows."""
    train, _ = synthetic
    detector = train_detector([train[:300], train[300:450]], CFG,
                              TrainConfig(epochs=1, max_windows=None, seed=0, device="cpu"), log=None)
    s = detector.summary
    assert (s["n_series"], s["n_val_rows"], s["n_train_rows"]) == (2, 60 + 36, 240 + 114)
    assert s["n_train_windows"] == (240 - 16 + 1) + (114 - 16 + 1)
