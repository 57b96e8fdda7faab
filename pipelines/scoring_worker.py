"""The scoring thread of ``processing.score_in_background``: one micro-batch at a time, scored (and its alerts
delivered) on a thread of its own while the loop thread polls and decodes what follows.

Each micro-batch travels with the source offsets that its delivery frees. The loop takes them back from
:meth:`ScoringWorker.wait` once the job is done and commits them only then, so a job that fails (a SinkError)
commits nothing: at-least-once holds as in the serial path.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial

from .scoring_threads import ScoringThreads
from .thread_names import name_this_thread

__all__ = ["ScoringWorker"]


class ScoringWorker:
    """``submit(job, windows, offsets)`` one micro-batch; ``wait()`` for it and take its offsets back."""

    def __init__(self, threads: ScoringThreads | None = None) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="anomalyd-score",
                                        initializer=partial(name_this_thread, "anomalyd-score"))
        self._threads = threads  # the adaptive intra-op thread count, told when it scores and when the loop waits
        self._inflight: tuple[Future, dict | None] | None = None

    @property
    def busy(self) -> bool:
        """A micro-batch was handed over and not yet waited for (it may be done)."""
        return self._inflight is not None

    def done(self) -> bool:
        """A micro-batch is in flight and finished: :meth:`wait` will not block."""
        return self._inflight is not None and self._inflight[0].done()

    def submit(self, job: Callable[[], None], windows: int, offsets: dict | None) -> None:
        """Run ``job`` (scoring ``windows`` windows, then delivering their alerts) on the scoring thread; its
        ``offsets`` come back from :meth:`wait`. The micro-batch before must have been waited for."""
        if self._inflight is not None:
            raise RuntimeError("a micro-batch is still in flight: wait() for it first")
        self._inflight = (self._pool.submit(self._run, job, windows), offsets)

    def _run(self, job: Callable[[], None], windows: int) -> None:
        with self._threads.scoring(windows) if self._threads else nullcontext():
            job()

    def wait(self) -> dict | None:
        """Wait for the micro-batch in flight; raises its error (nothing is to be committed), else returns the
        offsets it freed (None when nothing was in flight or it freed none)."""
        if self._inflight is None:
            return None
        (future, offsets), self._inflight = self._inflight, None
        with self._threads.loop_waiting() if self._threads else nullcontext():
            future.result()
        return offsets

    def close(self) -> None:
        """Let a micro-batch in flight finish, then stop the thread."""
        self._pool.shutdown()
