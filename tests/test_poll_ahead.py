"""PollAhead: polls on the helper thread, the callbacks they trigger on the loop thread, errors raised in take()."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from pipelines.poll_ahead import PollAhead
from pipelines.source import RecordBatch


class _Client:
    """A poll that, like librdkafka's, runs the rebalance callback inside itself on the calling thread."""

    def __init__(self, ahead: PollAhead, fail_callback: bool = False) -> None:
        self.poll_threads: list[str] = []
        self.callback_threads: list[str] = []
        self.order: list[str] = []
        self.fail_callback = fail_callback
        self.on_revoke = ahead.wrap(self._on_revoke)

    def _on_revoke(self, tps: list) -> None:
        self.callback_threads.append(threading.current_thread().name)
        self.order.append(f"revoke {tps}")
        if self.fail_callback:
            raise ValueError("commit failed in the callback")

    def poll(self, n: int, rebalance: bool = False) -> RecordBatch:
        self.poll_threads.append(threading.current_thread().name)
        if rebalance:
            self.on_revoke([("t", 0)])
        self.order.append(f"poll {n}")
        batch = RecordBatch.empty()
        batch.value.extend([b"x"] * n)
        return batch


def test_polls_run_on_the_helper_and_their_callbacks_on_the_loop_thread():
    ahead = PollAhead()
    client = _Client(ahead)
    try:
        ahead.submit(client.poll, 3)
        assert ahead.in_flight
        with pytest.raises(RuntimeError, match="already in flight"):
            ahead.submit(client.poll, 1)
        assert len(ahead.take()) == 3 and not ahead.in_flight
        ahead.submit(client.poll, 2, True)
        client.order.append("loop works meanwhile")  # the callback waits for take(): state stays single-threaded
        assert len(ahead.take()) == 2
        client.on_revoke([("t", 1)])  # called on the loop thread itself (the loop's own poll, close): runs directly
    finally:
        ahead.close()
    assert client.poll_threads == ["anomalyd-poll", "anomalyd-poll"]
    me = threading.current_thread().name
    assert client.callback_threads == [me, me]
    assert client.order == ["poll 3", "loop works meanwhile", "revoke [('t', 0)]", "poll 2", "revoke [('t', 1)]"]


def test_errors_of_the_poll_and_of_its_callbacks_are_raised_by_take():
    ahead = PollAhead()
    client = _Client(ahead, fail_callback=True)

    def refused(_n: int) -> RecordBatch:
        raise PermissionError("login refused")

    try:
        ahead.submit(refused, 1)
        with pytest.raises(PermissionError, match="login refused"):
            ahead.take()
        ahead.submit(client.poll, 1, True)  # the callback's error goes back into the poll, which raises it
        with pytest.raises(ValueError, match="commit failed"):
            ahead.take()
        assert not ahead.in_flight
        with pytest.raises(RuntimeError, match="no poll in flight"):
            ahead.take()
    finally:
        ahead.close()


def test_drain_drops_the_batch_in_flight_and_close_ends_the_thread():
    ahead = PollAhead()
    client = _Client(ahead)
    ahead.submit(client.poll, 4)
    assert ahead.drain() == (4, None) and not ahead.in_flight
    assert ahead.drain() == (0, None)
    ahead.submit(lambda: (_ for _ in ()).throw(OSError("broker gone")))
    size, error = ahead.drain()  # the loop is ending: the batch is dropped, the error returned (a crash)
    assert size == 0 and isinstance(error, OSError)
    helper = [t for t in threading.enumerate() if t.name == "anomalyd-poll"]
    assert ahead.close() is None
    assert helper and not helper[0].is_alive()


def test_close_returns_the_error_of_a_callback_the_drained_poll_handed_over():
    """A revoke handed over by the poll that close() drains fails on the loop thread (its windows taken, then
    scoring failed): close() returns that error, and the daemon treats it as a crash (no shutdown commit)."""
    ahead = PollAhead()
    client = _Client(ahead, fail_callback=True)
    ahead.submit(client.poll, 4, True)
    error = ahead.close()
    assert isinstance(error, ValueError) and client.callback_threads == ["MainThread"]


def test_work_a_handed_over_callback_asks_for_runs_on_the_polling_thread_as_it_returns():
    """A synchronous commit inside a rebalance callback must run on the thread the client called it on."""
    ahead = PollAhead()
    ran: list[tuple[str, str]] = []
    serving: list[bool] = []

    def on_revoke(_tps: list) -> None:
        ahead.on_polling_thread(lambda: ran.append(("commit", threading.current_thread().name)))
        ran.append(("callback", threading.current_thread().name))
        serving.append(ahead.serving)

    wrapped = ahead.wrap(on_revoke)

    def poll() -> RecordBatch:
        wrapped([("t", 0)])
        ran.append(("poll returns", threading.current_thread().name))
        return RecordBatch.empty()

    try:
        ahead.submit(poll)
        ahead.take()
        assert not ahead.serving
        wrapped([("t", 1)])  # the loop's own poll: the work runs at once, on the loop thread
    finally:
        ahead.close()
    me = threading.current_thread().name
    assert ran == [("callback", me), ("commit", "anomalyd-poll"), ("poll returns", "anomalyd-poll"),
                   ("commit", me), ("callback", me)]
    assert serving == [True, False]


def test_commits_never_run_on_the_loop_thread_while_the_helper_polls():
    """In a handed-over callback: on the helper as it returns; while a poll is in flight: kept (newest offsets per
    partition) until take_deferred; otherwise at once."""
    ahead = PollAhead()
    made: list[tuple[dict, bool, str]] = []

    def commit_now(offsets: dict, in_rebalance: bool) -> None:
        made.append((offsets, in_rebalance, threading.current_thread().name))

    on_revoke = ahead.wrap(lambda _tps: ahead.commit(commit_now, {("t", 0): (9, "")}, True))
    release = threading.Event()

    def poll(rebalance: bool) -> RecordBatch:
        if rebalance:
            on_revoke([("t", 0)])
        release.wait(10)
        return RecordBatch.empty()

    me = threading.current_thread().name
    try:
        ahead.commit(commit_now, {("t", 0): (1, "")})
        assert made == [({("t", 0): (1, "")}, False, me)]
        ahead.submit(poll, False)
        ahead.commit(commit_now, {("t", 0): (2, ""), ("t", 1): (5, "")})
        ahead.commit(commit_now, {("t", 0): (3, "")})
        assert len(made) == 1  # kept: the helper is polling
        release.set()
        ahead.take()
        assert ahead.take_deferred() == {("t", 0): (3, ""), ("t", 1): (5, "")}
        assert ahead.take_deferred() == {}
        ahead.submit(poll, True)
        ahead.take()
    finally:
        ahead.close()
    assert made[1:] == [({("t", 0): (9, "")}, True, "anomalyd-poll")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names: Linux /proc")
def test_the_helper_thread_carries_its_name_in_the_kernel():
    """top -H, py-spy and benchmarks.cpu_sampler show "anomalyd-poll", not the process's name."""
    ahead = PollAhead()
    try:
        ahead.submit(lambda: _kernel_name_batch())
        batch = ahead.take()
        assert batch.key == ["anomalyd-poll"]
    finally:
        ahead.close()


def _kernel_name_batch() -> RecordBatch:
    batch = RecordBatch.empty()
    batch.key.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())
    batch.value.append(b"x")
    return batch
