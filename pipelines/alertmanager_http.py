"""HTTP to Alertmanager: credentials in the URL sent as Basic auth, redirects refused, the URL shown redacted.

urllib neither uses a URL's ``user:password@`` (it tries to resolve it as part of the host name) nor keeps a
POST a POST across a 301/302/303: it follows with a GET, which Alertmanager's ``/api/v2/alerts`` answers with
200, so alerts would count as delivered while none was. A redirect is therefore an error that names where it
points, and the address to configure is that one.
"""

from __future__ import annotations

import base64
import http.client
import io
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

__all__ = ["AlertmanagerHTTP", "RedirectRefused", "redacted"]


class RedirectRefused(OSError):
    """Alertmanager's URL answered with a redirect (3xx); configure the address it points to instead."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        fp.close()
        raise RedirectRefused(f"HTTP {code} redirect to {redacted(newurl)}: set sinks.alertmanager.url to the "
                              f"address it points to (a redirected POST is re-sent as a GET by urllib)")


def _host_port(parts: urllib.parse.SplitResult) -> str:
    """``host[:port]`` of a URL without its credentials (an IPv6 address in brackets)."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host if parts.port is None else f"{host}:{parts.port}"


def redacted(url: str) -> str:
    """``url`` with its password masked (the credentials as urllib parses them: up to the last ``@``). Where an
    ``@`` lies past what urllib takes for the host (a ``/``, ``?`` or ``#`` in the password; no scheme), all
    before the last ``@`` is masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            user = urllib.parse.unquote(parts.username or "")
            return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{_host_port(parts)}"))
    except ValueError:  # not a URL urllib can take apart (a bad port)
        pass
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


class AlertmanagerHTTP:
    """Requests to the Alertmanager at ``url`` (``http[s]://[user:password@]host[:port][/prefix]``)."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        self.headers: dict[str, str] = {}
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
            parts = parts._replace(netloc=_host_port(parts))
        self.base = urllib.parse.urlunsplit(parts)  # without the credentials
        self.shown = redacted(url.rstrip("/"))  # for messages and logs
        self._sending = threading.Event()  # set once the request under way is given up (its caller's time ran out)
        given_up = lambda: self._sending.is_set()  # noqa: E731 - the request now on the request thread's
        self._opener = urllib.request.build_opener(_NoRedirect, _Handler(given_up), _TLSHandler(given_up))
        self._requests = _RequestThread()

    def open(self, path: str, timeout: float, body: bytes | None = None) -> bytes:
        """GET (no body) or POST ``body`` as JSON to ``base + path``; the response body, within ``timeout`` seconds
        in all. Raises HTTPError for 4xx/5xx, :class:`RedirectRefused` for 3xx, other OSErrors for connection
        trouble (TimeoutError when no answer came in time: a request given up is never sent after that)."""
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=body, headers=headers,
                                         method="GET" if body is None else "POST")

        abandoned = threading.Event()  # this request's

        def send() -> bytes:
            self._sending = abandoned  # requests run one at a time, on the request thread
            started = time.monotonic()
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:  # its body (the reason) read here, within the request's time
                reason = _error_body(exc, started + timeout, abandoned)
                raise urllib.error.HTTPError(exc.url, exc.code, exc.msg, exc.hdrs, io.BytesIO(reason)) from None

        return self._requests.call(send, timeout, abandoned)


def _error_body(exc: urllib.error.HTTPError, deadline: float, abandoned: threading.Event, limit: int = 1000) -> bytes:
    """Up to ``limit`` bytes of an error reply's body until ``deadline``: what came of one that trickles, breaks
    off or is cut short (a body read in full, on the caller's thread, had held a flush past its deadline, and a
    failed read had escaped the retries)."""
    out = b""
    try:
        while len(out) < limit and time.monotonic() < deadline and not abandoned.is_set():
            chunk = exc.fp.read1(limit - len(out))
            if not chunk:
                break
            out += chunk
    except (OSError, http.client.HTTPException, AttributeError, ValueError):  # reset, incomplete, no body
        pass
    finally:
        exc.close()
    return out


class _AbandonableHTTP(http.client.HTTPConnection):
    """A connection that sends nothing once its request is given up: the check comes after the host name's lookup
    and the connect (and TLS), which may take longer than the caller waited, and before the request is written.
    A post sent late (firing alerts of a partition revoked meanwhile) would re-open what the next owner resolved."""

    def __init__(self, *args: Any, given_up: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given_up = given_up

    def connect(self) -> None:
        super().connect()
        if self._given_up():
            self.close()
            raise TimeoutError("given up before it was sent: its caller's time ran out")


class _AbandonableHTTPS(_AbandonableHTTP, http.client.HTTPSConnection):
    pass


class _Handler(urllib.request.HTTPHandler):
    def __init__(self, given_up: Callable[[], bool]) -> None:
        super().__init__()
        self._given_up = given_up

    def http_open(self, req: Any) -> Any:
        return self.do_open(partial(_AbandonableHTTP, given_up=self._given_up), req)


class _TLSHandler(urllib.request.HTTPSHandler):
    def __init__(self, given_up: Callable[[], bool]) -> None:
        super().__init__()
        self._given_up = given_up

    def https_open(self, req: Any) -> Any:
        return self.do_open(partial(_AbandonableHTTPS, given_up=self._given_up), req, context=self._context)


class _RequestThread:
    """Requests made on a thread of their own, one at a time and in order, waited for ``timeout`` at most:
    urllib's timeout covers the socket, not the host name's lookup, which a resolver that does not answer holds
    for tens of seconds (past a revoke's 10 s and the shutdown's grace period). A request still waiting when its
    time is up is not sent; one already under way is given up (``abandoned``: it sends nothing after that) and
    ends on its thread, and the requests after it wait for it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], bytes], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, send: Callable[[], bytes], timeout: float, abandoned: threading.Event) -> bytes:
        done: Future = Future()
        self._queue.put((send, done))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # a daemon thread: one stuck in a lookup
                thread = threading.Thread(target=self._run, name="alertmanager-http", daemon=True)  # must not
                thread.start()  # hold up the exit
                self._thread = thread
        try:
            return done.result(timeout)  # the socket's own timeouts are ``timeout`` each: all of it, not more
        except FutureTimeout:
            if done.cancel():
                raise TimeoutError(f"no answer within {timeout:.1f} s (waiting behind an earlier request that has "
                                   "not ended)") from None
            abandoned.set()
            if done.done():  # it ended just now
                return done.result()
            raise TimeoutError(f"no answer within {timeout:.1f} s (still under way: a host name lookup, or a reply, "
                               "that does not end; given up, it sends nothing now)") from None

    def _run(self) -> None:
        while True:
            send, done = self._queue.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(send())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)
