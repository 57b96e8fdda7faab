"""The daemon's HTTP endpoint: Prometheus metrics and Kubernetes-style health probes.

| Path | Response |
|---|---|
| `/metrics` | the registry in the Prometheus text format (OpenMetrics if the scraper asks for it) |
| `/healthz` | 200 ``ok`` while ``is_alive()`` is true, else 503 (liveness: restart me) |
| `/readyz` | 200 ``ready`` while ``is_ready()`` is true, else 503 (readiness: keep traffic/alerts away) |

A standard-library ``ThreadingHTTPServer`` runs in a daemon thread, so a slow scrape never blocks a probe.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)


class BindError(OSError):
    """The server cannot listen on ``bind:port`` (taken, not a local address, no permission); ``bind`` and ``port``
    say which, ``errno`` and ``strerror`` are the socket error's. One line, for the CLI to report."""

    def __init__(self, bind: str, port: int, exc: OSError) -> None:
        host = f"[{bind}]" if ":" in bind else bind or "*"
        super().__init__(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        self.bind, self.port = bind, port

    def __str__(self) -> str:
        return str(self.strerror)


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``bind:port`` (``port=0`` picks a free port).

    At most ``max_connections`` at a time, a socket read waiting at most ``request_timeout_s``: a thread per idle
    connection (slowloris) had exhausted the process's threads. When all are taken, a new connection (the kubelet's
    probe, say) takes the place of the oldest one that has not sent its request yet."""

    def __init__(self, registry: CollectorRegistry, bind: str = "0.0.0.0", port: int = 9308,
                 is_alive: Callable[[], bool] = lambda: True,
                 is_ready: Callable[[], bool] = lambda: True, max_connections: int = 64,
                 request_timeout_s: float = 10.0) -> None:
        self.registry = registry
        self.max_connections, self.request_timeout_s = max_connections, request_timeout_s
        self.bind = bind
        self._requested_port = port
        self.is_alive = is_alive
        self.is_ready = is_ready
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one the OS picked when constructed with ``port=0``); needs :meth:`start`."""
        if self._server is None:
            raise RuntimeError("HealthServer.port is known only after start()")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for clients, e.g. ``http://127.0.0.1:9308`` (loopback when bound to all interfaces)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind, self.bind)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        """Bind the socket and serve in a background thread. Raises :class:`BindError` (an ``OSError``) if the port
        is taken or ``bind`` is not an address of this host."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        server_cls = _IPv6Server if ":" in self.bind else _Server
        try:
            self._server = server_cls((self.bind, self._requested_port), _handler_class(self), self.max_connections)
        except OSError as exc:
            raise BindError(self.bind, self._requested_port, exc) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"anomalyd-http-{self.port}", daemon=True)
        self._thread.start()
        everywhere = self.bind in ("0.0.0.0", "::", "")  # the URL is then this host's loopback address
        log.info("HTTP server listening on %s (/metrics, /healthz, /readyz)%s", self.url,
                 f"; bound to {self.bind or '0.0.0.0'}, all interfaces" if everywhere else "")
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple, handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connections without a request yet: monotonic accept time

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # all taken: end the oldest that sent no request yet
            self._drop_oldest_waiting()
            if not self._slots.acquire(timeout=1.0):
                self.shutdown_request(request)
                return
        with self._lock:
            self._waiting[request] = time.monotonic()
        try:
            super().process_request(request, client_address)  # starts the thread, which releases the slot
        except BaseException:
            self.request_read(request)
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.request_read(request)
            self._slots.release()

    def request_read(self, request) -> None:
        """The connection sent its request (or ended): no longer one to drop for a newcomer."""
        with self._lock:
            self._waiting.pop(request, None)

    def _drop_oldest_waiting(self) -> None:
        with self._lock:
            if not self._waiting:
                return
            oldest = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)  # its thread's read fails, it ends and frees the slot
        except OSError:
            pass


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _handler_class(owner: HealthServer) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to ``owner`` (http.server instantiates one per request)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "anomalyd"
        timeout = owner.request_timeout_s  # the socket's: a connection that sends nothing is dropped

        def parse_request(self) -> bool:
            ok = super().parse_request()  # reads the headers too
            self.server.request_read(self.request)  # request line and headers read: not dropped for a newcomer
            return ok

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                try:
                    body = encoder(owner.registry)
                except Exception as exc:  # a collector that raises (a GPU gauge's callback): a 500, not a hang-up
                    log.warning("metrics scrape failed: %r", exc)
                    self._send(500, f"metrics collection failed: {exc!r}\n".encode())
                    return
                self._send(200, body, content_type)
            elif path == "/healthz":
                self._probe(owner.is_alive, b"ok\n", b"not alive\n")
            elif path == "/readyz":
                self._probe(owner.is_ready, b"ready\n", b"not ready\n")
            else:
                self._send(404, b"not found; try /metrics, /healthz or /readyz\n")

        def _probe(self, check: Callable[[], bool], ok: bytes, failed: bytes) -> None:
            try:
                healthy = bool(check())
            except Exception as exc:  # a broken check reports unhealthy instead of killing the request
                log.warning("health check %s raised %r", self.path, exc)
                healthy, failed = False, f"check failed: {exc!r}\n".encode()
            self._send(200 if healthy else 503, ok if healthy else failed)

        def do_HEAD(self) -> None:  # noqa: N802 - GET's status and headers, no body
            self._head_only = True
            self.do_GET()

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not getattr(self, "_head_only", False):
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base-class signature)
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
