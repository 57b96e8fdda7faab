import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from detector.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint


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
