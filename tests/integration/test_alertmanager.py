"""A real Alertmanager receives an incident's firing alert, then its resolved alert, via AlertmanagerSink."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import numpy as np
import pytest

from pipelines.alert_message import FIRING, RESOLVED
from pipelines.alerts import AlertTracker
from pipelines.sinks import AlertmanagerSink, SinkError
from tests.integration.alertmanager import AlertmanagerServer


def _ms(rfc3339: str) -> int:
    return round(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def test_firing_then_resolved(alertmanager: AlertmanagerServer) -> None:
    run = uuid.uuid4().hex[:12]
    sink = AlertmanagerSink(alertmanager.url, labels={"test_run": run}, backoff_s=0.05)
    tracker = AlertTracker(k=1, n=1, m=1)
    now = int(time.time() * 1000)
    windows = dict(
        stream_idx=np.array([0, 0]), score=np.array([3.0, 0.2]), over=np.array([True, False]),
        ts_ms=np.array([now - 60_000, now - 30_000]), topic="sensors", partition=np.array([1, 1]),
        offset=np.array([41, 42]), contributions=np.array([[3.0, 1.0], [1.0, 1.0]]),
        feature_names=["temp", "flow"], model="sensors-gru", model_version="7", stream_names=["pump-7"],
    )  # fmt: skip
    firing, resolved = tracker.observe(**windows)
    assert (firing.status, resolved.status) == (FIRING, RESOLVED)

    sink.add([firing])
    sink.flush(20.0)
    mine = [a for a in alertmanager.alerts() if a["labels"].get("test_run") == run]
    assert len(mine) == 1, alertmanager.log_tail()
    held = mine[0]
    assert held["status"]["state"] == "active"
    assert held["labels"] == sink.labels_of(firing)
    assert held["labels"]["alertname"] == "AnomalyDetected" and held["labels"]["stream"] == "pump-7"
    assert _ms(held["startsAt"]) == firing.started_at == now - 60_000
    assert _ms(held["endsAt"]) > now  # kept active until re-sent or resolved
    assert held["annotations"]["alert_id"] == firing.id
    assert held["annotations"]["top_features"] == "temp=0.75, flow=0.25"

    sink.add([resolved])
    sink.flush(20.0)
    # Alertmanager (0.25) drops resolved alerts from GET /api/v2/alerts at once.
    assert [a for a in alertmanager.alerts() if a["labels"].get("test_run") == run] == []


def test_rejected_alert_raises_with_alertmanagers_reason(alertmanager: AlertmanagerServer) -> None:
    sink = AlertmanagerSink(alertmanager.url, max_retries=3, backoff_s=0.05)
    sink.labels["bad label"] = "x"  # bypasses the sink's own label validation: Alertmanager must refuse it
    tracker = AlertTracker(k=1, n=1, m=1)
    sink.add(tracker.observe([0], [2.0], [True], [int(time.time() * 1000)], "t", [0], [5], stream_names=["s"]))
    with pytest.raises(SinkError, match=r"HTTP 400: .*invalid"):
        sink.flush(20.0)


def _mine(alertmanager: AlertmanagerServer, run: str) -> list[dict]:
    return [a for a in alertmanager.alerts() if a["labels"].get("test_run") == run]


def test_an_incident_whose_event_time_is_ahead_of_this_clock_resolves(alertmanager: AlertmanagerServer) -> None:
    """A producer an hour ahead (local time sent as UTC): the resolve ends the alert now, not in an hour."""
    run = uuid.uuid4().hex[:12]
    sink = AlertmanagerSink(alertmanager.url, labels={"test_run": run}, backoff_s=0.05)
    tracker = AlertTracker(k=1, n=1, m=1)
    ahead = int(time.time() * 1000) + 3_600_000
    firing, resolved = tracker.observe([0, 0], [3.0, 0.2], [True, False], [ahead, ahead + 30_000], "sensors", [1, 1],
                                       [41, 42], model="sensors-gru", stream_names=["pump-7"])
    sink.add([firing])
    sink.flush(20.0)
    assert [a["status"]["state"] for a in _mine(alertmanager, run)] == ["active"], alertmanager.log_tail()
    sink.add([resolved])
    sink.flush(20.0)
    assert _mine(alertmanager, run) == []


def test_the_resolve_of_an_older_incident_leaves_the_streams_later_one_firing(
        alertmanager: AlertmanagerServer) -> None:
    """A stream with an incident handed over with each of two partitions (its key moved): the older resolves, the
    later continues; both have one label set in Alertmanager."""
    run = uuid.uuid4().hex[:12]
    sink = AlertmanagerSink(alertmanager.url, labels={"test_run": run}, backoff_s=0.05)
    now = int(time.time() * 1000)
    older = AlertTracker(k=1, n=1, m=1).observe([0, 0], [3.0, 0.2], [True, False], [now - 90_000, now - 80_000],
                                               "sensors", [1, 1], [41, 42], model="m", stream_names=["pump-7"])
    later = AlertTracker(k=1, n=1, m=1).observe([0], [3.0], [True], [now - 60_000], "sensors", [2], [7], model="m",
                                               stream_names=["pump-7"])
    sink.add([older[0]])
    sink.flush(20.0)
    sink.adopt(later)  # re-posted at the next flush
    sink.flush(20.0)
    sink.add([older[1]])
    sink.flush(20.0)
    held = _mine(alertmanager, run)
    assert [(a["status"]["state"], a["annotations"]["alert_id"]) for a in held] == [("active", later[0].id)]
