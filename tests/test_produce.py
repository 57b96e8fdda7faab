"""``produce_live`` (``anomalyd produce``, the demo's producer) with a stand-in producer: no broker."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines.kafka_io import KafkaDeliveryError
from pipelines.produce import SyntheticFleet, produce_live, sent_anomalies


class RecordingProducer:
    """Records what was produced, flushed and closed, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.events: list[str] = []

    def produce(self, topic, value, key=None, headers=None) -> None:
        self.sent.append((topic, value, key))

    def flush(self, timeout_s: float) -> None:
        self.events.append(f"flush {len(self.sent)}")

    def close(self, timeout_s: float = 5.0) -> None:
        self.events.append("close")


def test_a_stop_ends_the_paced_schedule_at_once_and_flushes_what_was_sent():
    fleet = SyntheticFleet(8, 4, "pump", 7)
    data, truth = fleet.live(2000, 1000, [])  # 8000 messages at 400/s: 20 s of pacing
    producer, stop, result = RecordingProducer(), threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(n=produce_live(
        producer, "t", fleet, data, 2000, 0, 20, 400.0, truth, None, stop=stop)), daemon=True)
    thread.start()
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=3)
    assert not thread.is_alive(), "the producer went on pacing its schedule after the stop"
    n = result["n"]
    assert 0 < n < 8000 and len(producer.sent) == n
    assert producer.events == [f"flush {n}"]  # what was sent is flushed, once, after the last send


def test_without_a_stop_the_whole_schedule_is_sent_then_flushed():
    fleet = SyntheticFleet(3, 2, "fan", 1)
    data, truth = fleet.live(100, 50, [])
    producer = RecordingProducer()
    assert produce_live(producer, "t", fleet, data, 100, 0, 1000, None, truth, None) == 150
    assert len(producer.sent) == 150 and producer.events == ["flush 150"]
    stop = threading.Event()
    stop.set()  # set before the first message: nothing is sent, the (empty) flush still happens
    assert produce_live(producer, "t", fleet, data, 100, 0, 1000, 1000.0, truth, None, stop=stop) == 0


def test_sent_anomalies_are_those_whose_first_message_went():
    fleet = SyntheticFleet(4, 2, "pump", 0)
    plan = fleet.plan(10, 100, n_anomalies=3, length=5)  # starts at steps 35, 60, 85 on pump-0, pump-1, pump-2
    _, truth = fleet.live(10, 100, plan)
    first = [(row["start_step"] - 10) * 4 + fleet.names.index(row["stream"]) for row in truth]
    assert sent_anomalies(truth, fleet, 10, 400) == truth
    assert sent_anomalies(truth, fleet, 10, first[1] + 1) == truth[:2]
    assert sent_anomalies(truth, fleet, 10, first[1]) == truth[:1]
    assert sent_anomalies(truth, fleet, 10, 0) == []


class RefusingProducer(RecordingProducer):
    def flush(self, timeout_s: float) -> None:
        raise KafkaDeliveryError("150 of 150 Kafka messages not delivered: t: KafkaTimeoutError")


def test_the_truth_file_is_written_only_once_the_messages_were_delivered(tmp_path):
    fleet = SyntheticFleet(3, 2, "fan", 1)
    plan = fleet.plan(100, 50, n_anomalies=2, length=5)
    data, truth = fleet.live(100, 50, plan)
    with pytest.raises(KafkaDeliveryError):
        produce_live(RefusingProducer(), "t", fleet, data, 100, 0, 1000, None, truth, tmp_path / "truth.json")
    assert list(tmp_path.iterdir()) == []  # no file describing anomalies never delivered

    class Checking(RecordingProducer):
        def produce(self, topic, value, key=None, headers=None) -> None:
            assert not (tmp_path / "truth.json").exists()  # not before the messages went
            super().produce(topic, value, key)

    assert produce_live(Checking(), "t", fleet, data, 100, 0, 1000, None, truth, tmp_path / "truth.json") == 150
    written = json.loads((tmp_path / "truth.json").read_text())
    assert written == {"topic": "t", "streams": fleet.names, "anomalies": truth} and len(truth) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["truth.json"]
    stop = threading.Event()
    stop.set()  # stopped before anything was sent: the file lists no anomaly
    produce_live(RecordingProducer(), "t", fleet, data, 100, 0, 1000, None, truth, tmp_path / "truth.json", stop=stop)
    assert json.loads((tmp_path / "truth.json").read_text())["anomalies"] == []


def test_ctrl_c_ends_anomalyd_produce_with_the_truth_of_what_was_sent(tmp_path, monkeypatch):
    """Ctrl-C raised out of the paced loop: no truth was written, and a truth file from an earlier run stayed there,
    describing another run. Now the run stops there, flushes, writes the anomalies it sent, and exits 130."""
    import os
    import signal

    from pipelines import kafka_io
    from pipelines.cli import main

    class InterruptedProducer(RecordingProducer):
        def produce(self, topic, value, key=None, headers=None) -> None:
            super().produce(topic, value, key, headers)
            if len(self.sent) == 3000:
                os.kill(os.getpid(), signal.SIGINT)  # the operator's Ctrl-C

    producer = InterruptedProducer()
    monkeypatch.setattr(kafka_io, "make_producer", lambda client, bootstrap: producer)
    truth = tmp_path / "truth.json"
    truth.write_text('{"anomalies": ["from an earlier run"]}')
    rc = main(["produce", "--streams", "4", "--steps", "2000", "--rate", "100000", "--anomalies", "50",
               "--start-step", "0", "--truth", str(truth)])
    assert rc == 130 and len(producer.sent) == 3000 and producer.events[0] == "flush 3000"
    written = json.loads(truth.read_text())["anomalies"]
    assert written and all(row["start_step"] * 4 < 3000 for row in written)  # only the anomalies sent


def test_a_second_ctrl_c_does_not_wait_for_the_flush_and_the_handler_is_given_back(tmp_path, monkeypatch):
    import os
    import signal

    from pipelines import kafka_io
    from pipelines.cli import main

    class InterruptedTwice(RecordingProducer):
        def produce(self, topic, value, key=None, headers=None) -> None:
            super().produce(topic, value, key, headers)
            if len(self.sent) == 100:
                os.kill(os.getpid(), signal.SIGINT)

        def flush(self, timeout_s: float) -> None:  # a flush that waits on brokers away: the operator insists
            os.kill(os.getpid(), signal.SIGINT)
            super().flush(timeout_s)

    monkeypatch.setattr(kafka_io, "make_producer", lambda client, bootstrap: InterruptedTwice())
    before = signal.getsignal(signal.SIGINT)
    assert main(["produce", "--streams", "4", "--steps", "2000", "--rate", "100000", "--start-step", "0",
                 "--truth", str(tmp_path / "truth.json")]) == 130
    assert signal.getsignal(signal.SIGINT) is before and not (tmp_path / "truth.json").exists()
