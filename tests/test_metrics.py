"""Metrics module: every helper is checked by reading the values back from a private registry."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.metrics import MAX_DEAD_LETTER_REASONS, OUTCOMES, SCORE_BUCKETS, Metrics, TopStreams


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(reg: CollectorRegistry) -> Metrics:
    return Metrics(reg)


def test_events_and_dead_letters(reg: CollectorRegistry, m: Metrics) -> None:
    m.init_topics(["sensors"])
    for outcome in OUTCOMES:
        assert reg.get_sample_value("anomalyd_events_total", {"topic": "sensors", "outcome": outcome}) == 0
    m.event("sensors", "scored", 5)
    m.event("sensors", "late")
    m.dead_letter("sensors", "oversized", 2)
    events = lambda outcome: reg.get_sample_value("anomalyd_events_total",
                                                  {"topic": "sensors", "outcome": outcome})
    assert events("scored") == 5 and events("late") == 1 and events("dead_lettered") == 2
    assert reg.get_sample_value("anomalyd_dead_letters_total",
                                {"topic": "sensors", "reason": "oversized"}) == 2
    with pytest.raises(ValueError, match=r"Metrics.dead_letter\(topic, reason\)"):
        m.event("sensors", "dead_lettered")  # must go through dead_letter() to carry a reason (no double count)
    with pytest.raises(ValueError, match="unknown event outcome"):
        m.event("sensors", "bogus")


def test_a_dead_letter_reason_alerted_on_exists_at_zero_before_its_first_count(reg: CollectorRegistry,
                                                                               m: Metrics) -> None:
    """AnomalydStreamLimitReached uses increase(), which misses a series' first count (from absent to N)."""
    got = lambda: reg.get_sample_value("anomalyd_dead_letters_total",  # noqa: E731
                                       {"topic": "sensors", "reason": "too_many_streams"})
    m.init_topics(["sensors"])
    assert got() is None
    m.init_topics(["sensors"], ["too_many_streams"])
    assert got() == 0
    m.dead_letter("sensors", "too_many_streams", 3)
    assert got() == 3


def test_sink_series_exist_at_zero_before_the_first_flush(reg: CollectorRegistry, m: Metrics) -> None:
    m.init_sinks(["kafka", "alertmanager"])
    assert reg.get_sample_value("anomalyd_sink_failures_total", {"sink": "alertmanager"}) == 0
    assert reg.get_sample_value("anomalyd_sink_flush_seconds_count", {"sink": "kafka"}) == 0


def test_dead_letter_reasons_are_bounded(reg: CollectorRegistry, m: Metrics) -> None:
    for i in range(MAX_DEAD_LETTER_REASONS + 5):
        m.dead_letter("t", f"reason{i}")
    m.dead_letter("t", "reason0")  # a known reason keeps its own series
    assert reg.get_sample_value("anomalyd_dead_letters_total", {"topic": "t", "reason": "reason0"}) == 2
    assert reg.get_sample_value("anomalyd_dead_letters_total", {"topic": "t", "reason": "other"}) == 5
    assert reg.get_sample_value("anomalyd_dead_letters_total",
                                {"topic": "t", "reason": f"reason{MAX_DEAD_LETTER_REASONS}"}) is None


def test_observe_batch(reg: CollectorRegistry, m: Metrics) -> None:
    m.observe_batch("gru", "cpu", size=100, seconds=0.02)
    m.observe_batch("gru", "cpu", size=3, seconds=0.004)
    labels = {"model": "gru", "device": "cpu"}
    assert reg.get_sample_value("anomalyd_windows_scored_total", {"model": "gru"}) == 103
    assert reg.get_sample_value("anomalyd_inference_batch_size_count", labels) == 2
    assert reg.get_sample_value("anomalyd_inference_batch_size_sum", labels) == 103
    assert reg.get_sample_value("anomalyd_inference_batch_size_bucket", {**labels, "le": "4.0"}) == 1
    assert reg.get_sample_value("anomalyd_inference_batch_size_bucket", {**labels, "le": "64.0"}) == 1
    assert reg.get_sample_value("anomalyd_inference_batch_size_bucket", {**labels, "le": "128.0"}) == 2
    assert reg.get_sample_value("anomalyd_inference_seconds_bucket", {**labels, "le": "0.005"}) == 1
    assert reg.get_sample_value("anomalyd_inference_seconds_sum", labels) == pytest.approx(0.024)


