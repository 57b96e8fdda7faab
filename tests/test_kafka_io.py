"""kafka_io against kafka-python itself: its shutdown-race log record, and its bootstrap timeout made clear.

The race is reproduced with kafka-python's own transport and selector: ``close()`` on the caller's thread, then
the read the IO thread would run next. No broker is involved; the socket is one end of a local socket pair.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest
from kafka.net.selector import NetworkSelector
from kafka.net.transport import KafkaTCPTransport

import pipelines.kafka_io  # noqa: F401  (installs the filter under test)

LOGGER = "kafka.net.transport"


@pytest.fixture
def transport() -> Iterator[KafkaTCPTransport]:
    net = NetworkSelector()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        yield KafkaTCPTransport(net, ours)
    finally:
        ours.close()
        theirs.close()
        net.close()


def _read_records(caplog: pytest.LogCaptureFixture, transport: KafkaTCPTransport) -> list[logging.LogRecord]:
    caplog.clear()
    _, err = transport._sock_recv()  # what kafka-python's IO thread runs once the selector says "readable"
    assert err is not None  # the read failed either way: only how it is logged differs
    return [r for r in caplog.records if r.name == LOGGER and "Error receiving" in r.getMessage()]


def test_a_read_on_a_transport_closed_by_close_is_not_logged_at_info(caplog: pytest.LogCaptureFixture,
                                                                      transport: KafkaTCPTransport) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    transport.close()
    assert _read_records(caplog, transport) == []


def test_the_demoted_record_keeps_its_traceback_at_debug(caplog: pytest.LogCaptureFixture,
                                                         transport: KafkaTCPTransport) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    transport.close()
    (record,) = _read_records(caplog, transport)
    assert record.levelno == logging.DEBUG and isinstance(record.exc_info[1], AttributeError)


def test_a_failed_read_on_an_open_transport_stays_an_error(caplog: pytest.LogCaptureFixture,
                                                           transport: KafkaTCPTransport) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    transport._sock.close()  # the socket fails under a transport nobody closed
    (record,) = _read_records(caplog, transport)
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_a_kafka_python_client_that_cannot_connect_raises_one_clear_error() -> None:
    """Nothing listens on the port: the bootstrap timeout names the address, the security settings (never the
    password) and what the attempts failed with, instead of kafka-python's bare "Unable to bootstrap"."""
    from pipelines.kafka_io import make_producer
    from pipelines.kafka_local import free_port
    from pipelines.kafka_security import KafkaBootstrapError

    address = f"127.0.0.1:{free_port()}"
    security = {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                "sasl_password": "pw-9f3k"}
    with pytest.raises(KafkaBootstrapError) as err:
        make_producer("kafka-python", address, security, bootstrap_timeout_ms=5000)
    text = str(err.value)
    assert address in text and "SASL_PLAINTEXT, PLAIN, user u" in text and "pw-9f3k" not in text
    assert "ECONNREFUSED" in text or "refused" in text.lower(), text


def test_waiting_for_a_broker_ends_on_a_connection_a_stop_or_the_deadline() -> None:
    """Before kafka-python's bootstrap (which no signal interrupts): a SIGTERM (the stop flag) ends the wait."""
    import threading

    from pipelines.kafka_local import free_port
    from pipelines.kafka_security import KafkaBootstrapError, host_port, wait_for_a_broker

    closed = f"127.0.0.1:{free_port()}"
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert wait_for_a_broker(closed, stop, timeout_s=120) is False  # stopped, not the deadline (an error)
    with pytest.raises(KafkaBootstrapError, match=f"cannot connect to Kafka at {closed}: no broker accepted"):
        wait_for_a_broker(closed, threading.Event(), timeout_s=0.2)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert wait_for_a_broker(f"{closed}, 127.0.0.1:{port}", threading.Event(), timeout_s=120) is True
    assert host_port("SASL_SSL://[::1]:9093") == ("::1", 9093) and host_port("kafka") == ("kafka", 9092)
    assert host_port("::1") == ("::1", 9092) and host_port(" 2001:db8::1") == ("2001:db8::1", 9092)  # bare IPv6
    with pytest.raises(ValueError, match="kafka.bootstrap_servers: cannot read 'h:x' as host:port"):
        host_port("h:x")


