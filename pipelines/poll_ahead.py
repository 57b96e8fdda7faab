"""The next poll on a second thread while the loop processes the last one (``kafka.poll_ahead``, confluent only).

A backlogged consumer spends its loop thread in two halves: the client's poll (librdkafka hands over messages,
Python builds the batch's columns) and the daemon's processing (decoding, routing, window buffers). With poll
ahead, the loop starts poll k+1 on a helper thread right after poll k returned *full* (a backlog: the next one
returns at once too), then processes batch k; the parts of each half that run without the GIL (librdkafka's
own work, the native decoder, the window kernel) overlap. Otherwise (a poll that came back short: the
consumer has caught up) the loop polls itself, with the timeout it computes from its pending windows, as before.

Nothing else changes: the client's rebalance callbacks, which librdkafka runs inside poll on the polling
thread, are handed to the loop thread and run there while the helper waits, so every piece of the daemon's
state is still touched by one thread only; seeks and ``committed`` lookups happen while no poll is in flight.
Commits need care: librdkafka holds a synchronous commit back while a rebalance callback is running, so a
commit made on the loop thread while the helper sits in that callback would wait for ever. :meth:`commit` runs
a commit inside a handed-over callback on the helper as the callback returns (the loop is still waiting in
:meth:`take` then), keeps one made while a poll is in flight until :meth:`take_deferred` (after the poll is
back), and makes any other at once.
A polled batch that the loop never takes (shutdown, a crash) is not processed and so not committed: the next
owner reads it again. kafka-python's consumer is not thread-safe and keeps the serial loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from .source import RecordBatch
from .thread_names import name_this_thread

__all__ = ["PollAhead"]

_DONE, _CALL = 0, 1


class _Call:
    """A callback handed from the helper thread to the loop thread; the helper waits for ``done``."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.then: list[tuple[Callable[..., Any], tuple]] = []  # run by the helper once the callback is done


class PollAhead:
    """One helper thread for ``poll``; made on the loop thread, which :meth:`take` and :meth:`drain` run on.

    ``wrap(callback)`` makes a rebalance callback that runs on the loop thread whichever thread calls it."""

    def __init__(self) -> None:
        self._loop_thread = threading.get_ident()
        self._events: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._in_flight = False
        self._work: queue.SimpleQueue[tuple[Callable[..., RecordBatch], tuple] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._serving: _Call | None = None  # the helper's callback the loop thread is running
        self._deferred: dict = {}  # offsets to commit once no poll is in flight
        self._closed = False

    @property
    def in_flight(self) -> bool:
        return self._in_flight

    @property
    def serving(self) -> bool:
        """Whether the loop thread is inside a callback that a poll on the helper handed over."""
        return self._serving is not None

    def commit(self, commit_now: Callable[[dict, bool], None], offsets: dict, in_rebalance: bool = False) -> None:
        """``commit_now(offsets, in_rebalance)`` where it cannot wait for ever (see the module's docstring)."""
        if self._serving is not None:
            self.on_polling_thread(commit_now, offsets, in_rebalance)
        elif self._in_flight:
            self._deferred.update(offsets)  # newer offsets of a partition replace older ones
        else:
            commit_now(offsets, in_rebalance)

    def take_deferred(self) -> dict:
        """The offsets :meth:`commit` kept while a poll was in flight (cleared): commit them with none in flight."""
        offsets, self._deferred = self._deferred, {}
        return offsets

    def on_polling_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the thread the client called the current callback on: on the helper as that
        callback returns (while the loop still waits in :meth:`take`), or now when it is the loop thread."""
        if self._serving is None:
            fn(*args)
        else:
            self._serving.then.append((fn, args))

    def wrap(self, callback: Callable[..., None]) -> Callable[..., None]:
        def on_loop_thread(*args: Any) -> None:
            # the loop's own poll or close(); or, once this is closed, a close() the loop waits for on a thread of
            # its own (ConfluentSource.close with a timeout): nobody would take the callback
            if threading.get_ident() == self._loop_thread or self._closed:
                callback(*args)
                return
            call = _Call(callback, args)
            self._events.put((_CALL, call))
            call.done.wait()
            for fn, fn_args in call.then:
                fn(*fn_args)
            if call.error is not None:  # raised inside the client's poll, which raises it to the loop (take)
                raise call.error

        return on_loop_thread

    def submit(self, poll: Callable[..., RecordBatch], *args: Any) -> None:
        """Start ``poll(*args)`` on the helper thread; at most one poll is in flight."""
        if self._in_flight:
            raise RuntimeError("a poll is already in flight")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="anomalyd-poll", daemon=True)
            self._thread.start()
        self._in_flight = True
        self._work.put((poll, args))

    def take(self) -> RecordBatch:
        """The batch of the poll in flight (its error raised here), running the callbacks it hands over."""
        if not self._in_flight:
            raise RuntimeError("no poll in flight")
        while True:
            kind, item = self._events.get()
            if kind == _CALL:
                self._serving = item
                try:
                    item.fn(*item.args)
                except BaseException as exc:  # noqa: BLE001 - handed back to the client's poll
                    item.error = exc
                finally:
                    self._serving = None
                    item.done.set()
                continue
            self._in_flight = False
            batch, error = item
            if error is not None:
                raise error
            return batch

    def drain(self) -> tuple[int, Exception | None]:
        """Wait for the poll in flight and drop its batch (not processed, so not committed). Returns its size and
        its error: that poll's, or that of a rebalance callback it handed over (which may have left the daemon's
        state half changed: the caller treats it as a crash, and commits nothing)."""
        if not self._in_flight:
            return 0, None
        try:
            return len(self.take()), None
        except Exception as exc:  # noqa: BLE001 - returned: the loop is ending
            return 0, exc

    def close(self) -> Exception | None:
        """Drain, then end the helper thread; callbacks run on the thread that calls them from now on. Returns the
        drained poll's error (:meth:`drain`)."""
        _, error = self.drain()
        self._closed = True
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None
        return error

    def _serve(self) -> None:
        name_this_thread()  # "anomalyd-poll" in top -H, py-spy, benchmarks.cpu_sampler
        while (job := self._work.get()) is not None:
            poll, args = job
            try:
                self._events.put((_DONE, (poll(*args), None)))
            except BaseException as exc:  # noqa: BLE001 - the loop raises it in take()
                self._events.put((_DONE, (None, exc)))
