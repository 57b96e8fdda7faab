import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from detector.autoencoder import AutoencoderDetector
from detector.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from detector.thresholds import DSPOTThreshold, SPOTThreshold


@pytest.fixture
def saved(trained, tmp_path):
    det = trained["gru"]
    return det, save_checkpoint(det, tmp_path / "ckpt")


def test_round_trip_gives_identical_scores(trained, synthetic, tmp_path):
    _, test = synthetic
    for kind, det in trained.items():
        loaded = load_checkpoint(save_checkpoint(det, tmp_path / kind))
        assert loaded.model_cfg == det.model_cfg
        assert loaded.feature_names == det.feature_names
        assert loaded.threshold.threshold == det.threshold.threshold
        np.testing.assert_array_equal(loaded.score_series(test.values), det.score_series(test.values))
        assert set(json.loads((tmp_path / kind / META_FILE).read_text())) >= {
            "kind", "model_config", "scaler", "threshold", "feature_names", "train_summary",
            "format_version", "created_at"}


def test_pickle_disguised_as_weights_is_refused_without_executing(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / WEIGHTS_FILE).write_bytes(pickle.dumps({"encoder.weight_ih_l0": Evil()}))
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_checkpoint(path)
    assert not marker.exists()
    torch.save({"x": torch.zeros(1)}, path / WEIGHTS_FILE)  # a torch pickle zip is refused too
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)


def test_truncated_weights(saved):
    _, path = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_checkpoint(path)


def test_wrong_shapes_named(saved):
    _, path = saved
    meta = json.loads((path / META_FILE).read_text())
    meta["model_config"]["hidden_size"] = 48
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="wrong tensor shapes"):
        load_checkpoint(path)


def test_unknown_version_and_missing_files(saved, tmp_path):
    _, path = saved
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)
    (path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    (path / META_FILE).write_text(json.dumps(meta))
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        load_checkpoint(path)
    shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing checkpoint metadata"):
        load_checkpoint(tmp_path)


def test_bad_metadata_values(saved):
    _, path = saved
    meta = json.loads((path / META_FILE).read_text())
    bad = {**meta, "threshold": {"kind": "magic"}}
    (path / META_FILE).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="invalid metadata"):
        load_checkpoint(path)
    bad = {**meta, "feature_names": ["only-one"]}
    (path / META_FILE).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="feature names"):
        load_checkpoint(path)


def _rewrite(path, mutate):
    meta = json.loads((path / META_FILE).read_text())
    mutate(meta)
    (path / META_FILE).write_text(json.dumps(meta))


@pytest.fixture
def saved_dspot(trained, tmp_path):
    """A checkpoint whose threshold is a fitted DSPOT(depth=20), score_last_k=3 (window 32)."""
    det = trained["gru"]
    thr = DSPOTThreshold(depth=20).fit(np.random.default_rng(0).exponential(size=1000))
    det = AutoencoderDetector(det.model_cfg, model=det.model, scaler=det.scaler, threshold=thr,
                              feature_names=det.feature_names, score_last_k=3)
    return det, save_checkpoint(det, tmp_path / "dspot")


@pytest.mark.parametrize("bad", [[], "spot", None, 7])
def test_threshold_entry_that_is_not_a_dict_is_a_checkpoint_error(saved, bad):
    _, path = saved
    _rewrite(path, lambda m: m.__setitem__("threshold", bad))
    with pytest.raises(CheckpointError, match=r"invalid metadata: threshold must be a dict"):
        load_checkpoint(path)


@pytest.mark.parametrize("window", [[], [1.0] * 19, [1.0] * 21, [1.0] * 19 + [None]])
def test_dspot_window_must_hold_depth_finite_scores(saved_dspot, window):
    det, path = saved_dspot
    assert load_checkpoint(path).threshold.threshold == det.threshold.threshold
    _rewrite(path, lambda m: m["threshold"]["state"].__setitem__("window", window))
    with pytest.raises(CheckpointError, match=r"invalid metadata: .*'window' must"):
        load_checkpoint(path)


