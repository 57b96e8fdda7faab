"""Sinks: log lines, Alertmanager payload/retry/re-send against a local HTTP server, fan-out, config, producers."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pipelines.alert_message import FIRING, RESOLVED, Alert
from pipelines.config import Config
from pipelines.kafka_io import ConfluentProducer, KafkaDeliveryError, client_security_config, make_producer
from pipelines.sinks import (
    MAX_FLUSH_BACKOFF_S,
    AlertmanagerSink,
    FanoutSink,
    KafkaAlertSink,
    LogSink,
    SinkError,
    build_sinks,
)

ROOT = Path(__file__).resolve().parent.parent


def make_alert(status: str = FIRING, stream: str = "pump-1", ended_at: int | None = None, **kw) -> Alert:
    fields = dict(
        id="a1b2", status=status, stream=stream, model="sensors-gru+sensors-lstm", model_version="3",
        started_at=1_700_000_000_000, ended_at=ended_at, peak_score=2.5, threshold=1.0,
        models_over=["sensors-gru"], top_features=[("temp", 0.6), ("flow", 0.3)],
        source={"topic": "sensors", "partition": 2, "first_offset": 10, "last_offset": 20},
    )  # fmt: skip
    fields.update(kw)
    return Alert(**fields)


class Recorder:
    """A real HTTP server on loopback answering POSTs with scripted (status, body) pairs, then 200."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = []
        self.posts: list[tuple[str, list]] = []
        recorder = self

        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.delay_s = 0.0  # before each answer: a remote Alertmanager's round trip

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.requests.append(("POST", self.path, self.headers["Authorization"]))
                recorder.posts.append((self.path, json.loads(body)))
                self._answer()

            def do_GET(self) -> None:  # noqa: N802 - http.server API (what a followed redirect turns a POST into)
                recorder.requests.append(("GET", self.path, self.headers["Authorization"]))
                self._answer()

            def _answer(self) -> None:
                time.sleep(recorder.delay_s)
                status, text = recorder.script.pop(0) if recorder.script else (200, "")
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere/api/v2/alerts")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


EPS = 2.0**-10  # a step of the fake clock, exact in binary like every time these tests set


class Clock:
    """The ``time`` module as pipelines.sinks sees it: ``monotonic``/``perf_counter`` return ``now``, which only the
    test moves (and ``sleep``, so a retry's backoff takes no real time); ``time`` is the wall clock moved as much."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._wall = time.time() - self.now

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def time(self) -> float:
        return self._wall + self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Replace the clock of the sinks (their only time source: ``import time``) with a :class:`Clock`."""
    fake = Clock()
    monkeypatch.setattr("pipelines.sinks.time", fake)
    monkeypatch.setattr("pipelines.sink_alertmanager.time", fake)
    return fake


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_log_sink_writes_one_json_line_per_alert(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    sink = LogSink(out)
    sink.add([make_alert(), make_alert(RESOLVED, ended_at=1_700_000_060_000)])
    sink.flush(1.0)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["event"], x["status"], x["id"]) for x in lines] == [
        ("alert", FIRING, "a1b2"),
        ("alert", RESOLVED, "a1b2"),
    ]
    assert Alert.from_dict({k: v for k, v in lines[1].items() if k != "event"}) == make_alert(
        RESOLVED, ended_at=1_700_000_060_000
    )
    with caplog.at_level(logging.INFO, logger="t.alerts"):
        LogSink(logging.getLogger("t.alerts")).add([make_alert()])
    assert json.loads(caplog.records[0].getMessage())["stream"] == "pump-1"


