"""``anomalyd demo``'s control flow with the broker, the training, the daemon and the Kafka clients stood in for
(the demo itself, against a real broker, is ``make demo``)."""

from __future__ import annotations

import threading
import time
from argparse import Namespace

import kafka
import pytest

from pipelines import demo


class FakeProducer:
    """kafka-python's producer as the demo sees it: a send after close is an error (recorded, not raised)."""

    def __init__(self) -> None:
        self.sent = 0
        self.events: list[str] = []
        self.closed = False
        self.after_close = 0

    def produce(self, topic, value, key=None, headers=None) -> None:
        if self.closed:
            self.after_close += 1
            raise RuntimeError("producer closed")  # ends a producer thread the demo left running
        self.sent += 1

    def flush(self, timeout_s: float) -> None:
        self.events.append("flush")

    def close(self, timeout_s: float = 5.0) -> None:
        self.events.append("close")
        self.closed = True


class FakeConsumer:
    def __init__(self, *topics, **config) -> None:
        pass

    def poll(self, timeout_ms: int = 0) -> dict:
        time.sleep(timeout_ms / 1000)
        return {}

    def close(self) -> None:
        pass


class ServingDaemon:
    """Ready at once; runs until asked to stop."""

    def __init__(self, cfg) -> None:
        self.events_seen = 0
        self._stop = threading.Event()

    def is_ready(self) -> bool:
        return True

    def run(self) -> int:
        self._stop.wait()
        return 0

    def request_stop(self, *_args) -> None:
        self._stop.set()


class LocalKafka:
    def __init__(self, port: int) -> None:
        pass

    def start(self) -> str:
        return "127.0.0.1:1"


@pytest.fixture
def offline_demo(monkeypatch, tmp_path):
    """run_demo's broker, training, config, producer and alert consumer stood in for; returns (args, producer)."""
    producer = FakeProducer()
    monkeypatch.setattr(demo, "LocalKafka", LocalKafka)
    monkeypatch.setattr(demo, "create_topic", lambda *a, **k: None)
    monkeypatch.setattr(demo, "_train_models", lambda fleet, models_dir, say: ["demo-gru", "demo-lstm"])
    monkeypatch.setattr(demo, "demo_config", lambda path: None)
    monkeypatch.setattr(demo, "make_producer", lambda client, bootstrap: producer)
    monkeypatch.setattr(demo, "Daemon", ServingDaemon)
    monkeypatch.setattr(kafka, "KafkaConsumer", FakeConsumer)
    args = Namespace(workdir=tmp_path / "demo", port=1, http_port=0, streams=8, steps=20000, rate=400.0,
                     duration=0.5)
    return args, producer


def test_duration_stops_the_producer_before_it_is_closed(offline_demo, capsys):
    """--duration (or Ctrl-C) ends the watch: the producer stops pacing its schedule (160,000 messages at 400/s),
    flushes what it sent, and only then is closed; nothing is left running."""
    args, producer = offline_demo
    assert demo.run_demo(args) == 0
    assert producer.after_close == 0, "the producer thread went on sending after the producer was closed"
    assert producer.events == ["flush", "close"]
    assert 0 < producer.sent < 160000
    assert not [t for t in threading.enumerate() if t.name in ("producer", "daemon")]
    out = capsys.readouterr().out
    assert "injected anomalies were produced" in out  # those after the stop are not counted as missed


class DaemonThatDiesAtStart(ServingDaemon):
    """run() raises at once, as with its HTTP port taken or the broker refusing."""

    def is_ready(self) -> bool:
        return False

    def run(self) -> int:
        raise RuntimeError("http.port: address already in use")


def test_a_daemon_that_dies_at_start_stops_the_demo_before_anything_is_produced(offline_demo, monkeypatch, capsys):
    args, producer = offline_demo
    args.duration = 3.0
    monkeypatch.setattr(demo, "Daemon", DaemonThatDiesAtStart)
    monkeypatch.setattr(threading, "excepthook", lambda hook_args: None)  # the daemon's trace, printed by the thread
    assert demo.run_demo(args) == 1
    out = capsys.readouterr().out
    assert "the daemon stopped (exit code None; its error is above); nothing produced" in out, out
    assert "did not become ready" not in out
    assert producer.sent == 0 and producer.events == []  # no producer made


def test_the_watch_ends_when_the_daemon_has_stopped(monkeypatch):
    """Without the daemon nothing more is scored: the watch does not wait for the producer and 60 s more."""
    monkeypatch.setattr(kafka, "KafkaConsumer", FakeConsumer)
    producing = threading.Event()
    producer_thread = threading.Thread(target=producing.wait, daemon=True)  # still producing
    producer_thread.start()
    said: list[str] = []
    got: list = []
    watch = threading.Thread(target=lambda: got.append(demo._watch_alerts(
        "127.0.0.1:1", "alerts", producer_thread, threading.Event(), None, said.append, caught_up=lambda: False,
        daemon_alive=lambda: False, linger_s=0.3)), daemon=True)
    watch.start()
    watch.join(timeout=30)  # a hang guard: the producer "runs" until the end of this test
    producing.set()
    assert not watch.is_alive(), "the watch waited for the producer although the daemon had stopped"
    assert got == [[]] and said == ["  the daemon stopped (its error is above): no more alerts"]
