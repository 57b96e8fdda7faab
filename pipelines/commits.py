"""The daemon's offset commits: what is processed, each with its partition's window-rebuild floor in the metadata.

The floor is the lowest source offset still inside some stream's window on the partition; the member that gets
the partition next seeks there and replays up to the committed offset (:mod:`pipelines.positions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from .metrics import Metrics
from .poll_ahead import PollAhead
from .positions import Positions
from .routes import RouteState
from .source import Source, TopicPartition

__all__ = ["Committer", "Offsets"]

log = logging.getLogger("anomalyd")

Offsets = dict[TopicPartition, tuple[int, str]]  # {tp: (next offset, metadata)}


class Committer:
    """Commits processed offsets through ``source`` (and, with poll ahead, where librdkafka cannot hold a commit
    back for ever: :meth:`PollAhead.commit`); a failed commit is counted and logged, the records stay uncommitted."""

    def __init__(self, positions: Positions, metrics: Metrics) -> None:
        self.positions, self.metrics = positions, metrics
        self.source: Source | None = None  # set once the daemon has its consumer
        self.ahead: PollAhead | None = None
        self.last_commit = 0.0  # monotonic time of the last commit attempt

    def offsets(self, routes: Sequence[RouteState]) -> Offsets:
        """Everything processed so far, with the window-rebuild floors of ``routes``."""
        floors = np.full(len(self.positions.tps), -1, dtype=np.int64)
        for route in routes:
            f = route.rebuild_floor(len(self.positions.tps))
            floors = np.where((floors < 0) | ((f >= 0) & (f < floors)), f, floors)
        return self.positions.commit_offsets(floors)

    def commit(self, offsets: Offsets, in_rebalance: bool = False) -> None:
        if self.ahead is not None:
            self.ahead.commit(self._commit_now, offsets, in_rebalance)
        else:
            self._commit_now(offsets, in_rebalance)

    def _commit_now(self, offsets: Offsets, in_rebalance: bool = False) -> None:
        self.last_commit, t0 = time.monotonic(), time.perf_counter()
        try:
            (self.source.commit_in_rebalance if in_rebalance else self.source.commit)(offsets)
            for tp, (nxt, _meta) in offsets.items():  # records processed since stay uncommitted
                if self.positions.uncommitted.get(tp) == nxt:
                    del self.positions.uncommitted[tp]
            self.metrics.observe_commit(time.perf_counter() - t0, ok=True)
        except Exception as exc:  # e.g. a rebalance in progress: records will be redelivered
            self.metrics.observe_commit(time.perf_counter() - t0, ok=False)
            log.warning("offset commit failed (records will be redelivered): %s", exc)