def test_alertmanager_payload_labels_stable_and_times(recorder: Recorder) -> None:
    sink = AlertmanagerSink(recorder.url, labels={"team": "ops"}, generator_url="http://anomalyd/")
    firing = make_alert()
    resolved = make_alert(RESOLVED, ended_at=firing.started_at)  # same event time: endsAt must still be later
    sink.add([firing])
    sink.flush(5.0)
    sink.add([resolved])
    sink.flush(5.0)
    assert [p for p, _ in recorder.posts] == ["/api/v2/alerts", "/api/v2/alerts"]
    (f,), (r,) = (b for _, b in recorder.posts)
    assert f["labels"] == r["labels"] == {
        "alertname": "AnomalyDetected", "stream": "pump-1", "model": "sensors-gru+sensors-lstm",
        "severity": "warning", "team": "ops",
    }  # fmt: skip
    assert f["startsAt"] == r["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert r["endsAt"] == "2023-11-14T22:13:20.001Z"
    assert datetime.fromisoformat(f["endsAt"]) > datetime.fromisoformat(f["startsAt"])
    assert f["annotations"]["alert_id"] == "a1b2" and f["annotations"]["top_features"] == "temp=0.60, flow=0.30"
    assert f["annotations"]["score"] == "2.5" and "sensors/2 offsets 10-20" in f["annotations"]["description"]
    assert f["generatorURL"] == "http://anomalyd/"


def test_alertmanager_retries_5xx_then_succeeds(recorder: Recorder) -> None:
    recorder.script = [(503, "busy"), (500, "oops")]
    sink = AlertmanagerSink(recorder.url, backoff_s=0.01, max_retries=3)
    sink.add([make_alert()])
    sink.flush(10.0)
    assert len(recorder.posts) == 3
    assert recorder.posts[0][1] == recorder.posts[2][1]


def test_alertmanager_4xx_fails_at_once_with_body(recorder: Recorder) -> None:
    recorder.script = [(400, "start time must be before end time")]
    sink = AlertmanagerSink(recorder.url, backoff_s=0.01)
    sink.add([make_alert()])
    with pytest.raises(SinkError, match="HTTP 400: start time must be before end time"):
        sink.flush(10.0)
    assert len(recorder.posts) == 1


def test_alertmanager_keeps_alerts_after_failure_and_delivers_later(recorder: Recorder) -> None:
    recorder.script = [(503, "down")] * 3
    sink = AlertmanagerSink(recorder.url, backoff_s=0.01, max_retries=2)
    sink.add([make_alert()])
    with pytest.raises(SinkError, match="after 3 attempts: HTTP 503: down"):
        sink.flush(10.0)
    time.sleep(0.02)  # the backoff after a failed flush (backoff_s)
    sink.flush(10.0)
    assert len(recorder.posts) == 4 and recorder.posts[3][1][0]["annotations"]["alert_id"] == "a1b2"


def test_alertmanager_failed_flushes_back_off_without_requests(recorder: Recorder, clock: Clock) -> None:
    recorder.script = [(401, "unauthorized")] * 3
    sink = AlertmanagerSink(recorder.url, backoff_s=0.25)
    sink.add([make_alert()])
    with pytest.raises(SinkError, match="HTTP 401: unauthorized"):
        sink.flush(5.0)
    failed = clock.now
    for _ in range(20):  # the loop flushes every few milliseconds: no request until the backoff has passed
        clock.advance(0.01)
        with pytest.raises(SinkError, match=r"1 alerts waiting, next attempt in 0\.[0-2] s; last error: .*HTTP 401"):
            sink.flush(5.0)
    clock.now = failed + 0.25 - EPS
    with pytest.raises(SinkError, match=r"next attempt in 0\.0 s"):
        sink.flush(5.0)
    assert len(recorder.posts) == 1
    clock.now = failed + 0.25  # backoff_s has passed
    with pytest.raises(SinkError, match="HTTP 401"):
        sink.flush(5.0)
    assert len(recorder.posts) == 2
    failed = clock.now
    with pytest.raises(SinkError, match=r"next attempt in 0\.5 s"):  # doubled
        sink.flush(5.0)
    clock.now = failed + 0.5 - EPS
    with pytest.raises(SinkError, match=r"1 alerts waiting, next attempt in 0\.0 s"):
        sink.flush(5.0)
    clock.now = failed + 0.5
    sink.add([make_alert(id="next")])
    with pytest.raises(SinkError, match="HTTP 401"):
        sink.flush(5.0)
    failed = clock.now
    clock.now = failed + 1.0 - EPS  # doubled again
    with pytest.raises(SinkError, match=r"2 alerts waiting, next attempt in 0\.0 s"):
        sink.flush(5.0)
    assert len(recorder.posts) == 3
    clock.now = failed + 1.0
    sink.flush(5.0)  # accepted: the backoff starts again from backoff_s
    assert [len(body) for _, body in recorder.posts] == [1, 1, 2, 2]
    sink.add([make_alert(id="third")])
    sink.flush(5.0)
    assert len(recorder.posts) == 5
    recorder.script = [(401, "unauthorized")]
    sink.add([make_alert(id="fourth")])
    with pytest.raises(SinkError, match="HTTP 401"):
        sink.flush(5.0)
    with pytest.raises(SinkError, match=r"next attempt in 0\.2 s"):  # backoff_s again, not doubled from before
        sink.flush(5.0)
    FanoutSink([sink]).retry_now()  # the shutdown's last flush: at once, whatever the backoff
    sink.flush(5.0)
    assert len(recorder.posts) == 7
    sink._failed_flushes = 2_000  # hours of outage: 2 ** 2000 overflowed a float, and the backoff ended
    recorder.script = [(300, "")]  # a 3xx urllib does not follow (300, 304, no Location): refused, not retried
    sink.add([make_alert(id="fifth")])
    with pytest.raises(SinkError, match="HTTP 300"):
        sink.flush(5.0)
    assert len(recorder.posts) == 8
    assert not sink.flush_due(clock.now + MAX_FLUSH_BACKOFF_S - EPS)  # backing off, 30 s
    assert sink.flush_due(clock.now + MAX_FLUSH_BACKOFF_S)


def test_refusals_in_a_backoff_are_not_counted_as_failed_flushes(recorder: Recorder, clock: Clock) -> None:
    """The loop flushes at every turn: each refusal without a request counted as a failed flush (60 for one
    request) and put a time of 0 s in the flush histogram, hiding the real requests' timeouts."""
    recorder.script = [(503, "down")] * 2
    sinks = FanoutSink([AlertmanagerSink(recorder.url, backoff_s=0.25, max_retries=0)])
    sinks.add([make_alert()])
    seen: list[tuple[str, bool]] = []
    for _ in range(20):
        with pytest.raises(SinkError):  # still an error: the daemon commits nothing
            sinks.flush(5.0, lambda name, _s, ok: seen.append((name, ok)))
        clock.advance(0.01)
    assert len(recorder.posts) == 1 and seen == [("alertmanager", False)]
    clock.advance(0.25)
    with pytest.raises(SinkError, match="HTTP 503"):
        sinks.flush(5.0, lambda name, _s, ok: seen.append((name, ok)))
    assert len(recorder.posts) == 2 and seen == [("alertmanager", False)] * 2


def test_alertmanager_refuses_a_redirect_instead_of_following_it_with_a_get(recorder: Recorder) -> None:
    recorder.script = [(302, "")]
    sink = AlertmanagerSink(recorder.url, backoff_s=0.01)
    sink.add([make_alert()])
    to = r"HTTP 302 redirect to http://127\.0\.0\.1:\d+/elsewhere/api/v2/alerts: set sinks\.alertmanager\.url"
    with pytest.raises(SinkError, match=to):
        sink.flush(5.0)
    assert recorder.requests == [("POST", "/api/v2/alerts", None)]  # urllib followed it with a GET, answered 200


def test_alertmanager_credentials_in_the_url_go_as_basic_auth_and_never_into_messages(recorder: Recorder) -> None:
    url = recorder.url.replace("http://", "http://ops:s%40cret@") + "/am/"
    recorder.script = [(403, "forbidden")]
    sink = AlertmanagerSink(url, backoff_s=0.01)
    sink.add([make_alert()])
    with pytest.raises(SinkError) as err:
        sink.flush(5.0)
    assert "s@cret" not in str(err.value) and "s%40cret" not in str(err.value)
    assert "http://ops:***@127.0.0.1:" in str(err.value) and "/am/api/v2/alerts" in str(err.value)
    time.sleep(0.02)
    sink.flush(5.0)
    auth = "Basic " + base64.b64encode(b"ops:s@cret").decode()
    assert recorder.requests == [("POST", "/am/api/v2/alerts", auth)] * 2


def test_an_ipv6_alertmanager_with_credentials_keeps_its_brackets() -> None:
    from pipelines.alertmanager_http import AlertmanagerHTTP

    http = AlertmanagerHTTP("http://ops:pw@[::1]/am")
    assert (http.base, http.shown) == ("http://[::1]/am", "http://ops:***@[::1]/am")


def test_alertmanager_unreachable_raises_after_retries() -> None:
    sink = AlertmanagerSink(f"http://127.0.0.1:{closed_port()}", backoff_s=0.01, max_retries=2)
    sink.add([make_alert()])
    with pytest.raises(SinkError, match="not delivered after 3 attempts"):
        sink.flush(10.0)


def test_alertmanager_resends_open_firing_until_resolved(recorder: Recorder) -> None:
    sink = AlertmanagerSink(recorder.url, resend_interval_s=0.0)
    sink.add([make_alert(), make_alert(id="other", stream="pump-2")])
    sink.flush(5.0)
    sink.flush(5.0)  # nothing new: both firing alerts re-posted
    assert sorted(a["annotations"]["alert_id"] for a in recorder.posts[1][1]) == ["a1b2", "other"]
    sink.forget_streams(["pump-2"])
    sink.add([make_alert(RESOLVED, ended_at=1_700_000_060_000)])
    sink.flush(5.0)
    assert [a["annotations"]["alert_id"] for a in recorder.posts[2][1]] == ["a1b2"]
    sink.flush(5.0)
    assert len(recorder.posts) == 3


def test_alertmanager_posts_alerts_whose_event_time_is_beyond_what_a_date_holds(recorder: Recorder) -> None:
    sink = AlertmanagerSink(recorder.url)
    sink.add([make_alert(started_at=-10**16)])  # year -314912: the decoder takes any int64 epoch milliseconds
    sink.add([make_alert(id="later", stream="pump-2", started_at=10**16)])  # year 318857: starts now (next test)
    sink.flush(5.0)
    (early, late) = recorder.posts[0][1]
    assert early["startsAt"] == "0001-01-01T00:00:00.000Z"
    assert abs(_ms(late["startsAt"]) - time.time() * 1000) < 60_000


def _ms(rfc3339: str) -> int:
    return round(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def test_alertmanager_resolves_an_incident_whose_event_time_is_ahead_of_this_clock(recorder: Recorder) -> None:
    """A producer an hour ahead (local time sent as UTC): the resolve must end by now, or Alertmanager keeps the
    firing alert's later endsAt and the alert fires on until then."""
    sink = AlertmanagerSink(recorder.url, resend_interval_s=60.0)
    ahead = int(time.time() * 1000) + 3_600_000
    sink.add([make_alert(started_at=ahead)])
    sink.flush(5.0)
    sink.add([make_alert(RESOLVED, started_at=ahead, ended_at=ahead + 60_000)])
    sink.flush(5.0)
    now = time.time() * 1000
    (firing,), (resolved,) = recorder.posts[0][1], recorder.posts[1][1]
    assert _ms(firing["startsAt"]) <= now and _ms(firing["endsAt"]) > now
    assert _ms(resolved["startsAt"]) < _ms(resolved["endsAt"]) <= now


def test_alertmanager_asks_for_a_flush_when_open_incidents_are_due_for_their_re_post(recorder: Recorder,
                                                                                       clock: Clock) -> None:
    sink = AlertmanagerSink(recorder.url, resend_interval_s=0.25, backoff_s=0.25)
    assert not sink.flush_due(clock.now)  # nothing open
    sink.add([make_alert()])
    assert sink.flush_due(clock.now)  # queued
    sink.flush(5.0)
    posted = clock.now
    assert not sink.flush_due(posted) and not sink.flush_due(posted + 0.25 - EPS)
    clock.now = posted + 0.25
    assert sink.flush_due(clock.now) and FanoutSink([LogSink(io.StringIO()), sink]).flush_due(clock.now)
    recorder.script = [(400, "no")]
    with pytest.raises(SinkError):
        sink.flush(5.0)
    assert not sink.flush_due(clock.now) and not sink.flush_due(clock.now + 0.25 - EPS)  # backing off
    clock.advance(0.25)
    assert sink.flush_due(clock.now)
    sink.flush(5.0)
    assert len(recorder.posts) == 3
    sink.add([make_alert(RESOLVED, ended_at=1_700_000_060_000)])
    sink.flush(5.0)
    clock.advance(60.0)
    assert not sink.flush_due(clock.now)  # resolved: nothing to re-post


def test_alertmanager_rejects_bad_label_names() -> None:
    with pytest.raises(ValueError, match="bad-name"):
        AlertmanagerSink("http://x", labels={"bad-name": "1"})
    with pytest.raises(ValueError, match="stream"):
        AlertmanagerSink("http://x", labels={"stream": "1"})


def test_fanout_flushes_all_and_names_the_failing_sink(recorder: Recorder) -> None:
    recorder.script = [(422, "bad alert")]
    out = io.StringIO()
    sink = FanoutSink([AlertmanagerSink(recorder.url, backoff_s=0.01), LogSink(out)])
    sink.add([make_alert()])
    with pytest.raises(SinkError, match=r"alertmanager: .*HTTP 422: bad alert") as err:
        sink.flush(5.0)
    assert "log:" not in str(err.value)
    assert json.loads(out.getvalue())["id"] == "a1b2"
    time.sleep(0.02)
    sink.flush(5.0)  # the Alertmanager alert is still queued and now accepted
    assert len(recorder.posts) == 2


def test_kafka_sink_keeps_alerts_when_the_broker_is_unreachable() -> None:
    producer = ConfluentProducer(f"127.0.0.1:{closed_port()}", **{"log_level": 0})
    produced = []
    real_produce = producer.produce
    producer.produce = lambda *args, **kw: (produced.append(args[0]), real_produce(*args, **kw))  # counts
    sink = KafkaAlertSink(producer, "alerts")
    sink.add([make_alert()])
    with pytest.raises(SinkError, match="kafka topic alerts: 1 alerts not acknowledged yet"):
        sink.flush(0.3)
    for _ in range(3):
        with pytest.raises(SinkError, match="1 alerts not acknowledged yet"):
            sink.flush(0.1)
    assert produced == ["alerts"]  # still in the producer's queue: not produced again on each flush (copies)
    producer.close(0)


def test_a_stalled_alerts_topic_does_not_hold_back_the_alertmanager_post(recorder: Recorder) -> None:
    """The Kafka sink's flush waits for acknowledgements until the deadline when its brokers do not answer; flushed
    first, it left a healthy Alertmanager nothing of the deadline: no page went out, and Alertmanager backed off."""
    producer = ConfluentProducer(f"127.0.0.1:{closed_port()}", **{"log_level": 0})
    sinks = build_sinks({"kafka": {"enabled": True}, "alertmanager": {"enabled": True, "url": recorder.url},
                         "log": {"enabled": False}}, producer)
    assert [s.name for s in sinks.sinks] == ["kafka", "alertmanager"]
    recorder.delay_s = 0.2  # healthy, but further away than the 50 ms a post is given at the deadline
    sinks.add([make_alert()])
    seen: list[tuple[str, bool]] = []
    with pytest.raises(SinkError, match="kafka: kafka topic anomalyd-alerts: 1 alerts not acknowledged") as err:
        sinks.flush(0.5, lambda name, _s, ok: seen.append((name, ok)))
    assert "alertmanager" not in str(err.value) and ("alertmanager", True) in seen
    assert len(recorder.posts) == 1
    producer.close(0)


def test_build_sinks_from_example_config(recorder: Recorder) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "config.example.yaml").read_text())
    producer = make_producer("confluent", f"127.0.0.1:{closed_port()}", log_level=0)
    try:
        assert [s.name for s in build_sinks(config, producer).sinks] == ["kafka", "log"]
        section = config["sinks"] | {"alertmanager": {"enabled": True, "url": recorder.url, "labels": {"a": "b"}}}
        sinks = build_sinks(section, producer).sinks
        assert [s.name for s in sinks] == ["kafka", "alertmanager", "log"]
        assert sinks[0].topic == "anomalyd-alerts" and sinks[1].labels == {"severity": "warning", "a": "b"}
        am = {"enabled": True, "url": recorder.url, "severity": "page", "resend_interval_s": 30,
              "generator_url": "http://grafana/d/anomalyd"}  # fmt: skip
        cfg = Config.from_dict({"sinks": {"alertmanager": am}})  # what the daemon hands build_sinks
        (_, sink, _) = build_sinks(dataclasses.asdict(cfg.sinks), producer).sinks
        assert (sink.labels["severity"], sink.resend_interval_s, sink.generator_url) == \
            ("page", 30.0, "http://grafana/d/anomalyd")
        with pytest.raises(ValueError, match="no Kafka producer"):
            build_sinks(config)
        with pytest.raises(ValueError, match="unknown sinks"):
            build_sinks({"slack": {}})
        with pytest.raises(ValueError, match="unknown keys"):
            build_sinks({"kafka": {"topik": "x"}}, producer)
    finally:
        producer.close(0)


