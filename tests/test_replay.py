"""``anomalyd replay``: message files through the daemon's own detector path, without Kafka."""

from __future__ import annotations

import json
import logging

import numpy as np
import yaml

from detector.synthetic import SensorModel
from pipelines.model_store import ModelStore
from pipelines.replay import replay_files


def _gru_config(trained, tmp_path):
    """c.yaml serving the trained GRU for streams pump-*, no Kafka sink."""
    store = ModelStore(tmp_path / "models")
    store.save("gru", trained["gru"])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [{"match": "pump-*", "models": ["gru"]}], "sinks": {"kafka": {"enabled": False}},
           "kafka": {"topics": ["x"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "c.yaml"


def test_replay_runs_the_detector_path_without_kafka(trained, tmp_path, capsys, caplog):
    _gru_config(trained, tmp_path)
    model = SensorModel(4, seed=1)
    X = model.normal(np.arange(400, dtype=np.float64))
    X[300:340, 2] += 8 * X[:, 2].std()  # a level shift
    lines = [json.dumps({"stream": "pump-1", "ts": 1_700_000_000_000 + i * 1000,
                         "values": dict(zip(trained["gru"].feature_names, row.tolist(), strict=True))})
             for i, row in enumerate(X)]
    lines.insert(10, "{broken")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "in.jsonl"]) == 0
    out, err = capsys.readouterr()
    alerts = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    firing = [a for a in alerts if a["status"] == "firing"]
    assert len(firing) == 1 and firing[0]["stream"] == "pump-1"
    assert 1_700_000_000_000 + 300_000 <= firing[0]["started_at"] <= 1_700_000_000_000 + 340_000
    assert firing[0]["top_features"][0]["feature"] == "s2"
    assert '"anomalyd-error-reason": "bad_json"' in err
    assert f'"input": "{tmp_path / "in.jsonl"}:11"' in err  # the file and line, not only the offset (10)
    # the same stream over two files, without ts: one stream, in order (each file was its own topic, and its
    # events "moved partition"; every message without ts took one and the same time)
    half = [json.dumps({"stream": "pump-2", "values": dict(zip(trained["gru"].feature_names, row.tolist(),
                                                                strict=True))}) for row in X[:80]]
    (tmp_path / "a.jsonl").write_text("\n".join(half[:40]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(half[40:]) + "\n")
    with caplog.at_level(logging.WARNING):
        assert replay_files(tmp_path / "c.yaml", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]) == 0
    err = capsys.readouterr().err
    assert "another partition" not in caplog.text
    assert "replayed 80 messages, 0 alerts; scored 49, warming 31, late 0, unrouted 0, dead_lettered 0" in err
    (tmp_path / "bad.jsonl").write_text("{broken\n\n[1, 2]\n")
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "a.jsonl", tmp_path / "bad.jsonl"]) == 0
    assert f'"input": "{tmp_path / "bad.jsonl"}:3"' in capsys.readouterr().err  # blank lines counted, files apart
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "bad.jsonl"]) == 1  # nothing taken
    (tmp_path / "empty.jsonl").write_text("\n")
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "empty.jsonl"]) == 1  # nothing at all: a wrong file?
    (tmp_path / "bom.jsonl").write_text("\n".join(half[:40]) + "\n", encoding="utf-8-sig")  # a Windows editor's
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "bom.jsonl"]) == 0
    assert "replayed 40 messages, 0 alerts; scored 9, warming 31, late 0, unrouted 0, dead_lettered 0" in \
        capsys.readouterr().err  # the first line was dead-lettered: "Unexpected UTF-8 BOM"


def test_a_reading_at_the_float32_limit_fires_an_alert_that_serialises(trained, tmp_path, capsys):
    """3e38 passes decoding (finite float32) but overflows the model: the window scores the ceiling and the
    alert is strict JSON (the Kafka sink's ``to_json`` refuses NaN and infinities; it once stalled every commit)."""
    from detector.engine import SCORE_CEILING
    from pipelines.alert_message import Alert

    store = ModelStore(tmp_path / "models")
    store.save("gru", trained["gru"])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["x"]}, "routes": [], "default_models": ["gru"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    X = SensorModel(4, seed=1).normal(np.arange(120, dtype=np.float64))
    X[70, 1] = 3e38
    names = trained["gru"].feature_names
    lines = [json.dumps({"stream": "pump-1", "ts": 1_700_000_000_000 + i * 1000,
                         "values": dict(zip(names, row.tolist(), strict=True))}) for i, row in enumerate(X)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "in.jsonl"]) == 0
    alerts = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    firing = [a for a in alerts if a["status"] == "firing"]
    assert len(firing) == 1 and firing[0]["peak_score"] == SCORE_CEILING
    assert firing[0]["started_at"] <= 1_700_000_070_000
    for a in alerts:
        a.pop("event")
        json.loads(Alert.from_dict(a).to_json())  # strict: raises on NaN or inf


