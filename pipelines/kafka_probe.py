"""Whether the brokers still answer while the topic is quiet.

A consumer whose brokers are gone only sees empty polls, as it does on a quiet topic, and nothing else in the
loop notices: no commit is due and the lag keeps its last value. So while no record has come for
``interval_s``, :class:`KafkaProbe` asks the leader of an assigned partition for its end offset (one round trip,
at most ``timeout_s``) every ``interval_s``; records that arrive answer the question themselves, and so does a
new assignment (the group coordinator answered). ``FAILURES`` probes in a row that fail (not one slow answer)
make the daemon not ready (``anomalyd_ready`` 0, ``AnomalydNotReady``) and set ``anomalyd_kafka_reachable`` to 0
until a probe, a record or an assignment says otherwise. With nothing assigned the probe asks about a subscribed
topic instead: an outage that took a member's partitions (the session timed out) is still an outage, while an
idle replica beyond the partition count is ready.
"""

from __future__ import annotations

import logging

from prometheus_client import Gauge

from .source import Source

__all__ = ["KafkaProbe"]

log = logging.getLogger(__name__)

FAILURES = 2  # failed probes in a row before the brokers count as unreachable


class KafkaProbe:
    """``probe.maybe(source, now, last_record)`` on the loop thread; ``probe.records()`` after a poll with records;
    ``probe.ok`` for readiness."""

    def __init__(self, gauge: Gauge, interval_s: float = 15.0, timeout_s: float = 2.0) -> None:
        self.ok = True
        self._gauge, self._interval_s, self._timeout_s = gauge, interval_s, timeout_s
        self._last_probe = float("-inf")
        self._failed = 0  # failed probes in a row
        gauge.set(1)

    def records(self) -> None:
        """A poll returned records: the brokers answer."""
        self._answered("records arrive again")

    def assigned(self) -> None:
        """The group assigned partitions (or none): the coordinator answers."""
        self._answered("the consumer group answers again")

    def maybe(self, source: Source, now: float, last_record: float) -> None:
        """Probe if neither a record nor a probe came in the last ``interval_s`` (monotonic seconds; a third of it
        while the brokers count as unreachable or a probe has failed, so that their return shows soon)."""
        every = self._interval_s if self.ok and not self._failed else self._interval_s / 3
        if now - max(last_record, self._last_probe) < every:
            return
        self._last_probe = now
        answered = source.reachable(self._timeout_s)
        if answered is None or answered:  # None: no partition known at all, nothing to ask
            self._answered("the partition leader answers again")
            return
        self._failed += 1
        if self._failed == FAILURES:
            self._set(False, f"a partition leader (of an assigned partition, else of a subscribed topic) did not "
                             f"answer {FAILURES} times in a row (within {self._timeout_s:g}s each)")

    def _answered(self, why: str) -> None:
        self._failed = 0
        if not self.ok:
            self._set(True, why)

    def _set(self, ok: bool, why: str) -> None:
        self.ok = ok
        self._gauge.set(int(ok))
        (log.info if ok else log.warning)("Kafka %s: %s", "reachable" if ok else "unreachable", why)
