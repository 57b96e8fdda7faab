"""The scoring thread of processing.score_in_background (pipelines.scoring_worker): one micro-batch in flight,
its offsets handed back only once its job succeeded."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.scoring_threads import ScoringThreads
from pipelines.scoring_worker import ScoringWorker
from pipelines.sinks import SinkError


@pytest.fixture
def worker():
    w = ScoringWorker()
    yield w
    w.close()


def test_a_job_runs_on_the_scoring_thread_and_its_offsets_come_back_from_wait(worker):
    ran_on, release = [], threading.Event()

    def job() -> None:
        release.wait(5)
        ran_on.append(threading.current_thread().name)

    assert worker.wait() is None and not worker.busy  # nothing in flight
    worker.submit(job, windows=10, offsets={"tp": (42, "meta")})
    assert worker.busy and not worker.done()  # handed over, still running
    release.set()
    assert worker.wait() == {"tp": (42, "meta")}
    assert ran_on and ran_on[0].startswith("anomalyd-score")
    assert not worker.busy and worker.wait() is None


def test_a_failed_job_returns_no_offsets_and_the_worker_takes_the_next_one(worker):
    def fails() -> None:
        raise SinkError("alertmanager down")

    worker.submit(fails, windows=1, offsets={"tp": (7, "")})
    with pytest.raises(SinkError, match="alertmanager down"):
        worker.wait()  # the caller commits nothing
    assert not worker.busy
    worker.submit(lambda: None, windows=1, offsets={"tp": (9, "")})
    assert worker.wait() == {"tp": (9, "")}


def test_a_second_micro_batch_is_refused_until_the_first_was_waited_for(worker):
    worker.submit(lambda: None, windows=1, offsets=None)
    deadline = time.monotonic() + 5
    while not worker.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worker.done() and worker.busy  # finished, but its outcome not yet taken
    with pytest.raises(RuntimeError, match="still in flight"):
        worker.submit(lambda: None, windows=1, offsets=None)
    assert worker.wait() is None


def test_the_adaptive_thread_count_sees_the_jobs_and_the_loops_waits():
    """The job runs inside ScoringThreads.scoring on the scoring thread, and the loop's wait is accounted: a loop
    that waited for a slow micro-batch makes the next one run with more intra-op threads."""
    applied: list[tuple[str, int]] = []
    threads = ScoringThreads(2, period_s=0.0, apply=lambda n: applied.append((threading.current_thread().name, n)))
    w = ScoringWorker(threads)
    try:
        w.submit(lambda: time.sleep(0.05), windows=100, offsets=None)
        w.wait()  # the loop waits about 50 ms for it
        w.submit(lambda: None, windows=100, offsets=None)
        w.wait()
        assert threads.threads == 2
        assert [n for _, n in applied] == [1] and applied[0][0].startswith("anomalyd-score")
        w.submit(lambda: None, windows=100, offsets=None)  # the new count is applied on the scoring thread
        w.wait()
        assert [n for _, n in applied] == [1, 2]
        assert all(name.startswith("anomalyd-score") for name, _ in applied)
    finally:
        w.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names: Linux /proc")
def test_the_scoring_thread_carries_its_name_in_the_kernel(worker):
    """top -H, py-spy and benchmarks.cpu_sampler show "anomalyd-score", not the process's name."""
    names = []
    worker.submit(lambda: names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text()),
                  windows=1, offsets=None)
    worker.wait()
    assert names == ["anomalyd-score\n"]
