"""The scoring thread's adaptive intra-op thread count (pipelines.scoring_threads), on a simulated clock."""

from __future__ import annotations

import threading

import torch

from pipelines.scoring_threads import ScoringThreads


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(most: int = 2, **kw) -> tuple[ScoringThreads, Clock, list[int], list[int]]:
    clock, applied, changes = Clock(), [], []
    kw.setdefault("period_s", 0.99)  # periods of 1.0 s on the simulated clock end after a whole period
    st = ScoringThreads(most, apply=applied.append, clock=clock, on_change=changes.append, **kw)
    return st, clock, applied, changes


def run_period(st: ScoringThreads, clock: Clock, model: float, per_window: dict[int, float], waited: float = 0.0,
               busy: float | None = None, backlog: bool = True, period: float = 1.0, batches: int = 4) -> None:
    """One period of ``period`` seconds in ``batches`` micro-batches: the scoring thread busy ``busy`` of it
    (default ``model``), its model ``model``, the loop thread waiting for it ``waited``, its polls full
    (``backlog``) or not. Each window costs the model ``per_window[threads]`` seconds, so the batch sizes follow
    from the model's time."""
    busy = model if busy is None else busy
    for _ in range(batches):
        clock.t += (1 - busy) * period / batches  # the scoring thread waits for the loop's next micro-batch
        for _poll in range(3):
            st.polled(full=backlog)
        st.loop_waited(waited * period / batches)
        model_s = model * period / batches
        with st.scoring(round(model_s / per_window[st.threads])):
            st.add_model_seconds(model_s)
            clock.t += busy * period / batches


COST = {1: 1 / 20_000, 2: 1 / 36_000}  # seconds per window (GRU W=64 F=8 H=64 on 2 vCPUs, RESULTS engine table)


def test_starts_with_one_thread_and_applies_it_on_the_scoring_thread_once():
    st, clock, applied, changes = make()
    assert st.threads == 1 and applied == []  # nothing is applied before the first batch, on the scoring thread
    run_period(st, clock, model=0.5, per_window=COST)
    assert applied == [1] and changes == [] and st.threads == 1


def test_a_loop_waiting_for_the_model_gives_it_every_thread_and_it_keeps_them():
    st, clock, applied, changes = make()
    run_period(st, clock, model=0.95, waited=0.7, per_window=COST)  # stride 1: the model sets the pace
    assert st.threads == 2 and changes == [2]
    for _ in range(20):  # with 2 threads it runs 0.95 x 20/36 ~ 0.53 of the time: 1 thread would not do
        run_period(st, clock, model=0.95 * COST[2] / COST[1], per_window=COST)
    assert st.threads == 2 and changes == [2] and applied == [1, 2]


def test_a_busy_scoring_thread_the_loop_does_not_wait_for_stays_at_one():
    st, clock, _, changes = make()
    for _ in range(10):  # stride 8 with kafka-python: busy most of the time (the GIL), yet the client sets the pace
        run_period(st, clock, model=0.8, busy=0.95, per_window=COST)
    assert st.threads == 1 and changes == []
    run_period(st, clock, model=0.8, busy=0.95, waited=0.25, per_window=COST)
    assert st.threads == 2 and changes == [2]


def test_going_back_to_one_uses_the_measured_cost_after_the_hold_and_only_if_the_loop_does_not_wait():
    st, clock, _, changes = make(hold_s=1.5)
    run_period(st, clock, model=0.9, waited=0.5, per_window=COST)  # measures 1 thread, goes to 2
    assert st.threads == 2
    # the load drops: with 2 threads the model runs 0.3 of the time, i.e. 0.3 x 36/20 = 0.54 with 1
    run_period(st, clock, model=0.3, per_window=COST)
    assert st.threads == 2  # held for 1.5 s after going up
    run_period(st, clock, model=0.3, waited=0.3, per_window=COST)
    assert st.threads == 2  # the loop still waits for it
    run_period(st, clock, model=0.3, per_window=COST)
    assert st.threads == 1 and changes == [2, 1]
    run_period(st, clock, model=0.54, per_window=COST)
    assert st.threads == 1


def _flapping_load(st: ScoringThreads, clock: Clock, seconds: int) -> None:
    """A load at the boundary: with 2 threads the model runs 0.4 of the time (0.72 predicted with 1: enough), but
    with 1 the rest of each micro-batch makes the loop wait for it."""
    for _ in range(seconds):
        if st.threads == 2:
            run_period(st, clock, model=0.4, per_window=COST)
        else:
            run_period(st, clock, model=0.72, busy=0.98, waited=0.1, per_window=COST)


