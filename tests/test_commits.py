"""The committer's own rules for asynchronous commits: one in flight, a pause after a failure, an unanswered one
given up after ANSWER_WAIT_S. The client here records what it is asked and answers when the test says so (a
broker cannot be made to hold an answer for 30 s on cue); tests/integration/test_broker_outage.py runs the
same path against a real broker that is frozen."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from pipelines import commits
from pipelines.commits import Committer
from pipelines.metrics import Metrics
from pipelines.positions import Positions


class _RecordingClient:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, object]] = []  # (offsets, done)
        self.synchronous: list[dict] = []
        self.timeouts: list[float | None] = []
        self.refuse: Exception | None = None

    def commit_async(self, offsets, done) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((dict(offsets), done))

    def commit(self, offsets, timeout_s=None) -> None:
        self.synchronous.append(dict(offsets))
        self.timeouts.append(timeout_s)


@pytest.fixture
def committer() -> tuple[Committer, _RecordingClient, Metrics]:
    positions = Positions()
    metrics = Metrics(CollectorRegistry())
    c = Committer(positions, metrics)
    c.source = _RecordingClient()
    return c, c.source, metrics


def _processed(c: Committer, nxt: int) -> dict:
    c.positions.uncommitted[("t", 0)] = nxt
    return {("t", 0): (nxt, "m")}


def test_one_commit_in_flight_and_the_answer_clears_what_it_committed(committer):
    c, client, metrics = committer
    c.commit(_processed(c, 10))
    c.commit(_processed(c, 20))  # the first is unanswered: not sent, 20 stays uncommitted
    assert [s[0] for s in client.sent] == [{("t", 0): (10, "m")}]
    client.sent[0][1](None)
    assert c.positions.uncommitted == {("t", 0): 20}  # answers are applied on the loop thread, in collect()
    c.commit(_processed(c, 20))
    assert [s[0] for s in client.sent][-1] == {("t", 0): (20, "m")}
    assert c.positions.uncommitted == {("t", 0): 20}  # 10 committed; 20 was processed since
    client.sent[-1][1](None)
    c.collect()
    assert c.positions.uncommitted == {}
    assert metrics.registry.get_sample_value("anomalyd_commit_seconds_count") == 2
    assert metrics.registry.get_sample_value("anomalyd_commit_failures_total") == 0


def test_a_failed_commit_is_counted_and_retried_only_after_a_pause(committer, monkeypatch):
    c, client, metrics = committer
    c.commit(_processed(c, 10))
    client.sent[0][1](RuntimeError("coordinator not available"))
    c.commit(_processed(c, 10))  # collects the failure, then waits
    assert len(client.sent) == 1 and c.positions.uncommitted == {("t", 0): 10}
    assert metrics.registry.get_sample_value("anomalyd_commit_failures_total") == 1
    monkeypatch.setattr(commits, "RETRY_AFTER_S", 0.0)
    c._retry_at = 0.0
    c.commit(_processed(c, 10))
    assert len(client.sent) == 2


def test_a_commit_refused_before_sending_is_a_failure_not_one_in_flight(committer):
    c, client, metrics = committer
    client.refuse = RuntimeError("no coordinator")
    c.commit(_processed(c, 10))
    assert metrics.registry.get_sample_value("anomalyd_commit_failures_total") == 1
    assert c._in_flight is None and c.positions.uncommitted == {("t", 0): 10}


def test_an_unanswered_commit_is_given_up_and_the_newer_offsets_sent(committer, monkeypatch):
    c, client, _ = committer
    monkeypatch.setattr(commits, "ANSWER_WAIT_S", 0.05)
    c.commit(_processed(c, 10))
    time.sleep(0.1)
    c.commit(_processed(c, 20))
    assert [s[0][("t", 0)][0] for s in client.sent] == [10, 20]
    client.sent[0][1](None)  # the old answer comes late: it committed 10, the newer one is still in flight
    c.collect()
    assert c.positions.uncommitted == {("t", 0): 20} and c._in_flight is not None
    client.sent[1][1](None)
    c.collect()
    assert c.positions.uncommitted == {} and c._in_flight is None


def test_shutdown_and_rebalance_commits_wait_for_the_answer(committer):
    c, client, _ = committer
    c.commit(_processed(c, 10))  # in flight
    c.commit(_processed(c, 20), wait=True, timeout_s=4.0)  # the shutdown's, given what is left of its grace
    assert client.synchronous == [{("t", 0): (20, "m")}] and c.positions.uncommitted == {}
    assert client.timeouts == [4.0]


def test_a_new_assignment_ends_the_pause_after_a_failed_commit(committer):
    c, client, _ = committer
    c.commit(_processed(c, 10))
    client.sent[0][1](RuntimeError("UNKNOWN_MEMBER_ID"))  # the old generation's commit, after a lost session
    c.commit(_processed(c, 10))
    assert len(client.sent) == 1
    c.new_generation()
    c.commit(_processed(c, 10))
    assert len(client.sent) == 2


def test_the_old_generations_late_failure_neither_pauses_nor_holds_back_the_new_ones_commits(committer):
    c, client, _ = committer
    c.commit(_processed(c, 10))  # in flight when the partitions are revoked and assigned again
    c.new_generation()
    c.commit(_processed(c, 20))  # not held back by the old one in flight
    assert len(client.sent) == 2
    client.sent[0][1](RuntimeError("ILLEGAL_GENERATION"))  # the old generation's commit fails late
    client.sent[1][1](None)
    c.commit(_processed(c, 30))  # no pause: sent at once
    assert len(client.sent) == 3 and c.positions.uncommitted == {("t", 0): 30}


class _SendOnlyInRebalance(_RecordingClient):
    """A rebalance commit as kafka-python makes it: only sent; the test answers it as a later poll would."""

    rebalance_commit_answered_later = True

    def commit_in_rebalance(self, offsets, answered) -> None:
        self.commit_async(offsets, answered)


def test_a_rebalance_commit_that_is_only_sent_goes_without_the_incidents_first_and_is_never_sent_again(caplog):
    """kafka-python answers a rebalance commit from a later poll, when the group may be in its next generation:
    sent again then, it could overwrite the partitions' new owner's commit. So the offsets go without the open
    incidents first, then with them; a refusal of the second as too large leaves the first standing."""
    from kafka.errors import OffsetMetadataTooLargeError

    metrics = Metrics(CollectorRegistry())
    c = Committer(Positions(), metrics)
    c.source = client = _SendOnlyInRebalance()
    handover = {("t", 0): (10, '{"rebuild_from": 3, "incidents": [{"id": "a"}]}'), ("t", 1): (7, "")}
    c.commit(handover, in_rebalance=True)
    assert [s[0] for s in client.sent] == [{("t", 0): (10, '{"rebuild_from": 3}'), ("t", 1): (7, "")}, handover]
    with caplog.at_level("WARNING", logger="anomalyd"):  # kafka-python hands the answers over last first
        client.sent[1][1](OffsetMetadataTooLargeError("offset metadata too large"))
        assert metrics.registry.get_sample_value("anomalyd_commit_seconds_count") == 0  # the pair's other to come
        client.sent[0][1](None)
    assert len(client.sent) == 2 and not client.synchronous  # nothing sent again
    assert "went without them just before" in caplog.text and "commit_metadata_max_bytes" in caplog.text
    assert metrics.registry.get_sample_value("anomalyd_commit_seconds_count") == 1  # the pair, once
    assert metrics.registry.get_sample_value("anomalyd_commit_failures_total") == 0
    c.commit({("t", 0): (12, "")}, in_rebalance=True)  # without incidents: one send; its failure is counted
    client.sent[2][1](RuntimeError("UNKNOWN_MEMBER_ID"))
    assert len(client.sent) == 3 and metrics.registry.get_sample_value("anomalyd_commit_failures_total") == 1
    c.commit(handover, in_rebalance=True)  # both refused (expelled): one failure for the pair
    client.sent[3][1](RuntimeError("UNKNOWN_MEMBER_ID"))
    client.sent[4][1](RuntimeError("UNKNOWN_MEMBER_ID"))
    assert metrics.registry.get_sample_value("anomalyd_commit_seconds_count") == 3
    assert metrics.registry.get_sample_value("anomalyd_commit_failures_total") == 2