def test_messages_not_acknowledged_in_time_are_pending_and_kept_for_the_next_flush() -> None:
    """Nothing listens: three messages still queued after the flush are "3 of 3" pending (not one error line
    counted as one message), not failed; the next flush waits for them again with the one produced since."""
    from pipelines.kafka_io import KafkaDeliveryPending, make_producer
    from pipelines.kafka_local import free_port

    producer = make_producer("confluent", f"127.0.0.1:{free_port()}")
    try:
        for i in range(3):
            producer.produce("t", b"%d" % i)
        with pytest.raises(KafkaDeliveryPending, match=r"^3 of 3 Kafka messages not acknowledged within 0.5s"):
            producer.flush(0.5)
        producer.produce("t", b"3")
        with pytest.raises(KafkaDeliveryPending, match=r"^4 of 4 Kafka messages not acknowledged"):
            producer.flush(0.5)
    finally:
        producer.close(0.1)


def test_a_daemon_stopped_while_kafka_python_waits_for_the_brokers_exits_0(trained, tmp_path) -> None:
    """SIGTERM (here the stop event it sets) while no broker answers: kafka-python's bootstrap held the daemon
    for 30 s, then it exited 1 with a connection error; now it stops at once, 0 (nothing was consumed)."""
    import threading

    import yaml

    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.kafka_local import free_port
    from pipelines.model_store import ModelStore

    ModelStore(tmp_path / "models").save("gru", trained["gru"])
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [], "default_models": ["gru"], "http": {"port": 0},
           "kafka": {"topics": ["t"], "client": "kafka-python", "bootstrap_servers": f"127.0.0.1:{free_port()}"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    stop = threading.Event()
    daemon = Daemon(load_config(tmp_path / "c.yaml"), stop_event=stop)
    threading.Timer(0.3, stop.set).start()
    assert daemon.run() == 0


def test_librdkafka_logs_through_python_logging_once_per_window(caplog: pytest.LogCaptureFixture, capfd) -> None:
    """confluent-kafka's clients wrote librdkafka's lines to stderr themselves (not JSON under --log-format json),
    a refused connection about 20 times a second; now they go to the "librdkafka" logger, repeats held back."""
    import time

    from confluent_kafka import Consumer

    from pipelines.kafka_io import LIBRDKAFKA_LOG, _RepeatFilter
    from pipelines.kafka_local import free_port

    (repeats,) = [f for f in LIBRDKAFKA_LOG.filters if isinstance(f, _RepeatFilter)]
    address = f"127.0.0.1:{free_port()}"
    consumer = Consumer({"bootstrap.servers": address, "group.id": "g", "logger": LIBRDKAFKA_LOG,
                         "reconnect.backoff.ms": 10, "reconnect.backoff.max.ms": 10})
    consumer.subscribe(["t"])
    with caplog.at_level(logging.INFO, logger="librdkafka"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(address in r.getMessage() for r in caplog.records):
            consumer.poll(0.1)
        for _ in range(20):  # a second more of reconnects, every 10 ms
            consumer.poll(0.05)
    consumer.close()
    refused = [r for r in caplog.records if r.name == "librdkafka" and address in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR  # the first; its repeats held back
    held_back = sum(left_out for key, (_, left_out) in repeats._seen.items() if address in key)
    assert held_back > 0, "no repeat came to the filter: one line shown says nothing of the window"
    assert "%3|" not in capfd.readouterr().err


def test_the_repeat_filter_counts_what_it_held_back() -> None:
    from pipelines.kafka_io import _RepeatFilter

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("librdkafka", logging.ERROR, "", 0, text, (), None)

    f = _RepeatFilter(window_s=0.0)  # every message is due again at once: the count is of none held back
    held = _RepeatFilter(window_s=3600.0)
    records = [record(f"10.0.0.1:9092: refused (after {n}ms in state CONNECT)") for n in range(3)]
    assert [held.filter(r) for r in records] == [True, False, False]  # only the duration differs
    assert held.filter(record("10.0.0.2:9092: refused (after 0ms in state CONNECT)"))  # another broker: distinct
    assert all(f.filter(r) for r in records) and records[0].getMessage().endswith("CONNECT)")
    held.window_s = 0.0
    late = record("10.0.0.1:9092: refused (after 7ms in state CONNECT)")
    assert held.filter(late)
    assert late.getMessage() == ("10.0.0.1:9092: refused (after 7ms in state CONNECT) (2 more like it held back "
                                 "since the last one shown)")


def test_a_connection_error_raised_out_of_a_kafka_python_poll_is_an_empty_poll() -> None:
    """kafka-python 3.0.12 now and then raises a failed metadata refresh (ECONNREFUSED) out of poll while the
    brokers are away; it ended the daemon's loop in an outage (seen in CI). The source waits out the poll's timeout
    and returns nothing; the outage shows in the probe. The consumer here raises on cue (a broker cannot be made to
    fail exactly inside that refresh)."""
    from kafka.errors import KafkaConnectionError

    from pipelines.source_kafka_python import KafkaPythonSource

    class _Consumer:
        def __init__(self) -> None:
            self.polls = 0

        def poll(self, timeout_ms, max_records):
            self.polls += 1
            raise KafkaConnectionError("111 ECONNREFUSED")

    source = object.__new__(KafkaPythonSource)  # the client, not its bootstrap (which needs a broker)
    source._coordinator, source._consumer = None, _Consumer()
    assert len(source.poll(10, 50)) == 0 and source._consumer.polls == 1


def test_kafka_python_flush_waits_to_one_deadline_not_one_timeout_per_batch() -> None:
    """kafka-python's flush waits up to its timeout for each batch in turn: three batches acknowledged 0.8 s apart
    each came within 1 s of the one before, so a 1 s flush held the loop 2.1 s. The producer's wait now ends at one
    deadline, with the later batches still pending (kept for the next flush)."""
    import threading

    from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

    from pipelines.kafka_io import _wait_done

    batches = [FutureProduceResult(("t", p)) for p in range(3)]
    futures = [FutureRecordMetadata(b, 0, -1, None, 1, 1, 0) for b in batches]  # kafka-python's own futures
    acks = [threading.Timer(0.8 * i + 0.5, b.success, args=((i, -1, None),)) for i, b in enumerate(batches)]
    for ack in acks:
        ack.start()
    try:
        _wait_done(futures, time.monotonic() + 1.0)
        assert futures[0].is_done and futures[0].value.offset == 0
        assert not futures[2].is_done  # acknowledged at 2.1 s: after the deadline
    finally:
        for ack in acks:
            ack.join()
    assert all(f.is_done for f in futures)


def test_a_kafka_python_flush_holds_the_loop_to_its_timeout_for_all_its_messages() -> None:
    """The producer's flush itself, on kafka-python's futures acknowledged 0.8 s apart from 0.5 s: a 1 s flush returns
    with the later ones pending (kept for the next flush), not after all three (kafka-python's flush: 2.1 s)."""
    import threading
    from collections import deque

    from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

    from pipelines.kafka_io import KafkaDeliveryPending, KafkaPythonProducer

    batches = [FutureProduceResult(("t", p)) for p in range(3)]

    class _Client:  # kafka-python's KafkaProducer as the wrapper uses it
        def send(self, topic, value, key, headers):
            return FutureRecordMetadata(batches[len(sent)], 0, -1, None, 1, 1, 0)

        def flush(self, timeout=None):  # per batch in turn, as kafka-python 3.0.12's
            for b in batches:
                b.wait(timeout)

    sent: list = []
    producer = KafkaPythonProducer.__new__(KafkaPythonProducer)  # its client replaced, no broker
    producer._producer, producer._futures, producer._errors = _Client(), [], []
    producer._unsent, producer._keep_unsent, producer._no_metadata = deque(), False, set()
    for i in range(3):
        producer.produce("t", b"%d" % i)
        sent.append(i)
    acks = [threading.Timer(0.8 * i + 0.5, b.success, args=((i, -1, None),)) for i, b in enumerate(batches)]
    for ack in acks:
        ack.start()
    try:
        with pytest.raises(KafkaDeliveryPending, match="^2 of 3 Kafka messages not acknowledged within 1s"):
            producer.flush(1.0)
    finally:
        for ack in acks:
            ack.join()