def test_security_options_map_to_each_client(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    security = {
        "protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
        "sasl_password": None, "sasl_password_file": str(tmp_path / "pw"), "ssl_cafile": "/ca.pem",
    }  # fmt: skip
    assert client_security_config("kafka-python", security) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
        "sasl_plain_password": "s3cret", "ssl_cafile": "/ca.pem",
    }  # fmt: skip
    assert client_security_config("confluent", security) == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u",
        "sasl.password": "s3cret", "ssl.ca.location": "/ca.pem",
    }  # fmt: skip
    assert client_security_config("confluent", {"protocol": "PLAINTEXT", "ssl_cafile": None}) == {
        "security.protocol": "PLAINTEXT"
    }
    mutual = {"protocol": "SSL", "ssl_cafile": "/ca.pem", "ssl_certfile": "/c.crt", "ssl_keyfile": "/c.key",
              "ssl_key_password_file": str(tmp_path / "pw")}
    assert client_security_config("kafka-python", mutual) == {
        "security_protocol": "SSL", "ssl_cafile": "/ca.pem", "ssl_certfile": "/c.crt", "ssl_keyfile": "/c.key",
        "ssl_password": "s3cret"}
    assert client_security_config("confluent", mutual) == {
        "security.protocol": "SSL", "ssl.ca.location": "/ca.pem", "ssl.certificate.location": "/c.crt",
        "ssl.key.location": "/c.key", "ssl.key.password": "s3cret"}
    with pytest.raises(ValueError, match="set ssl_key_password or ssl_key_password_file, not both"):
        client_security_config("kafka-python", mutual | {"ssl_key_password": "x"})
    with pytest.raises(ValueError, match="not both"):
        client_security_config("confluent", security | {"sasl_password": "x"})
    (tmp_path / "empty").write_text("\n")
    for path, reason in ((tmp_path / "missing", "cannot read password file"),
                         (tmp_path / "empty", "password file .* is empty")):
        with pytest.raises(ValueError, match=f"kafka.security.sasl_password_file: {reason}"):
            client_security_config("confluent", security | {"sasl_password_file": str(path)})
    with pytest.raises(ValueError, match="unknown kafka.security keys"):
        client_security_config("confluent", {"sasl_pasword": "x"})
    with pytest.raises(ValueError, match="kafka.client"):
        client_security_config("librdkafka", {})