def test_scores_bucketed_in_bulk_like_a_histogram(reg: CollectorRegistry, m: Metrics) -> None:
    scores = np.array([0.1, 0.9, 1.0, 1.05, 4.0, 50.0, np.nan])  # (N,); NaN is ignored
    m.observe_scores("gru", scores, event_to_score_seconds=np.array([0.02, -3.0, 0.3]))
    get = lambda le: reg.get_sample_value("anomalyd_anomaly_score_bucket", {"model": "gru", "le": le})
    assert get("0.25") == 1
    assert get("0.9") == 2  # le is inclusive
    assert get("1.0") == 3
    assert get("1.1") == 4
    assert get("5.0") == 5
    assert get("10.0") == 5
    assert get("+Inf") == 6
    assert reg.get_sample_value("anomalyd_anomaly_score_count", {"model": "gru"}) == 6
    assert reg.get_sample_value("anomalyd_anomaly_score_sum", {"model": "gru"}) == pytest.approx(57.05)
    # A negative latency (clock skew) counts as 0.
    assert reg.get_sample_value("anomalyd_event_to_score_seconds_bucket", {"le": "0.005"}) == 1
    assert reg.get_sample_value("anomalyd_event_to_score_seconds_bucket", {"le": "0.025"}) == 2
    assert reg.get_sample_value("anomalyd_event_to_score_seconds_count") == 3
    # Histogram samples must agree with a plain prometheus_client.Histogram fed the same values.
    ref_reg = CollectorRegistry()
    ref = Histogram("anomalyd_anomaly_score", "", ["model"], buckets=SCORE_BUCKETS, registry=ref_reg)
    for s in scores[np.isfinite(scores)]:
        ref.labels(model="gru").observe(s)
    for le in [*map(str, SCORE_BUCKETS), "+Inf"]:
        expected = ref_reg.get_sample_value("anomalyd_anomaly_score_bucket", {"model": "gru", "le": le})
        assert get(le) == expected, le


def test_alerts_threshold_incidents(reg: CollectorRegistry, m: Metrics) -> None:
    m.set_threshold("gru", 1.0)
    m.alert("gru", "firing", event_to_alert_seconds=0.7)
    m.alert("gru", "resolved")
    m.open_incidents.set(1)
    assert reg.get_sample_value("anomalyd_threshold", {"model": "gru"}) == 1.0
    assert reg.get_sample_value("anomalyd_alerts_total", {"model": "gru", "status": "firing"}) == 1
    assert reg.get_sample_value("anomalyd_alerts_total", {"model": "gru", "status": "resolved"}) == 1
    assert reg.get_sample_value("anomalyd_event_to_alert_seconds_count") == 1
    assert reg.get_sample_value("anomalyd_event_to_alert_seconds_bucket", {"le": "0.5"}) == 0
    assert reg.get_sample_value("anomalyd_event_to_alert_seconds_bucket", {"le": "1.0"}) == 1
    assert reg.get_sample_value("anomalyd_open_incidents") == 1
    with pytest.raises(ValueError, match="unknown alert status"):
        m.alert("gru", "pending")