def test_replay_two_model_route_names_the_models_over_threshold(trained, tmp_path, capsys):
    """A route of two models (combine max): the firing alert lists the models whose score was over threshold in
    its incident (the route hands the alert tracker these lists for the windows over threshold only)."""
    store = ModelStore(tmp_path / "models")
    for kind in ("gru", "lstm"):
        store.save(kind, trained[kind])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}, {"name": "lstm"}],
                      "device": "cpu"},
           "routes": [{"match": "pump-*", "models": ["gru", "lstm"], "combine": "max"}],
           "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["x"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    X = SensorModel(4, seed=1).normal(np.arange(400, dtype=np.float64))
    X[300:340, 2] += 8 * X[:, 2].std()  # a level shift
    lines = [json.dumps({"stream": "pump-1", "ts": 1_700_000_000_000 + i * 1000,
                         "values": dict(zip(trained["gru"].feature_names, row.tolist(), strict=True))})
             for i, row in enumerate(X)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert replay_files(tmp_path / "c.yaml", [tmp_path / "in.jsonl"]) == 0
    alerts = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    firing = [a for a in alerts if a["status"] == "firing"]
    assert len(firing) == 1 and firing[0]["model"] == "gru+lstm"
    assert firing[0]["models_over"] and set(firing[0]["models_over"]) <= {"gru", "lstm"}


def test_an_input_that_cannot_be_read_stops_the_replay_before_anything_is_replayed(trained, tmp_path, capsys):
    """A missing file (or a directory) among the inputs: exit 2 naming it, and no alert or dead letter of the
    files before it on stdout or stderr (a script reading them would take a failed run's output)."""
    from pipelines.cli import main

    config = _gru_config(trained, tmp_path)
    (tmp_path / "a.jsonl").write_text('{broken\n{"stream": "fan-1", "ts": 1, "values": {"s0": 1}}\n')
    for bad, why in ((tmp_path / "nosuch.jsonl", "No such file or directory"), (tmp_path, "Is a directory")):
        assert main(["replay", "-c", str(config), str(tmp_path / "a.jsonl"), str(bad)]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err == f"anomalyd: error: [Errno {21 if bad == tmp_path else 2}] {why}: '{bad}'\n", err


def test_replay_reads_its_inputs_a_chunk_at_a_time(trained, tmp_path, capsys):
    """Memory for the messages of one chunk, not for the whole file (it was about 4x the file's size)."""
    import tracemalloc

    config = _gru_config(trained, tmp_path)
    line = json.dumps({"stream": "fan-1", "ts": 1_700_000_000_000, "values": {"s0": 1.5, "s1": 2.5}}).encode()
    for name, n in (("small.jsonl", 4000), ("big.jsonl", 100_000)):
        with open(tmp_path / name, "wb") as f:
            for i in range(n):
                f.write(line + (b"\n\n" if i % 1000 == 0 else b"\n"))  # blank lines now and then: line numbers move
            f.write(b"{broken\n")
    peaks = {}
    for name in ("small.jsonl", "small.jsonl", "big.jsonl"):  # the first run imports what a replay needs
        tracemalloc.start()
        try:
            assert replay_files(config, [tmp_path / name], chunk=2000) == 1  # every message unrouted
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    err = capsys.readouterr().err
    assert "replayed 100001 messages, 0 alerts; scored 0, warming 0, late 0, unrouted 100000, dead_lettered 1" in err
    assert f'"input": "{tmp_path / "big.jsonl"}:100101"' in err  # 100,000 lines, 100 blank ones, then {broken
    size = (tmp_path / "big.jsonl").stat().st_size  # 7.5 MB
    grown = peaks["big.jsonl"] - peaks["small.jsonl"]
    assert grown < size / 4, f"peak {grown / 1e6:.1f} MB more for a {size / 1e6:.1f} MB file"


def test_a_named_pipe_is_replayed_not_waited_on(trained, tmp_path, capsys):
    """Every input was opened once to check it: a named pipe's writer then wrote to a reader already gone, and the
    real read waited for ever for another writer. Inputs are checked without opening them now."""
    import os
    import threading

    cfg = _gru_config(trained, tmp_path)
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    names = trained["gru"].feature_names
    lines = b"".join(json.dumps({"stream": "pump-1", "ts": 1764180000000 + i, "values": dict.fromkeys(names, 0.1)})
                     .encode() + b"\n" for i in range(5))
    writer = threading.Thread(target=lambda: fifo.write_bytes(lines), daemon=True)
    writer.start()
    got: list[int] = []
    replay = threading.Thread(target=lambda: got.append(replay_files(cfg, [fifo])), daemon=True)
    replay.start()
    replay.join(timeout=60)  # a hang guard
    assert not replay.is_alive(), "replay waited on the pipe"
    assert "replayed 5 messages" in capsys.readouterr().err