class _RefusingProducer:
    """The alerts topic's partition as a list; while ``refuse`` is set, a flush fails every message for good (a
    leader gone in a broker's restart), as a producer's KafkaDeliveryError says."""

    def __init__(self) -> None:
        self.refuse, self.batch, self.topic_log = False, [], []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers=None) -> None:
        self.batch.append(json.loads(value))

    def flush(self, timeout_s: float) -> None:
        batch, self.batch = self.batch, []
        if self.refuse:
            raise KafkaDeliveryError(f"{len(batch)} of {len(batch)} Kafka messages not delivered: NotLeader")
        self.topic_log += [(a["id"], a["status"]) for a in batch]


def test_kafka_sink_does_not_produce_again_the_firing_alerts_of_a_revoked_partition() -> None:
    """The revoke's last flush failed: the next owner repeats the records and may resolve the incident, which a
    late copy of the firing alert from here would re-open on the topic for good. A resolve still goes, and so does
    an alert of a partition kept."""
    src = lambda p: {"topic": "sensors", "partition": p, "first_offset": 10, "last_offset": 20}  # noqa: E731
    producer = _RefusingProducer()
    sink = KafkaAlertSink(producer, "alerts")
    producer.refuse = True
    sink.add([make_alert(source=src(2)), make_alert(id="kept", stream="pump-2", source=src(3)),
              make_alert(RESOLVED, id="done", stream="pump-3", ended_at=1_700_000_060_000, source=src(2))])
    with pytest.raises(SinkError, match="3 alerts not delivered"):
        sink.flush(1.0)
    sink.forget_streams(["pump-1", "pump-3"], revoked=[("sensors", 2)])
    producer.refuse = False
    assert sink.flush(1.0) == 2
    assert producer.topic_log == [("kept", FIRING), ("done", RESOLVED)]


