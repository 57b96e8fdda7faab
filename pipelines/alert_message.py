"""An alert: one state change (``firing`` or ``resolved``) of an incident, as the sinks send it (JSON), with its
deterministic id (:func:`alert_id`). Made by :class:`pipelines.alerts.AlertTracker`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FIRING", "RESOLVED", "Alert", "alert_id"]

FIRING = "firing"
RESOLVED = "resolved"


def alert_id(stream: str, model: str, topic: str, partition: int, offset: int) -> str:
    """Deterministic incident id (32 hex chars) from the stream, model label and first anomalous window."""
    key = "\x1f".join((stream, model, topic, str(int(partition)), str(int(offset))))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Alert:
    """One state change (``firing`` or ``resolved``) of an incident; JSON-serialisable.

    ``peak_score`` is normalised (1.0 = threshold); ``threshold`` is the model's raw threshold (1.0
    for a combined route); times are event-time epoch milliseconds (``ended_at`` = the window that
    resolved it); ``source`` is ``{"topic", "partition", "first_offset", "last_offset"}``;
    ``top_features`` are ``(feature, share)`` pairs whose shares sum to at most 1.
    """

    id: str
    status: str
    stream: str
    model: str
    model_version: str
    started_at: int
    ended_at: int | None
    peak_score: float
    threshold: float
    models_over: list[str] = field(default_factory=list)
    top_features: list[tuple[str, float]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (``top_features`` as ``[{"feature", "share"}]``)."""
        return {
            "id": self.id,
            "status": self.status,
            "stream": self.stream,
            "model": self.model,
            "model_version": self.model_version,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "peak_score": self.peak_score,
            "threshold": self.threshold,
            "models_over": list(self.models_over),
            "top_features": [{"feature": f, "share": s} for f, s in self.top_features],
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict`."""
        return cls(
            id=str(d["id"]),
            status=str(d["status"]),
            stream=str(d["stream"]),
            model=str(d["model"]),
            model_version=str(d["model_version"]),
            started_at=int(d["started_at"]),
            ended_at=None if d.get("ended_at") is None else int(d["ended_at"]),
            peak_score=float(d["peak_score"]),
            threshold=float(d["threshold"]),
            models_over=[str(m) for m in d.get("models_over", [])],
            top_features=[(str(t["feature"]), float(t["share"])) for t in d.get("top_features", [])],
            source=dict(d.get("source", {})),
        )

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()
