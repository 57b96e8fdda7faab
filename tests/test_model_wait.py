"""models.wait_for_models_s: `anomalyd run` waits, not ready, for its models' first versions instead of exiting 2
(a Deployment installed before its models were trained into the volume restarted in a crash loop)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from pipelines.config import Config, ConfigError
from pipelines.model_store import ModelStore
from pipelines.model_wait import wait_for_model_files


def _config(tmp_path, wait_s: float, port: int = 0) -> Config:
    (tmp_path / "models").mkdir(exist_ok=True)
    return Config.from_dict({"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}],
                                        "wait_for_models_s": wait_s},
                             "routes": [{"match": "*", "models": ["gru"]}],
                             "http": {"bind": "127.0.0.1", "port": port}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_without_a_wait_a_missing_model_is_the_config_error_at_once(tmp_path):
    with pytest.raises(ConfigError, match="model 'gru': no version directory with a model.json"):
        wait_for_model_files(_config(tmp_path, 0), threading.Event())


def test_waiting_it_is_alive_and_not_ready_and_starts_once_a_version_is_complete(trained, tmp_path):
    port = _free_port()
    cfg = _config(tmp_path, 60, port)
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(wait_for_model_files(cfg, threading.Event(), 0.05)))
    waiter.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _get(base + "/healthz")
            break
        except OSError:
            time.sleep(0.05)
    assert _get(base + "/healthz")[0] == 200 and _get(base + "/readyz")[0] == 503
    metrics = _get(base + "/metrics")[1]
    assert "anomalyd_up 1.0" in metrics and "anomalyd_ready 0.0" in metrics
    # a version copied in by hand: model.json first, the weights later; not complete until both are there
    done = ModelStore(tmp_path / "staging").save("gru", trained["gru"], version="v1")
    partial = tmp_path / "models" / "gru" / "v1"
    partial.mkdir(parents=True)
    shutil.copy(done / "model.json", partial / "model.json")
    time.sleep(0.3)
    assert waiter.is_alive() and not result
    shutil.copy(done / "model.safetensors", partial / "model.safetensors")
    waiter.join(30)
    assert result == [True]
    with pytest.raises(OSError):  # the port is free again for the daemon's own server
        _get(base + "/healthz")


def test_a_stop_ends_the_wait_and_an_elapsed_wait_is_the_config_error(tmp_path):
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert wait_for_model_files(_config(tmp_path, 60), stop, 0.05) is False
    started = time.monotonic()
    with pytest.raises(ConfigError, match="model 'gru'"):
        wait_for_model_files(_config(tmp_path, 0.3), threading.Event(), 0.05)
    assert time.monotonic() - started >= 0.3