def test_alertmanager_re_posts_an_adopted_alert_at_once_then_each_interval(recorder: Recorder, clock: Clock):
    sink = AlertmanagerSink(recorder.url, resend_interval_s=60.0)
    assert not sink.flush_due(clock.now)
    sink.adopt([make_alert()])
    assert sink.flush_due(clock.now)  # the previous owner's last post ends within 4 intervals: now
    sink.flush(5.0)
    assert [a["annotations"]["alert_id"] for _, posted in recorder.posts for a in posted] == ["a1b2"]
    clock.advance(30)
    assert not sink.flush_due(clock.now)
    clock.advance(31)
    assert sink.flush_due(clock.now)


def test_alertmanager_drops_unposted_firing_alerts_of_streams_it_no_longer_owns(recorder: Recorder,
                                                                                clock: Clock) -> None:
    """Alertmanager down at a revoke: a firing alert from the revoked partition's records must not go out later,
    when the partition's new owner may have resolved it (it would fire again and be re-posted for as long as this
    runs); those records were not committed, so the new owner repeats it. A resolve still goes (the new owner may
    not know the incident), and so does an alert from a partition kept (its stream's key moved)."""
    src = lambda p: {"topic": "sensors", "partition": p, "first_offset": 10, "last_offset": 20}  # noqa: E731
    sink = AlertmanagerSink(recorder.url, backoff_s=0.25, max_retries=0)
    sink.add([make_alert(source=src(2)), make_alert(id="kept", stream="pump-2", source=src(3)),
              make_alert(RESOLVED, id="done", stream="pump-1", ended_at=1_700_000_060_000, source=src(2)),
              make_alert(id="moved-key", stream="pump-3", source=src(0))])
    recorder.script = [(503, "down")]
    with pytest.raises(SinkError):
        sink.flush(5.0)
    sink.forget_streams(["pump-1", "pump-3"], revoked=[("sensors", 2), ("sensors", 1)])  # pump-3 now keyed to 1
    clock.advance(1.0)
    sink.flush(5.0)
    assert [(a["annotations"]["alert_id"], a["labels"]["stream"]) for a in recorder.posts[-1][1]] == \
        [("kept", "pump-2"), ("done", "pump-1"), ("moved-key", "pump-3")]
    clock.advance(120.0)
    sink.flush(5.0)
    assert [a["annotations"]["alert_id"] for a in recorder.posts[-1][1]] == ["kept"]  # only pump-2 re-posted


