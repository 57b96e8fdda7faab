"""benchmarks.harness wraps the daemon's Kafka source; the wrapper must take every argument the daemon passes.

A commit(offsets) without the timeout the shutdown's commit passes made every pipeline and latency run end in
"daemon exit 1" (the commit failed, the offsets stayed uncommitted) after the commit gained that argument."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import common, harness
from benchmarks.daemon_metrics import check_scored
from benchmarks.harness import Phases, TimedSource
from pipelines.source import Source


def test_the_timed_source_takes_the_arguments_of_the_source_protocol() -> None:
    for name in ("poll", "commit"):
        ours = list(inspect.signature(getattr(TimedSource, name)).parameters)
        theirs = list(inspect.signature(getattr(Source, name)).parameters)
        assert ours == theirs, (name, ours, theirs)


def test_the_shutdown_commit_goes_through_with_its_timeout() -> None:
    calls = []

    class _Inner:  # records what reaches the client (the wrapper's own logic is what is tested)
        def poll(self, max_records, timeout_ms):
            raise AssertionError("not polled here")

        def commit(self, offsets, timeout_s=None):
            calls.append((offsets, timeout_s))

        commit_async = lag = poll

    timed = TimedSource(_Inner(), Phases())
    timed.commit({("t", 0): (5, "")}, 4.0)
    assert calls == [({("t", 0): (5, "")}, 4.0)] and timed.t_commit is not None and timed.rss_commit > 0


def test_b_is_timed_from_the_poll_after_the_warm_up_share_over_the_events_from_there() -> None:
    """The clock starts when the first batch after ``warm_events`` arrives: that batch's processing is timed and
    its events counted (the first batch's were not counted, though timed; the count is _mark_processed's)."""
    from pipelines.source import RecordBatch

    class _Inner:
        def poll(self, max_records, timeout_ms):
            n = 100
            return RecordBatch(["t"] * n, np.zeros(n, np.int32), np.arange(n, dtype=np.int64), np.zeros(n, np.int64),
                               [None] * n, [b"{}"] * n)

        commit = commit_async = lag = poll

    timed = TimedSource(_Inner(), Phases(), warm_events=250)
    for polled in range(1, 6):
        timed.poll(5000, 100)
        assert (timed.t_first is None) == (polled < 4), polled  # 300 >= 250 before the fourth batch
    assert timed.n_polled == 500
    assert 0 < harness.WARM_FRACTION < 0.5


# ---------------------------------------------------------------------------------------------- b counts scored events
def _summary(outcomes: dict[str, float], windows: dict[str, float]) -> dict:
    """metric_summary's shape for the two counters check_scored reads."""
    return {"anomalyd_events": {f"outcome={k}|topic=t": v for k, v in outcomes.items()},
            "anomalyd_windows_scored": {f"model={k}": v for k, v in windows.items()}}


def test_a_run_whose_events_were_scored_passes_and_the_counts_come_back() -> None:
    got = check_scored(_summary({"scored": 8000, "warming": 0}, {"m": 1000}), 8000, 8, ["m"])
    assert got["scored_events"] == 8000 and got["windows_expected"] == 1000 and got["windows_scored"] == {"m": 1000}


@pytest.mark.parametrize("outcome", ["replayed", "unrouted", "dead_lettered", "late", "warming"])
def test_events_read_but_not_scored_fail_the_run(outcome: str) -> None:
    with pytest.raises(RuntimeError, match=f"{outcome} 2,000"):
        check_scored(_summary({"scored": 8000, outcome: 2000}, {"m": 8000}), 10_000, 1, ["m"])


def test_windows_not_scored_fail_the_run() -> None:
    with pytest.raises(RuntimeError, match="model m scored 500 windows, 1,000 expected"):
        check_scored(_summary({"scored": 8000}, {"m": 500}), 8000, 8, ["m"])
    with pytest.raises(RuntimeError, match="model n scored 0 windows"):  # a served model that never scored
        check_scored(_summary({"scored": 8000}, {"m": 1000}), 8000, 8, ["m", "n"])