@pytest.mark.parametrize("field,value", [("z", float("nan")), ("t", None), ("peaks", "abc")])
def test_threshold_state_must_be_finite(saved_dspot, field, value):
    _, path = saved_dspot
    _rewrite(path, lambda m: m["threshold"]["state"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=rf"invalid metadata: .*'{field}' must be"):
        load_checkpoint(path)


def test_score_last_k_must_be_null_or_in_1_to_window(saved_dspot):
    _, path = saved_dspot
    for value in (None, 1, 32):
        _rewrite(path, lambda m, v=value: m.__setitem__("score_last_k", v))
        det = load_checkpoint(path)
        assert det.score_last_k == value
        assert np.isfinite(det.score_windows(np.zeros((2, 32, 4), np.float32)).score).all()
    for value in (0, -1, 33, "x", 2.0, True):
        _rewrite(path, lambda m, v=value: m.__setitem__("score_last_k", v))
        with pytest.raises(CheckpointError, match=r"score_last_k must be null or an integer in 1\.\.32"):
            load_checkpoint(path)


@pytest.mark.parametrize("field,value", [("window", True), ("n_features", True), ("latent_size", True)])
def test_model_config_bool_ints_are_a_checkpoint_error(saved, field, value):
    _, path = saved
    _rewrite(path, lambda m: m["model_config"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=rf"invalid metadata: ModelConfig\.{field} must be a positive integer"):
        load_checkpoint(path)


@pytest.mark.parametrize("key,bad", [("model_config", [1]), ("model_config", None), ("scaler", [1])])
def test_config_and_scaler_that_are_not_dicts_are_named(saved, key, bad):
    _, path = saved
    _rewrite(path, lambda m: m.__setitem__(key, bad))
    with pytest.raises(CheckpointError, match=r"invalid metadata: (ModelConfig|scaler) must be a dict"):
        load_checkpoint(path)


@pytest.mark.parametrize("field", ["window", "dropout"])
def test_a_model_config_field_left_out_is_named_not_defaulted(saved, field):
    """The window shows in no weight's shape: without the field the model served windows of 64 (the default)."""
    _, path = saved
    _rewrite(path, lambda m: m["model_config"].pop(field))
    with pytest.raises(CheckpointError, match=rf"invalid metadata: ModelConfig keys missing: \['{field}'\]"):
        load_checkpoint(path)
    _rewrite(path, lambda m: m.pop("score_last_k"))
    with pytest.raises(CheckpointError, match=r"missing key 'score_last_k'"):
        load_checkpoint(path)


@pytest.mark.parametrize(("mutate", "error"), [
    (lambda m: m["threshold"]["params"].__setitem__("max_peaks", float("inf")), "invalid metadata: cannot convert"),
    (lambda m: m["threshold"]["params"].__setitem__("refit_every", float("inf")), "invalid metadata: cannot convert"),
    (lambda m: m["threshold"]["state"].__setitem__("z", m["threshold"]["state"]["t"] - 100.0), "'z' must be above"),
    (lambda m: m.__setitem__("feature_names", ["a", "a", "b", "c"]), "feature names must be distinct"),
    (lambda m: m.__setitem__("feature_names", [1, None, "b", "c"]), "feature names must be distinct"),
])
def test_metadata_that_would_crash_or_mislead_the_daemon_is_a_checkpoint_error(saved, mutate, error):
    """Each used to load (every score over the threshold, features named twice), or to raise an error that is no
    CheckpointError, which the model store's fallback to an older version does not catch: the daemon crashed."""
    _, path = saved
    _rewrite(path, mutate)
    with pytest.raises(CheckpointError, match=error):
        load_checkpoint(path)


def test_a_size_in_the_metadata_is_checked_against_the_weights_before_anything_is_allocated(saved):
    _, path = saved
    _rewrite(path, lambda m: m["model_config"].__setitem__("hidden_size", 10**7))  # about 1.6e15 bytes
    with pytest.raises(CheckpointError, match=r"wrong tensor shapes"):
        load_checkpoint(path)


def test_weights_of_another_dtype_are_refused(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(str(path / WEIGHTS_FILE))
    save_file({k: v.to(torch.float64) for k, v in state.items()}, str(path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(path)
    _rewrite(path, lambda m: m.pop("weights_sha256"))  # as an earlier version wrote it
    with pytest.raises(CheckpointError, match=r"weights must be float32, found torch\.float64"):
        load_checkpoint(path)


def test_metadata_nested_beyond_the_parsers_depth_is_a_checkpoint_error(saved):
    _, path = saved
    (path / META_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match=r"not valid JSON \(RecursionError"):
        load_checkpoint(path)


def test_an_unfitted_threshold_is_refused_at_save_and_at_load(saved, tmp_path):
    """Such a checkpoint loaded, then every scoring call raised NotFittedError: the daemon's fallback to an older
    version, which follows a failed load, never happened."""
    det, path = saved
    unfitted = AutoencoderDetector(det.model_cfg, model=det.model, scaler=det.scaler, threshold=SPOTThreshold(),
                                   feature_names=det.feature_names)
    with pytest.raises(ValueError, match="spot threshold is not fitted"):
        save_checkpoint(unfitted, tmp_path / "unfitted")
    assert not (tmp_path / "unfitted" / META_FILE).exists()
    _rewrite(path, lambda m: m["threshold"].__setitem__("state", None))
    with pytest.raises(CheckpointError, match=r"invalid metadata: the spot threshold is not fitted"):
        load_checkpoint(path)


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"feature_names": ["a", "a", "b", "c"]}, "feature names must be distinct non-empty strings"),
    ({"feature_names": ["", "b", "c", "d"]}, "feature names must be distinct non-empty strings"),
    ({"feature_names": ["a", "b", "c", None]}, "feature names must be distinct non-empty strings"),
    ({"score_last_k": 0}, r"score_last_k must be None or an integer in 1\.\.32"),
    ({"score_last_k": 33}, r"score_last_k must be None or an integer in 1\.\.32"),
    ({"score_last_k": True}, r"score_last_k must be None or an integer in 1\.\.32"),
])
def test_a_detector_the_loader_would_refuse_cannot_be_made_so_is_never_saved(saved, kwargs, problem):
    det, _ = saved
    with pytest.raises(ValueError, match=problem):
        AutoencoderDetector(det.model_cfg, model=det.model, scaler=det.scaler, threshold=det.threshold,
                            **{"feature_names": det.feature_names, **kwargs})


def test_files_reach_the_disk_before_their_names_and_the_names_after(trained, tmp_path, monkeypatch):
    """A power loss must leave the old checkpoint or the new one, never a name over an empty file: each temp file
    is fsynced before its rename, and the directory (holding the renames) after them."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = save_checkpoint(trained["gru"], tmp_path / "ckpt")
    weights, meta = str(out / WEIGHTS_FILE), str(out / META_FILE)
    assert events == [("fsync", weights + ".tmp"), ("fsync", meta + ".tmp"), ("replace", weights),
                      ("replace", meta), ("fsync", str(out))]


def test_a_crash_between_the_renames_leaves_a_pair_that_does_not_load(saved, monkeypatch):
    """Saved over an earlier checkpoint, a crash after the weights' rename and before model.json's left the new
    weights beside the old scaler and threshold, and that pair loaded without a word."""
    import copy
    import hashlib
    import os

    det, path = saved
    model = copy.deepcopy(det.model)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    retrained = AutoencoderDetector(det.model_cfg, model=model, scaler=det.scaler, threshold=det.threshold,
                                    feature_names=det.feature_names)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(META_FILE):
            raise RuntimeError("power loss")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(RuntimeError, match="power loss"):
        save_checkpoint(retrained, path)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: not the weights .*{META_FILE} was saved with"):
        load_checkpoint(path)
    save_checkpoint(retrained, path)  # the save done again: the pair loads
    assert json.loads((path / META_FILE).read_text())["weights_sha256"] == hashlib.sha256(
        (path / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert torch.equal(next(load_checkpoint(path).model.parameters()), next(model.parameters()))
    _rewrite(path, lambda m: m.pop("weights_sha256"))  # a checkpoint of an earlier version, without the hash
    assert load_checkpoint(path).feature_names == det.feature_names