def test_alertmanager_still_posts_the_firing_alert_of_a_stream_forgotten_as_idle(recorder: Recorder,
                                                                                 clock: Clock) -> None:
    """Idle, the stream has no next owner: its firing alert, queued while Alertmanager was down, goes before its
    resolve (only the resolve went, so the incident never paged)."""
    sink = AlertmanagerSink(recorder.url, backoff_s=0.25, max_retries=0)
    sink.add([make_alert()])
    recorder.script = [(503, "down")]
    with pytest.raises(SinkError):
        sink.flush(5.0)
    sink.add([make_alert(RESOLVED, ended_at=1_700_000_060_000)])
    sink.forget_streams(["pump-1"])
    clock.advance(1.0)
    sink.flush(5.0)
    assert [a["endsAt"] > a["startsAt"] for a in recorder.posts[-1][1]] == [True, True]
    assert [a["annotations"]["alert_id"] for a in recorder.posts[-1][1]] == ["a1b2", "a1b2"]


def test_alertmanager_posts_the_resolve_of_an_incident_followed_by_a_new_one_of_the_stream(recorder: Recorder) -> None:
    """Resolved, then a new incident, in one flush (a backlog after an outage): without the resolve Alertmanager
    would merge the new incident into the old one, and the new one would not page."""
    sink = AlertmanagerSink(recorder.url, resend_interval_s=3600.0)
    sink.add([make_alert(id="first")])
    sink.flush(5.0)
    sink.add([make_alert(RESOLVED, id="first", ended_at=1_700_000_060_000),
              make_alert(id="second", started_at=1_700_000_120_000)])
    sink.flush(5.0)
    assert [(a["annotations"]["alert_id"], a["endsAt"] < a["startsAt"].replace("2023", "3023"))
            for a in recorder.posts[-1][1]] == [("first", True), ("second", True)]


