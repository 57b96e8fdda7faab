"""pipelines.kafka_probe.KafkaProbe's policy on a scripted clock and scripted answers (the real probe against a
stopped broker: tests/integration/test_broker_outage.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from pipelines.kafka_probe import FAILURES, KafkaProbe


class Answers:
    """A source whose reachable() answers from a script (True, False, or None: nothing assigned)."""

    def __init__(self, *answers: bool | None) -> None:
        self.answers, self.asked = list(answers), 0

    def reachable(self, timeout_s: float) -> bool | None:
        self.asked += 1
        return self.answers.pop(0)


def make() -> tuple[KafkaProbe, CollectorRegistry]:
    registry = CollectorRegistry()
    return KafkaProbe(Gauge("anomalyd_kafka_reachable", "test", registry=registry), interval_s=15.0), registry


def test_probes_only_after_a_quiet_interval_and_one_failure_is_not_an_outage():
    probe, reg = make()
    source = Answers(False, True, False, False)
    probe.maybe(source, now=100.0, last_record=90.0)  # quiet for 10 s only
    assert source.asked == 0
    probe.maybe(source, now=106.0, last_record=90.0)
    assert source.asked == 1 and probe.ok  # one slow answer
    probe.maybe(source, now=110.0, last_record=90.0)
    assert source.asked == 1  # the last probe was 4 s ago
    for now in (121.0, 136.0):
        probe.maybe(source, now=now, last_record=90.0)
    assert probe.ok  # False, True: not in a row
    probe.maybe(source, now=151.0, last_record=90.0)
    assert not probe.ok and reg.get_sample_value("anomalyd_kafka_reachable") == 0 and FAILURES == 2


def test_records_an_assignment_or_nothing_assigned_bring_it_back():
    for back in ("records", "assigned", "nothing assigned", "a probe"):
        probe, reg = make()
        source = Answers(False, False, None if back == "nothing assigned" else True)
        probe.maybe(source, now=100.0, last_record=0.0)
        probe.maybe(source, now=115.0, last_record=0.0)
        assert not probe.ok
        if back == "records":
            probe.records()
        elif back == "assigned":
            probe.assigned()
        else:
            probe.maybe(source, now=130.0, last_record=0.0)
        assert probe.ok and reg.get_sample_value("anomalyd_kafka_reachable") == 1, back


def test_after_a_failed_probe_it_asks_three_times_as_often_until_an_answer():
    probe, _ = make()
    source = Answers(False, False, False, True, True)
    probe.maybe(source, now=100.0, last_record=0.0)  # fails once: the next is due 5 s later, not 15
    probe.maybe(source, now=104.0, last_record=0.0)
    assert source.asked == 1
    for now in (105.0, 110.0):
        probe.maybe(source, now=now, last_record=0.0)
    assert source.asked == 3 and not probe.ok
    probe.maybe(source, now=115.0, last_record=0.0)  # the brokers are back: seen 5 s later at most
    assert probe.ok and source.asked == 4
    probe.maybe(source, now=120.0, last_record=0.0)  # answered: every 15 s again
    assert source.asked == 4
