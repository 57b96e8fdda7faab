"""The sink contract: every sink buffers with :meth:`Sink.add` and delivers with :meth:`Sink.flush`, which returns
only once the alerts are acknowledged (producer flush, HTTP 2xx) and raises :class:`SinkError` otherwise.  The daemon
commits a batch's offsets only after ``flush`` returned, so an alert may be delivered twice (same id) but never
lost; alerts that failed stay buffered and are retried by the next ``flush``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence

from pipelines.alert_message import FIRING, Alert

__all__ = ["Sink", "SinkBackingOff", "SinkError", "without_firing_of"]


class SinkError(RuntimeError):
    """Alerts could not be delivered (after retries); the caller must not commit their offsets."""


class SinkBackingOff(SinkError):
    """A flush refused without a request: a backoff after a failed one has not passed (not a failure of its own)."""


class Sink(ABC):
    """Somewhere alerts go; ``name`` identifies it in errors."""

    name = "sink"
    background_delivery = False  # its messages travel in the background (a producer's queue), not only in flush

    @abstractmethod
    def add(self, alerts: Sequence[Alert]) -> None:
        """Queue alerts for delivery (never raises for delivery problems; flush reports them)."""

    @abstractmethod
    def flush(self, timeout_s: float) -> int:
        """Deliver everything queued within ``timeout_s`` seconds or raise :class:`SinkError`; returns how many
        alerts it delivered (0: it had nothing to do)."""

    def forget_streams(self, streams: Iterable[str],  # noqa: B027 - optional hook
                       revoked: Collection[tuple[str, int]] = ()) -> None:
        """The daemon no longer tracks these streams: idle (their incidents resolved), or gone with the ``revoked``
        partitions (topic, partition) to another owner; drop any per-stream sink state."""

    def adopt(self, alerts: Sequence[Alert]) -> None:  # noqa: B027 - optional hook
        """These ``firing`` alerts were delivered by the previous owner of their partitions, and their incidents
        continue here: a sink that re-sends active alerts takes them on (nothing is sent again otherwise)."""

    def flush_due(self, now: float) -> bool:
        """Whether a :meth:`flush` has work of the sink's own at monotonic time ``now`` (a re-post), even with
        nothing new added: the daemon flushes a quiet topic's sinks for it."""
        return False

    def retry_now(self) -> None:  # noqa: B027 - optional hook
        """The next flush tries at once, whatever backoff a failure started (the shutdown's last flush)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (does not flush)."""



def without_firing_of(alerts: list[Alert], revoked: Collection[tuple[str, int]]) -> list[Alert]:
    """``alerts`` less the firing ones whose records lie on a ``revoked`` (topic, partition)."""
    if not revoked:
        return alerts
    gone = set(revoked)
    return [a for a in alerts if a.status != FIRING or (a.source.get("topic"), a.source.get("partition")) not in gone]
