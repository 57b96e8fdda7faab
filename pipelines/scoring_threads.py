"""Intra-op threads of the scoring thread, chosen from how busy it has been (``processing.model_threads: 0``).

With scoring on a second thread, the loop thread (poll, decode, window buffers) and the scoring thread's
intra-op threads share the CPUs. Where the model sets the pace, the scoring thread is busy nearly all the time
and every CPU should go to inference. Where the Kafka client sets the pace (large strides), the scoring thread
idles between micro-batches, and extra intra-op threads only take the loop thread's core while a batch is
scored: on 2 vCPUs, one thread was 1.16-1.19x faster than two at stride 8 with kafka-python, and two were
1.5-1.7x faster than one at stride 1 (benchmarks/RESULTS.md, item 27).

So the scoring thread uses the fewest threads that keep it from becoming the bottleneck:

* it starts with one;
* after a period (``period_s``) in which it was busy at least ``UP`` of the time with fewer than ``most``
  threads, it takes ``most``;
* after a period in which some smaller count would have kept it busy at most ``DOWN`` of the time, it takes
  the smallest such count (not sooner than ``hold_s`` after going up). That prediction scales the busy time
  by the measured cost per window at each count; a count not measured yet is assumed to scale linearly, which
  overestimates its cost, so it errs towards keeping threads.

The busy time includes delivering the batch's alerts. An idle topic counts as not busy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["ScoringThreads"]

UP = 0.8  # busy at least this much of a period (fewer than `most` threads): the model sets the pace
DOWN = 0.72  # a smaller count that would be busy at most this much of a period is enough


class ScoringThreads:
    """``with threads.scoring(n_windows): ...`` around each micro-batch, on the scoring thread."""

    def __init__(self, most: int, period_s: float = 1.0, hold_s: float = 5.0,
                 apply: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.most = max(1, int(most))
        self.threads = 1
        self.switches = 0
        self._period_s, self._hold_s = period_s, hold_s
        self._apply, self._clock, self._on_change = apply, clock, on_change
        self._applied: int | None = None  # applied on the scoring thread itself (OpenMP's count is per thread)
        self._cost: dict[int, float] = {}  # seconds per window at each thread count (moving average)
        self._since = clock()
        self._busy = 0.0
        self._windows = 0
        self._raised_at = -math.inf

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
        busy = self._busy / max(now - self._since, 1e-9)
        k = self.threads
        if self._windows:
            cost = self._busy / self._windows
            self._cost[k] = cost if k not in self._cost else 0.5 * (self._cost[k] + cost)
        self._since, self._busy, self._windows = now, 0.0, 0
        new = k
        if busy >= UP and k < self.most:
            new = self.most
            self._raised_at = now
        elif k > 1 and k in self._cost and now - self._raised_at >= self._hold_s:
            for fewer in range(1, k):
                if busy * self._cost_at(fewer) / self._cost[k] <= DOWN:
                    new = fewer
                    break
        if new != k:
            self.threads = new
            self.switches += 1
            if self._on_change is not None:
                self._on_change(new)

    def _cost_at(self, k: int) -> float:
        """Measured seconds per window at ``k`` threads, else the largest measured count's, scaled linearly."""
        if k in self._cost:
            return self._cost[k]
        ref = max(self._cost)
        return self._cost[ref] * ref / k
