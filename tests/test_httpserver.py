"""HealthServer over real HTTP on a loopback port."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipelines.httpserver import BindError, HealthServer
from pipelines.metrics import Metrics


def _get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, also for 4xx/5xx."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


class _Flags:
    def __init__(self) -> None:
        self.alive, self.ready = True, False


@pytest.fixture
def flags() -> _Flags:
    return _Flags()


@pytest.fixture
def server(flags: _Flags) -> Iterator[tuple[HealthServer, Metrics]]:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    srv = HealthServer(reg, bind="127.0.0.1", port=0,
                       is_alive=lambda: flags.alive, is_ready=lambda: flags.ready)
    srv.start()
    yield srv, metrics
    srv.stop()


def test_metrics_endpoint_serves_the_registry(server: tuple[HealthServer, Metrics]) -> None:
    srv, metrics = server
    metrics.event("sensors", "scored", 42)
    status, ctype, body = _get(f"{srv.url}/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("anomalyd_events_total", (("outcome", "scored"), ("topic", "sensors")))] == 42
    assert ("process_cpu_seconds_total", ()) in samples
    status, ctype, body = _get(f"{srv.url}/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")


def test_probes_follow_the_callables(server: tuple[HealthServer, Metrics], flags: _Flags) -> None:
    srv, _ = server
    assert _get(f"{srv.url}/healthz")[::2] == (200, "ok\n")
    assert _get(f"{srv.url}/readyz")[::2] == (503, "not ready\n")
    flags.ready = True
    assert _get(f"{srv.url}/readyz")[::2] == (200, "ready\n")
    flags.alive = False
    assert _get(f"{srv.url}/healthz")[::2] == (503, "not alive\n")
    assert _get(f"{srv.url}/healthz?verbose=1")[0] == 503
    assert _get(f"{srv.url}/nope")[0] == 404


def test_a_raising_check_reports_unhealthy() -> None:
    def broken() -> bool:
        raise RuntimeError("consumer thread died")

    with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0, is_ready=broken) as srv:
        status, _, body = _get(f"{srv.url}/readyz")
        assert status == 503 and "consumer thread died" in body
        assert _get(f"{srv.url}/healthz")[0] == 200


def test_a_collector_that_raises_is_a_500_and_head_requests_are_answered() -> None:
    from prometheus_client import Gauge

    reg = CollectorRegistry()
    Gauge("anomalyd_gpu_memory_bytes", "x", registry=reg).set_function(lambda: 1 / 0)  # a CUDA call that fails
    with HealthServer(reg, bind="127.0.0.1", port=0) as srv:
        status, _, body = _get(f"{srv.url}/metrics")
        assert status == 500 and "ZeroDivisionError" in body
        head = urllib.request.Request(f"{srv.url}/healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "3" and resp.read() == b""


def test_concurrent_requests_are_served() -> None:
    release = threading.Event()

    def slow_ready() -> bool:
        release.wait(10)
        return True

    with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0, is_ready=slow_ready) as srv:
        results: list[int] = []
        t = threading.Thread(target=lambda: results.append(_get(f"{srv.url}/readyz")[0]))
        t.start()
        assert _get(f"{srv.url}/healthz")[0] == 200  # served while /readyz is still blocked
        release.set()
        t.join(10)
        assert results == [200]


def test_lifecycle_port_and_rebind() -> None:
    srv = HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0)
    with pytest.raises(RuntimeError, match="after start"):
        _ = srv.port
    srv.start()
    port = srv.port
    assert port > 0
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()
    with pytest.raises(OSError):
        HealthServer(CollectorRegistry(), bind="127.0.0.1", port=port).start()  # taken
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = HealthServer(CollectorRegistry(), bind="127.0.0.1", port=port).start()  # port is free again
    assert _get(f"{again.url}/healthz")[0] == 200
    again.stop()


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = HealthServer(CollectorRegistry(), bind="::1", port=0).start()
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert srv.url.startswith("http://[::1]:")
        assert _get(f"{srv.url}/healthz")[0] == 200
    finally:
        srv.stop()


def test_bind_errors_are_one_line_naming_the_address() -> None:
    """A taken port or a bind address that is not this host's: BindError (an OSError) saying which, for the CLI."""
    with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0) as srv, pytest.raises(BindError) as taken:
        port = srv.port
        HealthServer(CollectorRegistry(), bind="127.0.0.1", port=port).start()
    assert isinstance(taken.value, OSError) and taken.value.errno == errno.EADDRINUSE
    assert str(taken.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    with pytest.raises(BindError) as foreign:
        HealthServer(CollectorRegistry(), bind="192.0.2.1", port=0).start()  # TEST-NET-1: never local
    assert (foreign.value.bind, foreign.value.port) == ("192.0.2.1", 0) and foreign.value.errno == errno.EADDRNOTAVAIL


def test_the_start_log_names_the_bound_address_when_it_is_all_interfaces(caplog: pytest.LogCaptureFixture) -> None:
    """Bound to 0.0.0.0 the log said only http://127.0.0.1:PORT, as if reachable from this host alone."""
    with caplog.at_level(logging.INFO, logger="pipelines.httpserver"):
        with HealthServer(CollectorRegistry(), bind="0.0.0.0", port=0) as srv:
            port = srv.port
        with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0) as srv:
            local = srv.port
    assert f"listening on http://127.0.0.1:{port} (/metrics, /healthz, /readyz); bound to 0.0.0.0, all interfaces" \
        in caplog.text
    assert f"listening on http://127.0.0.1:{local} (/metrics, /healthz, /readyz)\n" in caplog.text + "\n"


def _closed_by_server(s: socket.socket, wait_s: float) -> bool:
    """Whether the server ends the connection within ``wait_s`` (an end of stream or a reset), sending nothing."""
    s.settimeout(max(wait_s, 0.01))
    try:
        data = s.recv(1024)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert data == b"", data  # half a request line: no response is due
    return True


def test_idle_connections_are_capped_and_give_way_to_a_request() -> None:
    """Connections that send half a request line and wait (slowloris) each held a thread for ever: 1,000 of them
    made 1,000 threads. Now at most max_connections are open, and a new one (the kubelet's probe) takes the place of
    the oldest that has not sent its request."""
    import time

    cap, n = 4, 10
    with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0, max_connections=cap,
                      request_timeout_s=60) as srv:
        before = threading.active_count()
        idle = []
        try:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", srv.port))
                s.sendall(b"GET /hea")
                idle.append(s)
            # the server ends the oldest beyond the cap (their own timeout is 60 s), and only those
            deadline = time.monotonic() + 30
            kept = [i for i, s in enumerate(idle[:n - cap]) if not _closed_by_server(s, deadline - time.monotonic())]
            assert kept == [], f"connections {kept} of {n} still open, max_connections {cap}"
            assert not any(_closed_by_server(s, 0.2) for s in idle[n - cap:]), "a connection within the cap ended"
            while threading.active_count() > before + cap and time.monotonic() < deadline:
                time.sleep(0.05)  # the dropped ones' threads end
            assert threading.active_count() <= before + cap, threading.active_count() - before
            with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10) as resp:
                assert resp.status == 200  # it took the oldest idle connection's place
            assert _closed_by_server(idle[n - cap], 30), "the request did not take the oldest idle connection's place"
            assert not any(_closed_by_server(s, 0.2) for s in idle[n - cap + 1:])
        finally:
            for s in idle:
                s.close()
