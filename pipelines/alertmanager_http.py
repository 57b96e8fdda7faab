"""HTTP to Alertmanager: credentials in the URL sent as Basic auth, redirects refused, the URL shown redacted.

urllib neither uses a URL's ``user:password@`` (it tries to resolve it as part of the host name) nor keeps a
POST a POST across a 301/302/303: it follows with a GET, which Alertmanager's ``/api/v2/alerts`` answers with
200, so alerts would count as delivered while none was. A redirect is therefore an error that names where it
points, and the address to configure is that one.
"""

from __future__ import annotations

import base64
import queue
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._requests = _RequestThread()

    def open(self, path: str, timeout: float, body: bytes | None = None) -> bytes:
        """GET (no body) or POST ``body`` as JSON to ``base + path``; the response body, within ``timeout`` seconds
        in all. Raises HTTPError for 4xx/5xx, :class:`RedirectRefused` for 3xx, other OSErrors for connection
        trouble (TimeoutError when no answer came in time)."""
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=body, headers=headers,
                                         method="GET" if body is None else "POST")

        def send() -> bytes:
            with self._opener.open(request, timeout=timeout) as response:
                return response.read()

        return self._requests.call(send, timeout)


class _RequestThread:
    """Requests made on a thread of their own, one at a time and in order, waited for ``timeout`` at most:
    urllib's timeout covers the socket, not the host name's lookup, which a resolver that does not answer holds
    for tens of seconds (past a revoke's 10 s and the shutdown's grace period). A request still waiting when its
    time is up is not sent; one already under way ends on its thread (its answer is not waited for), and the
    requests after it wait for it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], bytes], Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, send: Callable[[], bytes], timeout: float) -> bytes:
        done: Future = Future()
        self._queue.put((send, done))
        with self._lock:
            if self._thread is None:  # a daemon thread: one stuck in a lookup must not hold up the exit
                self._thread = threading.Thread(target=self._run, name="alertmanager-http", daemon=True)
                self._thread.start()
        try:
            return done.result(timeout + 0.5)  # the socket's own timeout first, where it applies
        except FutureTimeout:
            why = ("waiting behind an earlier request that has not ended" if done.cancel() else
                   "still under way: a host name lookup, or a reply, that does not end")
            raise TimeoutError(f"no answer within {timeout:.1f} s ({why})") from None

    def _run(self) -> None:
        while True:
            send, done = self._queue.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(send())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)