def test_consumer_lag_follows_the_assignment(reg: CollectorRegistry, m: Metrics) -> None:
    m.set_consumer_lag({("sensors", 0): 10, ("sensors", 1): 0, ("sensors", 2): -4})
    assert reg.get_sample_value("anomalyd_consumer_lag", {"topic": "sensors", "partition": "0"}) == 10
    assert reg.get_sample_value("anomalyd_consumer_lag", {"topic": "sensors", "partition": "2"}) == 0
    m.assigned_partitions.set(4)  # the daemon's count: partition 3 is not fetched from yet, so it has no lag
    m.set_consumer_lag({("sensors", 0): 9})
    assert reg.get_sample_value("anomalyd_assigned_partitions") == 4  # a lag update does not undercount it
    m.rebalances.inc()
    m.forget_partitions([("sensors", 0), ("sensors", 2)])  # revoked: their series go at once
    assert reg.get_sample_value("anomalyd_consumer_lag", {"topic": "sensors", "partition": "0"}) is None
    m.set_consumer_lag({("sensors", 1): 7})
    assert reg.get_sample_value("anomalyd_consumer_lag", {"topic": "sensors", "partition": "1"}) == 7
    assert reg.get_sample_value("anomalyd_consumer_lag", {"topic": "sensors", "partition": "2"}) is None
    assert reg.get_sample_value("anomalyd_rebalances_total") == 1


def test_sink_and_commit_timers_count_failures(reg: CollectorRegistry, m: Metrics) -> None:
    with m.time_sink_flush("kafka"):
        pass
    with pytest.raises(ConnectionError), m.time_sink_flush("alertmanager"):
        raise ConnectionError("refused")
    m.observe_sink_flush("kafka", 0.2, ok=False)
    with m.time_commit():
        pass
    with pytest.raises(TimeoutError), m.time_commit():
        raise TimeoutError
    assert reg.get_sample_value("anomalyd_sink_flush_seconds_count", {"sink": "kafka"}) == 2
    assert reg.get_sample_value("anomalyd_sink_flush_seconds_count", {"sink": "alertmanager"}) == 1
    assert reg.get_sample_value("anomalyd_sink_failures_total", {"sink": "kafka"}) == 1
    assert reg.get_sample_value("anomalyd_sink_failures_total", {"sink": "alertmanager"}) == 1
    assert reg.get_sample_value("anomalyd_commit_seconds_count") == 2
    assert reg.get_sample_value("anomalyd_commit_failures_total") == 1


def test_model_info_replaced_on_reload(reg: CollectorRegistry, m: Metrics) -> None:
    m.set_model_info("gru", "v1", "gru", "cpu")
    m.set_model_info("lstm", "v7", "lstm", "cpu")
    m.set_model_info("gru", "v2", "gru", "cpu")
    assert reg.get_sample_value("anomalyd_model_info",
                                {"model": "gru", "version": "v1", "kind": "gru", "device": "cpu"}) is None
    assert reg.get_sample_value("anomalyd_model_info",
                                {"model": "gru", "version": "v2", "kind": "gru", "device": "cpu"}) == 1
    assert reg.get_sample_value("anomalyd_windows_scored_total", {"model": "gru"}) == 0  # pre-created
    assert reg.get_sample_value("anomalyd_alerts_total", {"model": "lstm", "status": "firing"}) is None  # per route
    m.init_route("gru+lstm")
    assert reg.get_sample_value("anomalyd_alerts_total", {"model": "gru+lstm", "status": "resolved"}) == 0
    m.remove_model_info("lstm")
    assert reg.get_sample_value("anomalyd_model_info",
                                {"model": "lstm", "version": "v7", "kind": "lstm", "device": "cpu"}) is None


def test_build_info_state_buffers_and_process_metrics(reg: CollectorRegistry) -> None:
    m = Metrics(reg, version="9.9.9")
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    (build,) = families["anomalyd_build_info"].samples
    assert build.labels["version"] == "9.9.9" and build.labels["python"].startswith("3.") and build.value == 1
    assert {"process_cpu_seconds", "python_info", "python_gc_objects_collected"} <= families.keys()
    m.set_state(up=True, ready=False)
    m.set_buffers(streams=12, nbytes=4096)
    assert reg.get_sample_value("anomalyd_up") == 1 and reg.get_sample_value("anomalyd_ready") == 0
    assert reg.get_sample_value("anomalyd_streams_tracked") == 12
    assert reg.get_sample_value("anomalyd_window_buffer_bytes") == 4096
    assert "anomalyd_top_stream_score" not in families  # off by default
    Metrics(CollectorRegistry(), process_metrics=False)  # a second instance on its own registry is fine
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(reg)  # but not twice on one registry