def test_alertmanager_posts_a_backlog_in_parts_and_keeps_what_was_not_posted(recorder: Recorder,
                                                                             clock: Clock) -> None:
    from pipelines.sinks import MAX_ALERTS_PER_POST

    n = 2 * MAX_ALERTS_PER_POST + 7
    sink = AlertmanagerSink(recorder.url, backoff_s=0.25, max_retries=0, resend_interval_s=3600.0)
    sink.add([make_alert(id=f"i{j}", stream=f"s{j}") for j in range(n)])
    recorder.script = [(200, ""), (503, "busy")]
    with pytest.raises(SinkError):
        sink.flush(5.0)
    assert [len(p) for _, p in recorder.posts] == [MAX_ALERTS_PER_POST, MAX_ALERTS_PER_POST]
    clock.advance(1.0)
    sink.flush(5.0)  # the part that failed and the rest, not the part Alertmanager took
    assert [len(p) for _, p in recorder.posts[2:]] == [MAX_ALERTS_PER_POST, 7]
    ids = [a["annotations"]["alert_id"] for _, p in (recorder.posts[0], *recorder.posts[2:]) for a in p]
    assert ids == [f"i{j}" for j in range(n)]
    clock.advance(1.0)
    assert sink.flush(5.0) == 0  # nothing left to post


def test_alertmanager_does_not_post_a_resolve_that_would_end_another_incident_of_the_stream(
        recorder: Recorder) -> None:
    """Two incidents of one stream (handed over with two partitions when its key moved): both have one label set in
    Alertmanager, so the older one's resolve is not posted while the later one fires; it is posted to the others."""
    sink = AlertmanagerSink(recorder.url, resend_interval_s=0.0)
    sink.adopt([make_alert(id="later", started_at=1_700_000_100_000)])
    sink.add([make_alert(RESOLVED, id="older", ended_at=1_700_000_090_000)])
    sink.flush(5.0)
    assert [(a["annotations"]["alert_id"], a["endsAt"] > a["startsAt"]) for a in recorder.posts[0][1]] == \
        [("later", True)]
    sink.add([make_alert(RESOLVED, id="later", started_at=1_700_000_100_000, ended_at=1_700_000_200_000)])
    sink.flush(5.0)
    assert [a["annotations"]["alert_id"] for a in recorder.posts[1][1]] == ["later"]


