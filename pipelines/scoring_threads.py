"""Intra-op threads of the scoring thread, chosen by whether it sets the pace (``processing.model_threads: 0``).

With scoring on a second thread, the loop thread (poll, decode, window buffers) and the scoring thread's
intra-op threads share the CPUs. Where the model sets the pace, the scoring thread is busy nearly all the time
and every CPU should go to inference. Where the Kafka client sets the pace (large strides), the scoring thread
idles between micro-batches, and extra intra-op threads only take the loop thread's core while a batch is
scored: on 2 vCPUs, one thread was up to 1.19x faster than two at stride 8 with kafka-python, and two were
1.5-1.9x faster than one at stride 1 (benchmarks/RESULTS.md, item 27).

Which of the two sets the pace shows in the loop thread: a micro-batch that is due while the scoring thread
is busy keeps growing, and only a full one (``processing.max_batch_windows``) makes the loop wait. So the
loop waiting for the scoring thread is the sign to add threads. The scoring thread's own busy time is not: the
rest of a micro-batch (gathering its windows, alert state, delivery) is Python, which waits for the GIL the
loop thread holds, and even the model's wall time grows when the loop thread, the Kafka client and the model
share the cores. With one thread, at stride 8 with kafka-python at 100,000 streams, the scoring thread was
busy up to 0.98 of a period and its model up to 0.87, yet the loop never waited for it, and two threads were
no faster. The loop waited 0.1-0.3 of the time with confluent-kafka at stride 8, where two threads were
faster, and 0.41-0.73 at stride 1 (RESULTS.md, item 27).

That serves throughput, while there is a backlog. Once the consumer has caught up (most polls that return
records return fewer than ``kafka.poll_max_records``), latency is what counts: a batch that falls due while
the scoring thread is busy waits for it, which happens often when it is busy much of the time. At half
capacity with confluent-kafka one thread kept up without the loop ever waiting, but ran an estimated 0.75
of the time, and the event->alert p99 was 319 ms (RESULTS.md, Latency).

So the scoring thread uses the fewest intra-op threads that keep it from setting the pace:

* it starts with one;
* after a period (``period_s``) in which the loop thread waited for it at least ``WAIT_UP`` of the time, or,
  caught up, its model ran at least ``LIVE_UP`` of the time, it takes ``most`` (if it had fewer);
* after a period in which neither held, and in which some smaller count would have kept the model running
  at most ``DOWN`` of the time (``LIVE_DOWN`` when caught up), it takes the smallest such count (not sooner
  than ``hold_s`` after going up). That prediction scales the model's time by its measured seconds per window
  at each count; a count not measured yet is assumed to scale linearly, which overestimates its time, so it
  errs towards keeping threads.

A load near the boundary can make those two rules alternate: the smaller count looks enough by the model's
time, then the loop waits for it (the rest of a micro-batch grows too), and the count goes up again. Each switch
costs a period at the wrong count, so a rise that comes less than the hold after a fall doubles the hold (up to
``MAX_HOLD_FACTOR`` times ``hold_s``), and a rise after a fall that lasted the hold halves it again.

An idle topic counts as the model not running, and as caught up.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from detector.device import inference_threads

__all__ = ["ScoringThreads"]

log = logging.getLogger(__name__)

WAIT_UP = 0.05  # the loop thread waited for the scoring thread this much of a period: it sets the pace
DOWN = 0.75  # a smaller count with which the model would run at most this much of a period is enough
LIVE_UP = 0.5  # caught up: the model ran this much of a period, so due micro-batches often wait for it
LIVE_DOWN = 0.4  # caught up: a smaller count is enough when the model would run at most this much
MAX_HOLD_FACTOR = 64  # repeated flips stretch the hold to at most this many times hold_s


class ScoringThreads:
    """``with threads.scoring(n_windows): ...`` around each micro-batch, on the scoring thread, with
    :meth:`add_model_seconds` for the model's part of it; :meth:`loop_waiting` and :meth:`polled` on the loop
    thread."""

    def __init__(self, most: int, period_s: float = 0.5, hold_s: float = 5.0,
                 apply: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.most = max(1, int(most))
        self.threads = 1
        self.switches = 0
        self._period_s, self._base_hold_s = period_s, hold_s
        self.hold_s = hold_s  # the current hold: stretched by flips, see the module docstring
        self._apply, self._clock, self._on_change = apply, clock, on_change
        self._applied: int | None = None  # applied on the scoring thread itself (OpenMP's count is per thread)
        self._cost: dict[int, float] = {}  # seconds per window at each thread count (moving average)
        self._since = clock()
        self._busy = 0.0  # the scoring thread's wall time in micro-batches, this period
        self._model = 0.0  # the model's part of it
        self._windows = 0
        self._waited = 0.0  # the loop thread's waits for the scoring thread, ever (written by the loop thread only)
        self._waited_seen = 0.0
        self._polls = [0, 0]  # polls and full polls, ever (written by the loop thread only)
        self._polls_seen = (0, 0)
        self._raised_at = -math.inf
        self._lowered_at = -math.inf

    @classmethod
    def configure(cls, device: torch.device, model_threads: int, background: bool,
                  report: Callable[[int], None]) -> ScoringThreads | None:
        """Apply ``processing.model_threads`` to this thread (the loop's, which scores serial flushes); for 0
        with the scoring thread (``background``) on more than one CPU, the adaptive policy for that thread.
        ``report`` gets the count now and at each change (the ``anomalyd_inference_threads`` gauge)."""
        threads = inference_threads(model_threads) if device.type == "cpu" or model_threads else None
        if threads:
            torch.set_num_threads(threads)
        adaptive = cls(threads, on_change=report) if background and not model_threads and (threads or 0) > 1 else None
        report(adaptive.threads if adaptive else torch.get_num_threads())
        log.info("inference on %s, %s intra-op threads", device,
                 f"1 to {threads} (adaptive)" if adaptive else torch.get_num_threads())
        return adaptive

    @contextmanager
    def loop_waiting(self) -> Iterator[None]:
        """Around the loop thread's wait for the scoring thread to finish a micro-batch."""
        t0 = self._clock()
        try:
            yield
        finally:
            self.loop_waited(self._clock() - t0)

    def loop_waited(self, seconds: float) -> None:
        """The loop thread waited ``seconds`` for the scoring thread to finish a micro-batch."""
        self._waited += seconds

    def polled(self, full: bool) -> None:
        """The loop thread polled records; ``full``: ``kafka.poll_max_records`` of them (a backlog)."""
        self._polls = [self._polls[0] + 1, self._polls[1] + full]

    def add_model_seconds(self, seconds: float) -> None:
        """The model's forward pass took ``seconds`` of the current micro-batch."""
        self._model += seconds

    @contextmanager
    def scoring(self, windows: int) -> Iterator[int]:
        """Run one micro-batch of ``windows`` windows with the current count (yielded), then account for it."""
        if self._applied != self.threads:
            self._apply(self.threads)
            self._applied = self.threads
        t0 = self._clock()
        try:
            yield self.threads
        finally:
            now = self._clock()
            self._busy += now - t0
            self._windows += windows
            if now - self._since >= self._period_s:
                self._decide(now)

    def _decide(self, now: float) -> None:
        elapsed = max(now - self._since, 1e-9)
        waited_s, self._waited_seen = self._waited - self._waited_seen, self._waited
        polls = self._polls  # one read: the loop thread replaces the list
        n_polls, n_full = polls[0] - self._polls_seen[0], polls[1] - self._polls_seen[1]
        self._polls_seen = (polls[0], polls[1])
        caught_up = n_full * 2 < n_polls or not n_polls
        busy, model, waited = self._busy / elapsed, self._model / elapsed, waited_s / elapsed
        k = self.threads
        if self._windows:
            cost = self._model / self._windows
            self._cost[k] = cost if k not in self._cost else 0.5 * (self._cost[k] + cost)
        self._since, self._busy, self._model, self._windows = now, 0.0, 0.0, 0
        new = k
        if waited >= WAIT_UP or (caught_up and model >= LIVE_UP):
            if k < self.most:
                new = self.most
                self._raised_at = now
                self._stretch_hold(now)
        elif k > 1 and self._cost.get(k) and now - self._raised_at >= self.hold_s:
            enough = LIVE_DOWN if caught_up else DOWN
            for fewer in range(1, k):
                if model * self._cost_at(fewer) / self._cost[k] <= enough:
                    new = fewer
                    break
        log.debug("scoring thread: busy %.2f, model %.2f, loop waited %.2f, %s, %d intra-op threads (%.1f us/window): "
                  "%d", busy, model, waited, "caught up" if caught_up else "backlog", k, 1e6 * self._cost.get(k, 0.0),
                  new)
        if new < k:
            self._lowered_at = now
        if new != k:
            self.threads = new
            self.switches += 1
            if self._on_change is not None:
                self._on_change(new)

    def _stretch_hold(self, now: float) -> None:
        """Going up at ``now``: double the hold if the last fall did not last it, else halve it (not below
        ``hold_s``)."""
        if now - self._lowered_at < self.hold_s:
            self.hold_s = min(2 * self.hold_s, MAX_HOLD_FACTOR * self._base_hold_s)
        else:
            self.hold_s = max(self._base_hold_s, self.hold_s / 2)

    def _cost_at(self, k: int) -> float:
        """The model's measured seconds per window at ``k`` threads, else the largest measured count's, scaled
        linearly."""
        if k in self._cost:
            return self._cost[k]
        ref = max(self._cost)
        return self._cost[ref] * ref / k
