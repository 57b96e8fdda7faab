"""``anomalyd check`` without Kafka (``--connect`` is tested against real brokers in tests/integration), and
``anomalyd --version``."""

from __future__ import annotations

import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import build_parser, main
from pipelines.model_store import ModelStore


def _config(tmp_path: Path, trained, **served) -> Path:
    store = ModelStore(tmp_path / "models")
    for kind in ("gru", "lstm"):
        store.save(f"m-{kind}", trained[kind], version="20261127T000000000Z")
    cfg = {"models": {"dir": str(store.root), "device": "cpu",
                      "served": [{"name": "m-gru", **served}, {"name": "m-lstm"}]},
           "routes": [{"match": "pump-*", "models": ["m-gru", "m-lstm"]}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_valid_config_lists_its_routes_and_model_versions(tmp_path, trained, capsys):
    path = _config(tmp_path, trained)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"config {path}: valid" in out
    assert "route pump-*: m-gru 20261127T000000000Z (gru, window 32, 4 features), m-lstm" in out
    assert "fast paths: models on cpu in float32; fused CPU kernels " in out


@pytest.mark.parametrize("switch", ["ANOMALYD_FUSED_RNN", "ANOMALYD_NATIVE_DECODE", "ANOMALYD_NATIVE_WINDOWS"])
def test_check_names_each_fast_path_and_its_switch(tmp_path, trained, capsys, monkeypatch, switch):
    from pipelines import native_decode

    monkeypatch.setattr(native_decode, "_STATE", {})  # the decoder's choice is made once per process
    monkeypatch.setenv(switch, "0")
    assert main(["check", "-c", str(_config(tmp_path, trained))]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "fast paths:" in ln)
    assert f"off ({switch}, or no build)" in line, line
    others = {"ANOMALYD_FUSED_RNN": "fused CPU kernels", "ANOMALYD_NATIVE_DECODE": "native JSON decoder",
              "ANOMALYD_NATIVE_WINDOWS": "native window kernel"}
    for name, label in others.items():  # this machine builds them all (make test's setup)
        if name != switch:
            assert f"{label} on" in line, line


def test_a_pinned_version_that_is_missing_is_a_config_error_naming_the_key(tmp_path, trained, capsys):
    path = _config(tmp_path, trained, version="20990101T000000000Z")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: models.served[0]: model 'm-gru' version '20990101T000000000Z'" in err, err


def test_a_newest_version_that_does_not_load_fails_the_check_though_run_would_start(tmp_path, trained, capsys):
    """`run` falls back to the newest older version that loads; `check`, meant for before a rollout, says so."""
    path = _config(tmp_path, trained)
    good = tmp_path / "models" / "m-lstm" / "20261127T000000000Z"
    broken = good.with_name("20991231T000000000Z")
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert (f"{path}: models.served[1]: model 'm-lstm': the newest version 20991231T000000000Z does not load (the "
            f"error is logged above); `run` would serve version 20261127T000000000Z: replace or remove {broken}") in err
    pinned = yaml.safe_load(path.read_text())
    pinned["models"]["served"][1]["version"] = "20261127T000000000Z"
    path.write_text(yaml.safe_dump(pinned))
    assert main(["check", "-c", str(path)]) == 0


def test_a_pinned_version_that_does_not_load_and_a_missing_device_name_their_keys(tmp_path, trained, capsys,
                                                                                   monkeypatch):
    path = _config(tmp_path, trained, version="20261127T000000000Z")
    weights = tmp_path / "models" / "m-gru" / "20261127T000000000Z" / "model.safetensors"
    weights.write_bytes(b"not weights")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: models.served[0]: model 'm-gru': {weights}: not a valid safetensors file" in err, err
    if not torch.cuda.is_available():
        monkeypatch.setenv("ANOMALYD_MODELS__DEVICE", "cuda")
        assert main(["check", "-c", str(path)]) == 2
        err = capsys.readouterr().err
        assert ("environment variable ANOMALYD_MODELS__DEVICE: models.device: device 'cuda' requested but CUDA is "
                "not available") in err, err


def test_an_override_from_the_environment_is_checked_too(tmp_path, trained, capsys, monkeypatch):
    monkeypatch.setenv("ANOMALYD_PROCESSING__MAX_DELAY_MS", "-5")
    assert main(["check", "-c", str(_config(tmp_path, trained))]) == 2
    assert "ANOMALYD_PROCESSING__MAX_DELAY_MS" in capsys.readouterr().err


def test_a_stride_longer_than_the_window_is_refused_naming_the_route(tmp_path, trained, capsys, monkeypatch):
    """Stride 33 with window 32: the event between two scored windows would be in none (never scored, committed)."""
    path = _config(tmp_path, trained)
    monkeypatch.setenv("ANOMALYD_PROCESSING__STRIDE", "33")
    assert main(["check", "-c", str(path)]) == 2
    assert ("environment variable ANOMALYD_PROCESSING__STRIDE: processing.stride: 33 is larger than the window (32) "
            "of route 'm-gru+m-lstm'") in capsys.readouterr().err
    monkeypatch.setenv("ANOMALYD_PROCESSING__STRIDE", "32")
    assert main(["check", "-c", str(path)]) == 0


def test_a_stride_longer_than_the_steps_a_model_scores_is_refused(tmp_path, trained, capsys, monkeypatch):
    """A model trained with --last-k 4 scores the last 4 steps of each window: at stride 8, half the events were in
    no scored steps at all."""
    import copy

    path = _config(tmp_path, trained)
    last4 = copy.deepcopy(trained["lstm"])
    last4.score_last_k = 4
    ModelStore(tmp_path / "models").save("m-lstm", last4, version="20261128T000000000Z")
    monkeypatch.setenv("ANOMALYD_PROCESSING__STRIDE", "8")
    assert main(["check", "-c", str(path)]) == 2
    assert ("environment variable ANOMALYD_PROCESSING__STRIDE: processing.stride: 8 is larger than the 4 last steps "
            "of each window that model m-lstm scores (trained with --last-k 4) in route 'm-gru+m-lstm'"
            ) in capsys.readouterr().err
    monkeypatch.setenv("ANOMALYD_PROCESSING__STRIDE", "4")
    assert main(["check", "-c", str(path)]) == 0


def test_a_config_that_routes_nothing_is_warned_about(tmp_path, trained, caplog):
    path = _config(tmp_path, trained)
    cfg = yaml.safe_load(path.read_text())
    cfg["routes"] = []
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", "-c", str(path)]) == 0
    assert "no routes and no default_models: every event is counted unrouted, nothing is scored" in caplog.text


def test_an_http_bind_address_run_could_not_listen_on_is_a_config_error(tmp_path, trained, capsys, monkeypatch):
    """``run`` stops on it (BindError), so ``check`` must say so too; the port itself may be the checked daemon's."""
    path = _config(tmp_path, trained)
    monkeypatch.setenv("ANOMALYD_HTTP__BIND", "999.1.1.1")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "environment variable ANOMALYD_HTTP__BIND: http.bind: cannot listen on '999.1.1.1'" in err, err
    monkeypatch.setenv("ANOMALYD_HTTP__BIND", "127.0.0.1")
    with socket.socket() as taken:  # the configured port in use (by the daemon being checked): still valid
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("ANOMALYD_HTTP__PORT", str(taken.getsockname()[1]))
        assert main(["check", "-c", str(path)]) == 0


def test_version_names_anomalyd_and_its_kafka_clients(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("anomalyd ") and "kafka-python 3." in out and "torch " in out, out


def test_json_log_format_writes_one_object_per_line(tmp_path, trained):
    """``--log-format json`` (or ANOMALYD_LOG_FORMAT=json): every line on stderr is a JSON object, the final
    config error included, for log collectors that would otherwise split or mislabel the lines."""
    import json
    import os
    import subprocess
    import sys

    path = _config(tmp_path, trained, version="20990101T000000000Z")
    env = {**os.environ, "ANOMALYD_LOG_FORMAT": "json"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    (error,) = [r for r in records if r["level"] == "ERROR"]
    assert error["logger"] == "anomalyd" and "models.served[0]" in error["message"], error
    assert error["time"].endswith("Z") and set(error) == {"time", "level", "logger", "message"}


EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "config.example.yaml"


def test_check_reports_what_run_would_reject_naming_the_variable(monkeypatch, capsys, tmp_path):
    """A reserved Alertmanager label, the confluent client without its package, a models.dir from the
    environment: exit 2 and one line naming the variable, where `check` used to pass or blame the file."""
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # as if confluent-kafka were not installed
    for name, value, text in (
            ("ANOMALYD_SINKS__ALERTMANAGER__LABELS", "{alertname: x}", "sinks.alertmanager.labels.alertname: reserved"),
            ("ANOMALYD_KAFKA__CLIENT", "confluent", "kafka.client: confluent needs the confluent-kafka package"),
            ("ANOMALYD_MODELS__DIR", str(tmp_path / "none"), f"models.dir: model directory {tmp_path / 'none'}")):
        monkeypatch.setenv(name, value)
        assert main(["check", "-c", str(EXAMPLE)]) == 2
        err = capsys.readouterr().err
        assert f"environment variable {name}: {text}" in err and "Traceback" not in err, err
        monkeypatch.delenv(name)


@pytest.mark.parametrize("name", ["alertname", "stream", "model", "severity", "team", "bad-label", "9x"])
def test_alertmanager_labels_that_check_accepts_are_accepted_by_the_sink(name):
    """`check` validates the config only: whatever it accepts, the Alertmanager sink built by `run` accepts."""
    from pipelines.config import Config, ConfigError
    from pipelines.sinks import AlertmanagerSink

    try:
        Config.from_dict({"sinks": {"alertmanager": {"labels": {name: "x"}}}})
    except ConfigError as exc:
        assert exc.errors[0].startswith(f"<string>: sinks.alertmanager.labels.{name}: "), exc.errors
        with pytest.raises(ValueError):
            AlertmanagerSink("http://am:9093", labels={name: "x"})
    else:
        AlertmanagerSink("http://am:9093", labels={name: "x"})


class _Daemon:
    """Stands in for pipelines.daemon.Daemon in `run`: serves HTTP as the real one does after connecting."""

    def __init__(self, cfg, stop_event=None) -> None:
        self.cfg = cfg

    def run(self, timeout=None) -> int:
        from prometheus_client import CollectorRegistry

        from pipelines.httpserver import HealthServer

        HealthServer(CollectorRegistry(), self.cfg.http.bind, self.cfg.http.port).start().stop()
        return 0


@pytest.fixture
def restore_signals():
    """`anomalyd run` installs its own SIGTERM/SIGINT handlers: give pytest its own back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_run_with_the_http_port_taken_is_one_config_error(monkeypatch, capsys, restore_signals):
    from pipelines import check_cmd, daemon

    monkeypatch.setattr(daemon, "Daemon", _Daemon)
    monkeypatch.setattr(check_cmd, "fast_paths", lambda d: "fast paths: -")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("ANOMALYD_HTTP__BIND", "127.0.0.1")
        monkeypatch.setenv("ANOMALYD_HTTP__PORT", str(port))
        assert main(["run", "-c", str(EXAMPLE)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == ["anomalyd: error: invalid configuration (1 error):",
                                            f"environment variable ANOMALYD_HTTP__PORT: http.port: cannot listen on "
                                            f"127.0.0.1:{port}: Address already in use"], err
    monkeypatch.setenv("ANOMALYD_HTTP__PORT", "0")
    monkeypatch.setenv("ANOMALYD_HTTP__BIND", "192.0.2.1")  # not an address of this host
    assert main(["run", "-c", str(EXAMPLE)]) == 2
    err = capsys.readouterr().err
    assert "environment variable ANOMALYD_HTTP__BIND: http.bind: cannot listen on 192.0.2.1:0" in err, err
    monkeypatch.setenv("ANOMALYD_HTTP__BIND", "127.0.0.1")
    assert main(["run", "-c", str(EXAMPLE)]) == 0  # the stand-in is fine otherwise


@pytest.mark.parametrize("error", [ValueError("a bug's ValueError"), FileNotFoundError(2, "gone", "/x")])
def test_an_error_out_of_the_running_daemon_is_a_crash_with_its_trace(error, monkeypatch, capsys, caplog,
                                                                       restore_signals):
    """Once the daemon runs, a ValueError or an OSError is no longer the config's to fix: exit 1 with the trace,
    not exit 2 with one line that reads as a configuration error."""
    from pipelines import check_cmd, daemon

    class Crashing(_Daemon):
        def run(self, timeout=None) -> int:
            raise error

    monkeypatch.setattr(daemon, "Daemon", Crashing)
    monkeypatch.setattr(check_cmd, "fast_paths", lambda d: "fast paths: -")
    monkeypatch.setenv("ANOMALYD_HTTP__PORT", "0")
    assert main(["run", "-c", str(EXAMPLE)]) == 1
    assert "anomalyd: error:" not in capsys.readouterr().err
    (record,) = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert record.getMessage() == f"anomalyd: stopped by an unexpected error: {type(error).__name__}: {error}"
    assert record.exc_info[1] is error


def test_run_waits_for_its_models_when_asked_and_a_sigterm_ends_the_wait(monkeypatch, capsys, caplog,
                                                                          restore_signals):
    import threading

    from pipelines import cli

    monkeypatch.setenv("ANOMALYD_HTTP__PORT", "0")
    assert main(["run", "-c", str(EXAMPLE)]) == 2  # models.dir does not exist: at once, without a wait
    assert "models.dir: model directory /var/lib/anomalyd/models does not exist" in capsys.readouterr().err
    monkeypatch.setenv("ANOMALYD_MODELS__WAIT_FOR_MODELS_S", "600")
    timer = threading.Timer(1.0, cli._RUN_STOP.set)  # as SIGTERM does
    timer.start()
    try:
        with caplog.at_level("INFO", logger="anomalyd"):
            assert main(["run", "-c", str(EXAMPLE)]) == 0
    finally:
        timer.join()
        cli._RUN_STOP.clear()
    assert "waiting for models (models.wait_for_models_s, 600 s left" in caplog.text
    assert "stop requested while waiting for models" in caplog.text


def test_log_level_must_be_a_level(capsys):
    assert build_parser().parse_args(["--log-level", "debug", "check", "-c", "x"]).log_level == "DEBUG"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--log-level", "bogus", "check", "-c", "x"])
    assert exit_.value.code == 2 and "invalid choice: 'BOGUS'" in capsys.readouterr().err


def test_an_unexpected_error_is_one_json_record_with_its_trace_and_exit_1():
    """A bug or an outage that no command turns into a clear error still ends in one JSON line under
    ``--log-format json`` (the trace in its ``exception`` field), not a bare Python traceback."""
    import json
    import os
    import subprocess
    import sys

    code = ("import sys, pipelines.cli as cli\n"
            "def boom(args):\n    raise RuntimeError('the broker went away')\n"
            "cli._cmd_replay = boom\n"
            "sys.exit(cli.main(['--log-format', 'json', 'replay', '-c', 'x.yaml', 'y.jsonl']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ANOMALYD_LOG_FORMAT": ""})
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    (error,) = [r for r in records if r["level"] == "CRITICAL"]
    assert error["message"] == "anomalyd: stopped by an unexpected error: RuntimeError: the broker went away"
    assert "Traceback" in error["exception"] and "boom" in error["exception"]


@pytest.mark.parametrize(("body", "line"), [
    (b"[]", "no Alertmanager status: /api/v2/status answered list JSON, not an object"),
    (b'"ok"', "no Alertmanager status: /api/v2/status answered str JSON, not an object"),
    (b'{"versionInfo": "0.27", "cluster": null}', "version ?, cluster ?"),
    (b'{"versionInfo": {"version": "0.27.0"}, "cluster": {"status": "ready"}}', "version 0.27.0, cluster ready"),
])
def test_an_alertmanager_status_that_is_not_an_object_is_a_problem_not_a_crash(body, line):
    """check --connect crashed with AttributeError on a status that was JSON but not an object (a proxy's)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipelines.check_cmd import _check_alertmanager
    from pipelines.config import Config

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = Config.from_dict({"sinks": {"alertmanager": {"enabled": True, "url": url}}})
        lines, problems = _check_alertmanager(cfg)
    finally:
        server.shutdown()
        server.server_close()
    if "no Alertmanager status" in line:
        assert (lines, problems) == ([], [f"sinks.alertmanager.url: {url}: {line}"])
    else:
        assert (lines, problems) == ([f"alertmanager {url}: {line}"], [])


def test_connect_with_a_topic_pattern_that_matches_no_topic_is_a_problem(tmp_path, trained, capsys, monkeypatch):
    """As a missing input topic (exit 1): `run` would join its group, be assigned nothing and consume nothing."""
    from pipelines import check_cmd

    path = _config(tmp_path, trained)
    cfg = yaml.safe_load(path.read_text())
    cfg["kafka"] = {"bootstrap_servers": "broker:9092", "topic_pattern": "sensors-.*", "dead_letter_topic": "dlq"}
    cfg["sinks"] = {"kafka": {"enabled": False}}
    path.write_text(yaml.safe_dump(cfg))
    topics = {"sensor-a": 3, "dlq": 1, "__consumer_offsets": 50}  # a typo: "sensors-" for "sensor-"
    monkeypatch.setattr(check_cmd, "topic_partitions", lambda *a, **k: topics)
    monkeypatch.setattr(check_cmd, "brokers_create_topics", lambda *a, **k: True)
    assert main(["check", "-c", str(path), "--connect"]) == 1
    out = capsys.readouterr().out
    assert "topic_pattern 'sensors-.*': 0 topics []" in out
    assert f"anomalyd: problem: {path}: kafka.topic_pattern: 'sensors-.*' matches no topic at broker:9092" in out, out
    topics["sensors-a"] = 2
    assert main(["check", "-c", str(path), "--connect"]) == 0
    assert "topic_pattern 'sensors-.*': 1 topics ['sensors-a']" in capsys.readouterr().out


def test_the_default_models_route_is_shown_as_such_not_as_a_match_everything_route(tmp_path, trained, capsys):
    path = _config(tmp_path, trained)
    cfg = yaml.safe_load(path.read_text())
    cfg["routes"] = [{"match": "*", "models": ["m-gru"]}]
    cfg["default_models"] = ["m-lstm"]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  route *: m-gru 20261127T000000000Z (gru, window 32, 4 features)\n" in out, out
    assert "  route (default_models): m-lstm 20261127T000000000Z (lstm, window 32, 4 features)\n" in out, out
