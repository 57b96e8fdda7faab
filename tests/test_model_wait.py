"""models.wait_for_models_s: `anomalyd run` waits, not ready, for its models' first versions instead of exiting 2
(a Deployment installed before its models were trained into the volume restarted in a crash loop)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.config import Config, ConfigError
from pipelines.model_store import ModelStore
from pipelines.model_wait import models_awaited


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


def _wait(cfg: Config, stop: threading.Event, poll_s: float = 0.05) -> Config | None:
    with models_awaited(cfg, stop, poll_s) as started:
        return started


class _CountedEvent(threading.Event):
    """A stop event that counts the waits on it: the waiter looks for its models after each."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def _half_copied(trained, tmp_path) -> tuple[Path, bytes]:
    """Version v1 of model gru copied in by hand, model.json first: its weights written half so far. Returns the
    version's directory and the whole weights."""
    done = ModelStore(tmp_path / "staging").save("gru", trained["gru"], version="v1")
    copy = tmp_path / "models" / "gru" / "v1"
    copy.mkdir(parents=True)
    shutil.copy(done / "model.json", copy / "model.json")
    weights = (done / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return copy, weights


def test_without_a_wait_the_config_is_handed_on_as_it_is(tmp_path):
    cfg = _config(tmp_path, 0)
    assert _wait(cfg, threading.Event()) is cfg  # the daemon then names what is missing (exit 2)


def test_waiting_it_is_alive_and_not_ready_until_a_version_loads_and_the_daemon_is_built(trained, tmp_path):
    port = _free_port()
    cfg = _config(tmp_path, 60, port)
    result: list = []
    built, stop = threading.Event(), _CountedEvent()

    def run() -> None:
        with models_awaited(cfg, stop, 0.05) as started:
            result.append(started)
            built.wait(30)  # the daemon's construction (its models' load): the port still answers

    waiter = threading.Thread(target=run)
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
    # a version copied in by hand: model.json first, then the weights, written a part at a time
    copy, weights = _half_copied(trained, tmp_path)
    # the waiter looks for its models after each wait on stop: by the third wait since now, two looks saw the copy
    polled = stop.waits
    deadline = time.monotonic() + 30
    while stop.waits < polled + 3 and not result and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not result  # not a version that loads yet
    assert stop.waits >= polled + 3, "the waiter did not look for its models twice since the half copy"
    (copy / "model.safetensors").write_bytes(weights)
    deadline = time.monotonic() + 30
    while not result and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result and result[0].http.port == port and result[0].models == cfg.models
    assert _get(base + "/healthz")[0] == 200  # still answering while the daemon is built
    built.set()
    waiter.join(30)
    with pytest.raises(OSError):  # then free for the daemon's own server
        _get(base + "/healthz")


def test_with_port_0_the_daemon_gets_the_port_the_wait_had(trained, tmp_path):
    cfg = _config(tmp_path, 60, 0)
    threading.Timer(0.3, lambda: ModelStore(tmp_path / "models").save("gru", trained["gru"])).start()
    started = _wait(cfg, threading.Event())
    assert started is not None and started.http.port > 0


def test_a_stop_ends_the_wait_and_an_elapsed_wait_is_the_config_error(tmp_path):
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert _wait(_config(tmp_path, 60), stop) is None
    started = time.monotonic()
    with pytest.raises(ConfigError, match="model 'gru'"):
        _wait(_config(tmp_path, 0.3), threading.Event())
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("half", ["model.safetensors", "model.json"])
def test_a_version_still_being_copied_at_start_is_waited_for_not_a_crash(trained, tmp_path, half):
    """Both files there at start, one half written (cp -r copies in listing order): the daemon failed to load it
    (exit 2, a crash loop)."""
    copy, weights = _half_copied(trained, tmp_path)
    whole = {"model.safetensors": weights, "model.json": (copy / "model.json").read_bytes()}
    (copy / "model.safetensors").write_bytes(weights)
    (copy / half).write_bytes(whole[half][: len(whole[half]) // 2])
    threading.Timer(0.5, lambda: (copy / half).write_bytes(whole[half])).start()
    started = time.monotonic()
    assert _wait(_config(tmp_path, 60), threading.Event()) is not None
    assert time.monotonic() - started >= 0.4  # it waited for the copy


def test_a_newest_version_that_does_not_load_gives_way_to_an_older_one_quietly(trained, tmp_path, caplog):
    """As the daemon falls back at start; the wait logged an error per poll for it."""
    store = ModelStore(tmp_path / "models")
    store.save("gru", trained["gru"], version="v1")
    bad = store.save("gru", trained["gru"], version="v2")
    (bad / "model.safetensors").write_bytes(b"broken")
    (tmp_path / "models" / "other").mkdir()  # a second served model, missing at first: the wait goes on
    cfg = Config.from_dict({"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}, {"name": "other"}],
                                       "wait_for_models_s": 60},
                            "routes": [{"match": "*", "models": ["gru", "other"]}],
                            "http": {"bind": "127.0.0.1", "port": 0}})
    threading.Timer(0.5, lambda: store.save("other", trained["gru"], version="v1")).start()
    with caplog.at_level("INFO", logger="anomalyd"):
        assert _wait(cfg, threading.Event()) is not None
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