def _memory_daemon(tmp: Path, stride: int):
    """A daemon without Kafka (as benchmarks.baseline runs it) on a tiny untrained model, windows seeded."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.model_store import ModelStore
    from pipelines.replay import _StderrDeadLetters
    from pipelines.sinks import FanoutSink

    ModelStore(tmp / "models").save("tiny", common.random_detector("gru", harness.WINDOW, harness.FEATURES, hidden=8),
                                    version="v1")
    spec = {"bootstrap": "127.0.0.1:9", "client": "kafka-python", "topic": "memory", "models_dir": str(tmp / "models"),
            "models": ["tiny"], "stride": stride, "background": False, "threads": 1}
    daemon = Daemon(load_config(harness.daemon_config(tmp, spec)))
    daemon.producer = _StderrDeadLetters()
    daemon.sinks = FanoutSink([])
    return daemon


def _feed(daemon, messages: list[bytes], keys: list[bytes], chunk: int = 1000) -> None:
    from pipelines.source import RecordBatch

    for lo in range(0, len(messages), chunk):
        m = min(chunk, len(messages) - lo)
        daemon.process(RecordBatch(topic=["memory"] * m, partition=np.zeros(m, np.int32),
                                   offset=np.arange(lo, lo + m, dtype=np.int64),
                                   timestamp=np.full(m, harness.T0_MS, np.int64), key=keys[lo:lo + m],
                                   value=messages[lo:lo + m]))
        daemon.flush()


@pytest.mark.parametrize("stride", [1, 8])
def test_the_daemons_own_counters_pass_and_unrouted_events_fail(tmp_path: Path, stride: int) -> None:
    """The counters as a daemon keeps them (label keys, outcomes, windows per model at a stride with the streams'
    phases spread, as seed_windows spreads them): every event scored passes; events of streams no route takes are
    read (events_seen) but not scored, and fail it."""
    from benchmarks.baseline import _data

    daemon = _memory_daemon(tmp_path, stride)
    fleet = common.Fleet(200, harness.FEATURES)
    harness.seed_windows(daemon, fleet, harness.WINDOW + 8, stride)
    messages, keys, _ = _data(fleet, 200 * 13 + 37)  # not a whole number of steps
    _feed(daemon, messages, keys)
    got = check_scored(harness.metric_summary(daemon.registry), daemon.events_seen, stride, ["tiny"])
    assert got["scored_events"] == daemon.events_seen == len(messages)
    assert abs(got["windows_scored"]["tiny"] - len(messages) / stride) <= 0.01 * len(messages) / stride
    stray = [m.replace(b'"s-', b'"x-') for m in messages[:100]]
    _feed(daemon, stray, [k.replace(b"s-", b"x-") for k in keys[:100]])
    with pytest.raises(RuntimeError, match="unrouted 100"):
        check_scored(harness.metric_summary(daemon.registry), daemon.events_seen, stride, ["tiny"])


def test_b_counts_the_events_processed_from_the_first_batch_after_the_mark(tmp_path: Path) -> None:
    """The events before the mark are those the daemon had processed when it took the first batch polled after it
    (records of a poll that assigns a partition are polled twice: dropped, then read again)."""
    from benchmarks.baseline import _data

    daemon = _memory_daemon(tmp_path, 1)
    fleet = common.Fleet(200, harness.FEATURES)
    harness.seed_windows(daemon, fleet, harness.WINDOW + 8, 1)
    messages, keys, _ = _data(fleet, 3000)

    class _Marked:  # the TimedSource as far as the count reads it
        t_first = None

    src = _Marked()
    mark = harness._mark_processed(daemon, lambda: src)
    _feed(daemon, messages[:2000], keys[:2000])
    assert mark == {}
    src.t_first = 1.0  # the poll after the mark returned a batch
    _feed(daemon, messages[2000:], keys[2000:])
    assert mark == {"events": 2000} and daemon.events_seen == 3000


# ---------------------------------------------------------------------------------------------- kernel_ab's old bases
class _OldKernel:
    """A kernel module as built before e7aec8d: ae_forward/ae_score without bf16, no bf16_supported."""

    isa = "avx2"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def ae_forward(self, x, lstm, H, Lz, enc, dec, head, tile):  # noqa: N803 (the C++ names)
        self.calls.append(("ae_forward", 8))
        return torch.zeros_like(x)

    def ae_score(self, x, center, scale, last_k, lstm, H, Lz, enc, dec, head, tile):  # noqa: N803
        self.calls.append(("ae_score", 11))
        return torch.zeros(x.shape[0]), torch.zeros(x.shape[0], x.shape[2])


def test_kernel_ab_calls_a_kernel_from_before_bfloat16_without_its_argument() -> None:
    from benchmarks.kernel_ab import Float32Only, adapt
    from detector.fastpath import FusedAutoencoder, FusedUnavailable
    from detector.models import ModelConfig, build_model

    model = build_model(ModelConfig(kind="gru", n_features=4, window=8, hidden_size=8, latent_size=4)).eval()
    old = _OldKernel()
    x = torch.randn(3, 8, 4)
    with pytest.raises(TypeError):  # what kernel_ab hit: the 9th argument
        FusedAutoencoder(model, module=old)(x)
    fused = FusedAutoencoder(model, module=adapt(old))
    assert fused(x).shape == x.shape
    score, contrib = fused.score(x, torch.zeros(4), torch.ones(4), 1)
    assert score.shape == (3,) and contrib.shape == (3, 4)
    assert old.calls[-2:] == [("ae_forward", 8), ("ae_score", 11)] and adapt(old).isa == "avx2"
    with pytest.raises(FusedUnavailable):  # no bfloat16 products in such a kernel
        FusedAutoencoder(model, module=adapt(old), bf16=True)
    with pytest.raises(ValueError, match="float32 only"):
        Float32Only(old).ae_forward(x, False, 8, 4, [], [], [], 16, True)

    class _NewKernel(_OldKernel):
        @staticmethod
        def bf16_supported() -> bool:
            return True

    new = _NewKernel()
    assert adapt(new) is new  # a kernel with the argument is called as it is


# ---------------------------------------------------------------------------------------------- baseline's naive loop
def test_a_timed_loop_reads_the_clock_at_every_event_and_wants_a_minimum() -> None:
    from benchmarks.baseline import _timed_loop

    def run(min_events: int, per_event: float = 0.02) -> tuple[int, float]:
        now = [0.0]  # a clock that moves only with the events

        def step(raw: bytes) -> None:
            now[0] += per_event

        return _timed_loop([b""] * 1000, 0.05, step, min_events=min_events, clock=lambda: now[0])

    assert run(1) == (3, pytest.approx(0.06))  # the first event past the budget, not the 100th (the old check)
    assert run(4) == (4, pytest.approx(0.08))  # past the budget until the minimum ...
    assert run(1000) == (5, pytest.approx(0.10))  # ... up to twice the budget
    assert run(1000, per_event=0.5) == (1, pytest.approx(0.5))  # a collapsed loop: one event over it at most
    assert run(1, per_event=1e-6)[0] == 1000  # the messages ran out first


def test_every_speed_up_is_against_the_one_faster_naive_run() -> None:
    from benchmarks.baseline import naive_reference

    rows = [{"impl": "anomalyd", "threads": 1, "events_s": 20_000.0},
            {"impl": "naive: deque", "threads": 1, "events_s": 550.0, "enough": True},
            {"impl": "naive: deque", "threads": 2, "events_s": 12.0, "enough": False},  # collapsed beside a neighbour
            {"impl": "naive: deque", "threads": 2, "events_s": 900.0, "enough": False}]  # too few events to trust
    assert naive_reference(rows) is rows[1]
    assert naive_reference([rows[2]]) is rows[2]  # none with enough events: the faster all the same
