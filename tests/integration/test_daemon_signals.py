"""Signals to a real ``anomalyd run`` subprocess against the local broker: SIGHUP makes the daemon serve a new
model version (models.watch_interval_s is an hour, so only the signal can do it) and keep consuming; SIGTERM
then stops it with exit code 0 within the shutdown grace period."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pipelines.child_process import exit_with_parent
from pipelines.kafka_io import make_producer
from pipelines.kafka_local import create_topic
from pipelines.model_store import ModelStore
from pipelines.produce import produce_live

from .daemon_support import HISTORY, INTERVAL_MS, N_STREAMS, WINDOW, config_dict, fleet, write_config

torch.set_num_threads(1)  # this process loads and saves models; leave the CPUs to the daemon and the broker

GRACE_S = 20.0
STEPS = 40  # steps per produced batch, every stream once per step
T = TypeVar("T")


def _until(what: str, get: Callable[[], T | None], proc: subprocess.Popen[bytes], log: Path,
           timeout_s: float = 90.0) -> T:
    """Poll ``get`` until it returns something truthy; fail with the daemon's log if the deadline passes or the
    daemon exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"daemon exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()}")
        got = get()
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout_s} s:\n{log.read_text()}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:  # not listening yet
        return 0, ""


def _metrics(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{sample name: [(labels, value)]}`` from the daemon's /metrics; empty if it does not answer."""
    status, text = _get(f"{base}/metrics")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text if status == 200 else ""):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _served_version(base: str, model: str) -> str | None:
    found = [lab["version"] for lab, v in _metrics(base).get("anomalyd_model_info", []) if lab["model"] == model
             and v == 1]
    assert len(found) <= 1, found  # the old version's series is replaced, not kept beside the new one
    return found[0] if found else None


def _events(base: str, topic: str, outcome: str) -> float:
    return sum(v for lab, v in _metrics(base).get("anomalyd_events_total", [])
               if lab["topic"] == topic and lab["outcome"] == outcome)


def _scored_at_least(base: str, topic: str, n: float) -> bool:
    return _events(base, topic, "scored") >= n


def _produce(bootstrap: str, topic: str, first_step: int, t0_ms: int) -> int:
    """STEPS clean steps of every stream from ``first_step`` (event times keep increasing across calls)."""
    f = fleet()
    data, _ = f.live(first_step, STEPS, [])
    producer = make_producer("kafka-python", bootstrap)
    try:
        return produce_live(producer, topic, f, data, first_step, t0_ms, INTERVAL_MS, None, [], None)
    finally:
        producer.close()


def test_sighup_reloads_models_and_sigterm_then_exits_zero(kafka_bootstrap: str, topic_name: str,
                                                           daemon_models: tuple[Path, list[str]],
                                                           tmp_path: Path) -> None:
    shared_dir, names = daemon_models
    models_dir = tmp_path / "models"
    shutil.copytree(shared_dir, models_dir)  # new versions go into a private copy, not the session's store
    store = ModelStore(models_dir)
    old_version = store.resolve(names[0])
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = config_dict(kafka_bootstrap, topic_name, models_dir, names,
                      models__watch_interval_s=3600.0, processing__model_threads=1,
                      shutdown={"grace_period_s": GRACE_S})
    cfg_path = write_config(tmp_path / "c.yaml", cfg)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--log-level", "INFO", "run", "-c",
                                 str(cfg_path)], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                 preexec_fn=exit_with_parent(signal.SIGKILL))
    try:
        port = _until("HTTP server", lambda: re.search(r"HTTP server listening on http://127\.0\.0\.1:(\d+)",
                                                       log.read_text()), proc, log).group(1)
        base = f"http://127.0.0.1:{port}"
        _until("/readyz 200", lambda: _get(f"{base}/readyz")[0] == 200, proc, log)
        assert _served_version(base, names[0]) == old_version

        t0 = int(time.time() * 1000) - (HISTORY + 4 * STEPS) * INTERVAL_MS  # the fourth batch ends about now
        n = _produce(kafka_bootstrap, topic_name, HISTORY, t0)
        warm = N_STREAMS * (WINDOW - 1)
        _until("first batch scored", lambda: _events(base, topic_name, "scored") >= n - warm, proc, log)

        new_version = store.save(names[0], store.load(names[0]).detector).name
        assert new_version != old_version and store.resolve(names[0]) == new_version
        # Nothing but SIGHUP may pick it up. The loop looks for new versions (if watch_interval_s has passed) at the
        # end of each iteration, and reloads right there. The iteration that polled the second batch's last events
        # ended with such a look, after the save; the third batch, produced once the second is scored, is polled
        # in a later iteration: once it is scored, a reload that look made would be served already.
        for first_step in (HISTORY + STEPS, HISTORY + 2 * STEPS):
            scored = _events(base, topic_name, "scored")
            want = scored + _produce(kafka_bootstrap, topic_name, first_step, t0)
            _until(f"batch from step {first_step} scored", partial(_scored_at_least, base, topic_name, want), proc,
                   log)
        assert _served_version(base, names[0]) == old_version
        proc.send_signal(signal.SIGHUP)
        _until(f"model_info version {new_version}", lambda: _served_version(base, names[0]) == new_version,
               proc, log, 60)
        reloaded = _until("'models reloaded' log line", lambda: re.search(r"models reloaded: (.*)", log.read_text()),
                          proc, log, 10)
        assert f"'{names[0]}': '{new_version}'" in reloaded.group(1), reloaded.group(0)
        assert proc.poll() is None, log.read_text()  # SIGHUP did not stop it ...

        before = _events(base, topic_name, "scored")
        n2 = _produce(kafka_bootstrap, topic_name, HISTORY + 3 * STEPS, t0)  # ... it keeps consuming and scoring
        _until("fourth batch scored", lambda: _events(base, topic_name, "scored") >= before + n2, proc, log)
        assert _events(base, topic_name, "scored") == before + n2  # windows were full: every event scored once
        assert _served_version(base, names[0]) == new_version

        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(timeout=GRACE_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon still running {GRACE_S + 10} s after SIGTERM:\n{log.read_text()}")
        assert code == 0, log.read_text()
        assert time.monotonic() - started <= GRACE_S, time.monotonic() - started
        text = log.read_text()
        assert "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """True once process ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_during_start_up_exits_zero_without_joining_the_group(kafka_bootstrap: str, topic_name: str,
                                                                       daemon_models: tuple[Path, list[str]],
                                                                       tmp_path: Path) -> None:
    """SIGTERM while the daemon still imports torch and loads its models (a rollout that replaces a pod at once):
    exit 0 at once, and no consumer group join (which would rebalance the other members) on the way out. A SIGHUP
    before it does not end the process."""
    models_dir, names = daemon_models
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg_path = write_config(tmp_path / "c.yaml", config_dict(kafka_bootstrap, topic_name, models_dir, names))
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--log-level", "INFO", "run", "-c",
                                 str(cfg_path)], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                 preexec_fn=exit_with_parent(signal.SIGKILL))
    try:
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # the handler is installed before the heavy imports: seconds before Kafka
        assert _catches(proc.pid, signal.SIGTERM), log.read_text()
        assert _catches(proc.pid, signal.SIGHUP), log.read_text()  # its default ended the process (exit 129)
        proc.send_signal(signal.SIGHUP)  # a reload asked for while starting: the models are read then anyway
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
        text = log.read_text()
        assert "exiting before connecting to Kafka" in text and "partitions assigned" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
