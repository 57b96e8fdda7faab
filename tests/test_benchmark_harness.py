"""benchmarks.harness wraps the daemon's Kafka source; the wrapper must take every argument the daemon passes.

A commit(offsets) without the timeout the shutdown's commit passes made every pipeline and latency run end in
"daemon exit 1" (the commit failed, the offsets stayed uncommitted) after the commit gained that argument."""

from __future__ import annotations

import inspect

from benchmarks.harness import Phases, TimedSource
from pipelines.source import Source


def test_the_timed_source_takes_the_arguments_of_the_source_protocol() -> None:
    for name in ("poll", "commit"):
        ours = list(inspect.signature(getattr(TimedSource, name)).parameters)
        theirs = list(inspect.signature(getattr(Source, name)).parameters)
        assert ours == theirs, (name, ours, theirs)


def test_the_shutdown_commit_goes_through_with_its_timeout() -> None:
    calls = []

    class _Inner:  # records what reaches the client (the wrapper's own logic is what is tested)
        def poll(self, max_records, timeout_ms):
            raise AssertionError("not polled here")

        def commit(self, offsets, timeout_s=None):
            calls.append((offsets, timeout_s))

        commit_async = lag = poll

    timed = TimedSource(_Inner(), Phases())
    timed.commit({("t", 0): (5, "")}, 4.0)
    assert calls == [({("t", 0): (5, "")}, 4.0)] and timed.t_commit is not None and timed.rss_commit > 0