def test_a_fall_that_does_not_last_stretches_the_hold_so_a_boundary_load_does_not_flap():
    st, clock, _, changes = make(hold_s=5.0)
    _flapping_load(st, clock, 240)
    # a fixed 5 s hold would switch twice every 6 s (about 80 times in 4 minutes); doubling holds of 5, 10, 20,
    # 40, 80 and 160 s leave a handful
    assert 4 <= st.switches <= 14, changes
    assert st.hold_s >= 80.0


def test_a_fall_that_lasts_the_hold_shrinks_it_back():
    st, clock, _, changes = make(hold_s=5.0)
    _flapping_load(st, clock, 60)
    stretched = st.hold_s
    assert stretched >= 20.0
    while st.threads != 1:
        run_period(st, clock, model=0.2, per_window=COST)
    for _ in range(int(stretched) + 1):  # one thread is enough for longer than the hold
        run_period(st, clock, model=0.36, per_window=COST)
    run_period(st, clock, model=0.95, waited=0.5, per_window=COST)  # then a backlog
    assert st.threads == 2 and st.hold_s == stretched / 2


def test_the_hold_stretches_to_at_most_its_cap():
    st, clock, _, _ = make(hold_s=2.0)
    _flapping_load(st, clock, 1000)
    assert st.hold_s == 128.0


def test_an_unmeasured_count_is_assumed_to_scale_linearly():
    st, clock, _, changes = make(most=8, hold_s=0.0)
    run_period(st, clock, model=0.9, waited=0.5, per_window={1: 1e-4, 8: 1e-4})
    assert st.threads == 8
    cost = {k: 8e-5 / k for k in range(1, 9)}
    run_period(st, clock, model=0.2, per_window=cost)
    # 1 thread was measured: 1e-4 s/window against 1e-5 with 8, so 2.0 predicted. 2 and 3 were not, so they
    # scale from 8 linearly: 0.2 x 8/2 = 0.8 > 0.75, 0.2 x 8/3 = 0.53: 3 threads
    assert st.threads == 3 and changes == [8, 3]


def test_an_idle_topic_counts_as_not_busy():
    st, clock, _, _ = make(hold_s=0.0)
    run_period(st, clock, model=1.0, waited=0.5, per_window=COST)
    run_period(st, clock, model=0.9, per_window=COST)
    assert st.threads == 2
    clock.t += 600.0  # ten quiet minutes, then one batch
    with st.scoring(100):
        st.add_model_seconds(100 * COST[2])
        clock.t += 100 * COST[2]
    assert st.threads == 1


def test_one_cpu_never_changes():
    st, clock, applied, changes = make(most=1)
    for model, waited in ((1.0, 0.9), (1.0, 0.9), (0.1, 0.0)):
        run_period(st, clock, model=model, waited=waited, per_window={1: 1e-4})
    assert st.threads == 1 and changes == [] and applied == [1]


def test_caught_up_a_model_running_half_the_time_gets_every_thread():
    """Latency: at half capacity one thread keeps up (the loop never waits) but is busy most of the time."""
    st, clock, _, changes = make(hold_s=0.0)
    run_period(st, clock, model=0.6, per_window=COST)  # a backlog: throughput rules, one thread keeps up
    assert st.threads == 1
    run_period(st, clock, model=0.6, backlog=False, per_window=COST)  # caught up
    assert st.threads == 2 and changes == [2]
    run_period(st, clock, model=0.33, backlog=False, per_window=COST)  # 0.33 x 36/20 = 0.6 with 1: > 0.4, stays
    assert st.threads == 2
    run_period(st, clock, model=0.2, backlog=False, per_window=COST)  # 0.36 with 1: enough
    assert st.threads == 1 and changes == [2, 1]
    run_period(st, clock, model=0.36, backlog=False, per_window=COST)
    assert st.threads == 1


def test_no_polls_count_as_caught_up():
    st, clock, _, changes = make()
    with st.scoring(1000):  # replayed windows, say, before any poll of this period
        st.add_model_seconds(0.55)
        clock.t += 0.55
    clock.t += 0.45
    with st.scoring(10):
        clock.t += 0.001
    assert changes == [2]


def test_torch_applies_the_count_to_the_scoring_thread():
    st = ScoringThreads(2)
    seen = []

    def score() -> None:
        for threads in (1, 2, 1):
            st.threads = threads  # as _decide sets it
            with st.scoring(10) as k:
                seen.append((k, torch.get_num_threads()))

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the loop thread's count, as the daemon sets it
    try:
        t = threading.Thread(target=score)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, 1), (2, 2), (1, 1)]