def test_metric_names_follow_conventions(reg: CollectorRegistry) -> None:
    Metrics(reg, top_k_streams=2)
    unitless = {"anomalyd_inference_batch_size", "anomalyd_anomaly_score"}  # counts and ratios
    types = dict(line.split()[2:4] for line in generate_latest(reg).decode().splitlines()
                 if line.startswith("# TYPE anomalyd_") and not line.split()[2].endswith("_created"))
    assert len(types) == 33
    for name, kind in types.items():
        assert kind != "counter" or name.endswith("_total"), name
        assert kind != "histogram" or name.endswith("_seconds") or name in unitless, name
        assert kind != "gauge" or not name.endswith("_total"), name
    for family in reg.collect():
        labels = {k for s in family.samples for k in s.labels}
        assert "stream" not in labels or family.name == "anomalyd_top_stream_score", family.name


def test_top_k_streams(reg: CollectorRegistry) -> None:
    m = Metrics(reg, top_k_streams=2)
    m.observe_scores("gru", [0.5, 3.0, 1.5], streams=["a", "b", "c"])
    top = lambda rank, s: reg.get_sample_value("anomalyd_top_stream_score", {"rank": str(rank), "stream": s})
    assert top(1, "b") == 3.0 and top(2, "c") == 1.5 and top(1, "a") is None and top(3, "a") is None
    m.observe_scores("gru", [0.2, 9.0], streams=["b", "d"])  # b recovered, d is new and highest
    assert top(1, "d") == 9.0 and top(2, "c") == 1.5 and top(2, "b") is None
    m.forget_streams(["d"])  # revoked or silent
    assert top(1, "c") == 1.5
    with pytest.raises(ValueError):
        TopStreams(0, CollectorRegistry())


def test_top_k_streams_tracks_the_latest_scores() -> None:
    """Every stream in every batch (repeats within a batch, the last one counting): the gauge holds the K streams
    with the highest latest scores; with K >= the streams, every stream's latest score. A NaN changes nothing."""
    rng = np.random.default_rng(3)
    names = [f"s{i}" for i in range(40)]
    small, large = TopStreams(5, CollectorRegistry()), TopStreams(64, CollectorRegistry())
    for _ in range(20):
        order = rng.permutation(np.repeat(np.arange(40), 3))  # (120,) each stream 3 times
        scores = np.round(rng.random(order.size) * 4, 3)
        batch = [names[i] for i in order.tolist()]
        latest = dict(zip(batch, scores.tolist(), strict=True))
        for t in (small, large):
            t.observe(batch, scores)
        assert dict(large.top()) == latest
        assert [s for _, s in small.top()] == sorted(latest.values(), reverse=True)[:5]
        assert {n for n, _ in small.top()} <= {n for n, v in latest.items() if v >= sorted(latest.values())[-5]}
    before = dict(large.top())
    large.observe(["s1", "s2"], [float("nan"), 7.5])
    assert dict(large.top()) == {**before, "s2": 7.5}


def test_gpu_memory_gauge_rejects_cpu(m: Metrics) -> None:
    with pytest.raises(ValueError, match="CUDA devices only"):
        m.track_gpu_memory("cpu")


def test_gpu_memory_gauge_reads_torch_at_scrape(reg: CollectorRegistry, m: Metrics) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m.track_gpu_memory("cuda:0")
    before = reg.get_sample_value("anomalyd_gpu_memory_bytes", {"device": "cuda:0"})
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")  # 64 MiB
    after = reg.get_sample_value("anomalyd_gpu_memory_bytes", {"device": "cuda:0"})
    assert after - before >= x.numel()