def test_fanout_times_only_the_flushes_that_had_alerts_to_deliver(recorder: Recorder) -> None:
    seen: list[tuple[str, bool]] = []
    am = AlertmanagerSink(recorder.url, resend_interval_s=3600.0)
    fan = FanoutSink([LogSink(io.StringIO()), am])
    fan.flush(5.0, lambda name, _s, ok: seen.append((name, ok)))
    assert seen == []  # nothing to do: no sample, else the histogram's quantiles read the no-ops
    fan.add([make_alert()])
    assert fan.flush(5.0, lambda name, _s, ok: seen.append((name, ok))) == 1
    assert fan.flush(5.0, lambda name, _s, ok: seen.append((name, ok))) == 0
    assert seen == [("alertmanager", True)]


def test_a_host_name_lookup_that_does_not_answer_does_not_hold_a_flush_past_its_deadline(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib's timeout covers the socket, not getaddrinfo: a resolver that did not answer held the flush (and a
    revoke's or the shutdown's deadline with it) for as long as the lookup took. A request given up is never sent
    later: once the lookup answers, nothing goes out (a late post of a revoked partition's firing alerts would
    re-open what the next owner resolved)."""
    import socket as socket_module

    released = threading.Event()
    real = socket_module.getaddrinfo
    port = int(recorder.url.rsplit(":", 1)[1])

    def slow(host, *args, **kwargs):
        if host == "alertmanager.slow.test":
            released.wait(60)  # a resolver that answers only once the test says so
            return real("127.0.0.1", port, *args[1:], **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", slow)
    sink = AlertmanagerSink(f"http://alertmanager.slow.test:{port}", timeout_s=0.5, max_retries=0)
    sink.add([make_alert()])
    t0 = time.monotonic()
    try:
        with pytest.raises(SinkError, match=r"no answer within 0\.5 s \(still under way"):
            sink.flush(1.0)
        assert time.monotonic() - t0 < 30  # about 1 s; the lookup itself would take 60
        sink.retry_now()
        with pytest.raises(SinkError, match=r"waiting behind an earlier request"):
            sink.flush(1.0)
    finally:
        released.set()
    sink.retry_now()
    sink.flush(5.0)  # behind the given-up request: once this is answered, that one has ended
    assert len(recorder.posts) == 1  # this one; the one given up sent nothing when its lookup answered


def _raw_http_server(reply: Callable[[socket.socket], None]) -> tuple[str, socket.socket, list[int]]:
    """A server that writes ``reply`` by hand on each connection (bodies cut short or trickling, which
    http.server cannot send); (url, listening socket, [requests])."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    requests = [0]

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                reply(conn)
            except OSError:
                pass

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            requests[0] += 1
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", srv, requests


def test_a_5xx_whose_body_breaks_off_is_retried_and_backs_off() -> None:
    """The reason was read outside the retries: a body cut short (IncompleteRead) escaped them after one
    request, and started no backoff (the loop then posted again at every turn)."""
    url, srv, requests = _raw_http_server(
        lambda c: c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 1000\r\n\r\nshort"))
    with srv:
        sink = AlertmanagerSink(url, max_retries=2, backoff_s=0.01)
        sink.add([make_alert()])
        with pytest.raises(SinkError, match="after 3 attempts: HTTP 503: short"):
            sink.flush(10.0)
        assert requests[0] == 3
        with pytest.raises(SinkError, match="1 alerts waiting, next attempt in"):
            sink.flush(10.0)  # backing off: no request
        assert requests[0] == 3


def test_a_5xx_whose_body_trickles_gives_up_at_the_flush_deadline() -> None:
    """The reason was read in full on the caller's thread: a body sent a byte at a time held the flush (a
    revoke's, the shutdown's) for as long as it lasted, whatever its deadline."""
    stop = threading.Event()

    def trickle(c: socket.socket) -> None:
        c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2000\r\n\r\n")
        for _ in range(2000):
            if stop.wait(0.05):
                return
            c.sendall(b"x")

    url, srv, _ = _raw_http_server(trickle)
    with srv:
        sink = AlertmanagerSink(url, timeout_s=0.5, max_retries=0)
        sink.add([make_alert()])
        t0 = time.monotonic()
        try:
            with pytest.raises(SinkError, match="alerts not delivered"):
                sink.flush(1.0)
            assert time.monotonic() - t0 < 30  # about 1 s; the whole body would take 100
        finally:
            stop.set()
