"""The Kafka side of the benchmarks: a local broker, pre-filled topics, and measured runs in fresh processes.

Each measured run (the raw client, the daemon, the engine alone) runs in its own spawned process, so its
resident memory is its own and runs do not share a GIL. Rates are counted from the first poll that returned
records (group join and start-up excluded) to the last record (raw) or the last offset commit (daemon, which
commits only after scoring and flushing sinks).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import common
from .daemon_metrics import check_scored, metric_summary

WINDOW = 64
FEATURES = 8
T0_MS = 1_764_000_000_000
INTERVAL_MS = 1000
WARM_FRACTION = 0.2
"""a and b are timed from the poll after this share of a run's events (its processing and on) to the end, over the
events after the mark: e is timed after a warm-up call, and b's first second ran at one scoring thread (the
adaptive rule's first decision; about 5 % of a 5 s run). Until the twenty-fifth session the clock started at the
first poll and that batch's events were left out of the count though their processing was timed."""


# ---------------------------------------------------------------------------------------------- broker and topics
def start_broker():
    """A fresh local broker on a free port: ``(LocalKafka, bootstrap)``; stop it with ``kafka.stop()``."""
    from pipelines.kafka_local import LocalKafka, free_port

    kafka = LocalKafka(free_port(), heap="1g", full_jit=True,  # a broker as deployed, not tuned for start-up
                       exit_with_parent=True)
    return kafka, kafka.start(timeout_s=180)


def new_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """A fresh source topic, with the daemon's alert and dead-letter topics (``daemon_config``) created beside
    it, as an operator would: otherwise the first alert waits for the broker to auto-create its topic (about a
    second, which showed as a latency spike at the start of every run)."""
    from pipelines.kafka_local import create_topic

    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions)
    for side in (f"{topic}-alerts", f"{topic}-dlq"):
        create_topic(bootstrap, side, 1)
    return topic


def produce(bootstrap: str, topic: str, messages: list[bytes], keys: list[bytes]) -> float:
    """Send pre-encoded messages with confluent-kafka as fast as it goes; returns messages/s."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576})
    t0 = time.perf_counter()
    for value, key in zip(messages, keys, strict=True):
        while True:
            try:
                p.produce(topic, value, key)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    if left:
        raise RuntimeError(f"{left} messages were not delivered to {topic}")
    return len(messages) / (time.perf_counter() - t0)


def prefill(bootstrap: str, topic: str, fleet: common.Fleet, n_events: int, first_step: int,
            chunk: int = 250_000, by_name: bool = False) -> float:
    """``n_events`` events, every stream once per step from ``first_step``, encoded and sent ``chunk`` at a time
    (encoding 1,200,000 events of 100,000 streams at once peaked at 5.8 GB resident, in chunks at 2.7 GB);
    values as an array, or an object by feature name with ``by_name``. Returns messages/s, encoding included."""
    t0 = time.perf_counter()
    stream, step = fleet.events(first_step, n_events)
    for lo in range(0, n_events, chunk):
        part = stream[lo:lo + chunk]
        messages = common.json_messages(fleet, part, step[lo:lo + chunk], T0_MS, INTERVAL_MS, by_name=by_name)
        produce(bootstrap, topic, messages, [fleet.names[s].encode() for s in part.tolist()])
    return n_events / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- runs in processes
def in_process(fn: Callable[[dict], dict], spec: dict, timeout_s: float = 600) -> dict:
    """Run ``fn(spec)`` in a fresh spawned process and return its result dict (or raise its error)."""
    from pipelines.allocator import release_cuda_library_pages

    if spec.get("device", "cpu") == "cpu":  # pages this process maps too stay in the child's resident set
        release_cuda_library_pages()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, spec, queue))
    proc.start()
    try:
        ok, result = queue.get(timeout=timeout_s)
    except Exception:
        proc.kill()
        raise RuntimeError(f"{fn.__name__} did not finish within {timeout_s} s") from None
    finally:
        proc.join(30)
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{result}")
    return result


def _child(fn: Callable[[dict], dict], spec: dict, queue) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        queue.put((True, fn(spec)))
    except BaseException:
        queue.put((False, traceback.format_exc()))


class Phases:
    """Time spent in named calls: {name: [calls, total s, max s]} (benchmark instrumentation only)."""

    def __init__(self) -> None:
        self.stats: dict[str, list] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                st = self.stats.setdefault(name, [0, 0.0, 0.0])
                st[0], st[1], st[2] = st[0] + 1, st[1] + dt, max(st[2], dt)

        return timed

    def report(self) -> dict:
        return {k: {"calls": c, "total_s": t, "max_s": m} for k, (c, t, m) in self.stats.items()}


class TimedSource:
    """Wraps a daemon ``Source``: when the first records after ``warm_events`` arrived (``t_first``; the events
    processed before it are counted by the caller, ``_mark_processed``), when the last commit ended, the time spent
    in each client call, and (``cpu_probe``) the CPU readings at that mark and at the last commit."""

    def __init__(self, inner: Any, phases: Phases, cpu_probe: Callable[[], tuple[float, float]] | None = None,
                 warm_events: int = 0) -> None:
        self.inner = inner
        self.warm_events = warm_events
        self.t_first: float | None = None
        self.n_polled = 0
        self.t_commit: float | None = None
        self.rss_commit: int | None = None
        self._cpu_probe = cpu_probe
        self.cpu_first: tuple[float, float] | None = None
        self.cpu_commit: tuple[float, float] | None = None
        self._poll = phases.wrap("source.poll", inner.poll)
        self._commit = phases.wrap("source.commit", inner.commit)
        self.commit_async = phases.wrap("source.commit_async", inner.commit_async)
        self.lag = phases.wrap("source.lag", inner.lag)

    def poll(self, max_records: int, timeout_ms: int):
        batch = self._poll(max_records, timeout_ms)
        if len(batch) and self.t_first is None and self.n_polled >= self.warm_events:  # this batch is timed
            self.t_first = time.perf_counter()
            self.cpu_first = self._cpu_probe() if self._cpu_probe else None
        self.n_polled += len(batch)
        return batch

    def commit(self, offsets, timeout_s: float | None = None) -> None:
        """The shutdown's synchronous commit (the end of the measured run): its time, CPU and resident set, the
        daemon still whole (its clients close after it)."""
        self._commit(offsets, timeout_s)
        self.t_commit = time.perf_counter()
        self.cpu_commit = self._cpu_probe() if self._cpu_probe else None
        self.rss_commit = common.rss_bytes()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def instrument(daemon: Any, phases: Phases) -> None:
    """Time the daemon's loop phases (instance attributes shadow the methods; the daemon is not changed)."""
    daemon.bench_phases = phases  # read second by second by benchmarks.latency
    daemon._poll = phases.wrap("daemon._poll", daemon._poll)  # the loop's poll, or its wait for a poll ahead
    daemon.process = phases.wrap("daemon.process", daemon.process)
    daemon.flush = phases.wrap("daemon.flush (score, alerts)", daemon.flush)
    daemon.engine.score = phases.wrap("engine.score", daemon.engine.score)
    daemon._flush_and_commit = phases.wrap("daemon._flush_and_commit", daemon._flush_and_commit)


def raw_rate(spec: dict) -> dict:
    """(a) The same client and decoder as the daemon, no detection: poll + ``decode_batch`` until N events (every
    one of which must decode: a record that does not is no event of a)."""
    from pipelines import native_decode
    from pipelines.allocator import keep_freed_memory
    from pipelines.decode import FeatureSpec, SpecCache, decode_batch
    from pipelines.source import make_source

    features = FeatureSpec(tuple(f"f{j}" for j in range(FEATURES)))
    specs = SpecCache(lambda s: features)  # kept across polls, as the daemon's intake does (item 22)
    src = make_source(spec["client"], bootstrap_servers=spec["bootstrap"], group_id=f"raw-{uuid.uuid4().hex[:8]}",
                      topics=[spec["topic"]], pattern=None, on_assign=lambda tps: None, on_revoke=lambda tps: None,
                      auto_offset_reset="earliest", **spec.get("consumer_settings", {}))
    keep_freed_memory()  # as Daemon.run does: the decoder's arrays come from reused heap in both loops
    native_decode.load()  # as the daemon's intake does at start: never a build inside the measured interval
    gc.freeze()  # as the daemon does after start-up: without it this loop alone paid full collections of
    # torch's start-up objects, and kafka-python's a was too low (RESULTS, pipeline section)
    n, n_first, t_first, ok = 0, 0, None, 0
    deadline = time.monotonic() + spec.get("timeout_s", 300)
    try:
        while n < spec["n_events"] and time.monotonic() < deadline:
            batch = src.poll(spec.get("poll_max_records", 5000), 100)
            if not len(batch):
                continue
            if t_first is None and n >= WARM_FRACTION * spec["n_events"]:  # this batch's decoding is timed
                t_first, n_first, cpu_first = time.perf_counter(), n, common.cpu_now(spec)
            decoded = decode_batch(batch.value, batch.key, batch.timestamp, specs, 65536)
            ok += decoded.n_ok
            n += len(batch)
        t_end, cpu_end = time.perf_counter(), common.cpu_now(spec)
    finally:
        src.close()
    if n < spec["n_events"]:
        raise RuntimeError(f"raw consumer read {n} of {spec['n_events']} events before its timeout")
    if t_first is None:
        raise RuntimeError(f"no poll after the first {WARM_FRACTION:.0%} of {n} events: too few events to time")
    if ok != n:  # a = events decoded per second: a record that did not decode must not count in it
        raise RuntimeError(f"raw consumer decoded {ok} of the {n} events it read")
    return {"events": n, "decoded": ok, "events_s": (n - n_first) / (t_end - t_first), "rss": common.rss_bytes(),
            "cpu": common.cpu_used(cpu_first, cpu_end, t_end - t_first, n - n_first)}


def daemon_config(tmp: Path, spec: Mapping[str, Any]) -> Path:
    """A daemon config for one benchmark run (route ``s-*`` -> the served models)."""
    cfg = {
        "kafka": {"bootstrap_servers": spec["bootstrap"], "client": spec["client"],
                  "group_id": f"bench-{uuid.uuid4().hex[:8]}", "topics": [spec["topic"]],
                  "dead_letter_topic": f"{spec['topic']}-dlq", "poll_timeout_ms": spec.get("poll_timeout_ms", 100),
                  "poll_max_records": spec.get("poll_max_records", 5000),
                  "poll_ahead": spec.get("poll_ahead", True),
                  **{k: spec[k] for k in ("fetch_min_bytes", "fetch_max_wait_ms") if k in spec}},
        "models": {"dir": spec["models_dir"], "served": [{"name": n} for n in spec["models"]],
                   "device": spec.get("device", "cpu"), "precision": spec.get("precision", "float32"),
                   "watch_interval_s": 3600},
        "routes": [{"match": "s-*", "models": spec["models"], "combine": "max"}],
        "processing": {"stride": spec["stride"], "max_batch_windows": spec.get("max_batch_windows", 4096),
                       "max_delay_ms": spec.get("max_delay_ms", 20),
                       "score_in_background": spec.get("background", True),
                       "model_threads": spec.get("threads") or 0},  # 0: the daemon's own rule
        "alerts": {"k": 3, "n": 5, "m": 10, "cooldown_s": spec.get("cooldown_s", 60)},
        "sinks": {"kafka": {"enabled": True, "topic": f"{spec['topic']}-alerts"}, "log": {"enabled": False}},
        "metrics": {"top_k_streams": spec.get("top_k_streams", 0)},
        "http": {"bind": "127.0.0.1", "port": 0},
        "shutdown": {"grace_period_s": 30},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def seed_windows(daemon: Any, fleet: common.Fleet, first_step: int, stride: int) -> None:
    """Fill every stream's window buffer with the W-1 (+ a stride phase) readings before ``first_step``, as a
    daemon that has run for a while holds them: the first event of each stream then completes a window (at
    stride 1; at stride s the streams' phases are spread evenly). Done in memory, not through Kafka."""
    route = daemon.routes[0]
    ids = route.stream_ids(fleet.names)  # (S,) registers every stream in order
    phase = np.arange(fleet.n_streams) % stride  # (S,)
    for lo in range(0, fleet.n_streams, 20_000):
        s = np.arange(lo, min(lo + 20_000, fleet.n_streams))
        count = WINDOW - 1 + phase[s]  # (k,) readings per stream
        rep = np.repeat(s, count)
        back = np.concatenate([np.arange(c, 0, -1) for c in count.tolist()])
        steps = first_step - back  # (N,) oldest first per stream
        route.buffer.add(ids[rep], T0_MS + steps * INTERVAL_MS, fleet.values(steps, rep))


def _mark_processed(daemon: Any, source: Callable[[], TimedSource | None]) -> dict[str, int]:
    """``{"events": n}``: the events the daemon had processed when it began the first batch after the warm-up
    mark (``t_first`` of the TimedSource ``source()`` returns, once the daemon's run made it), filled in then.
    Polled counts would include the records of a poll that assigns a partition, which are dropped and read again."""
    mark: dict[str, int] = {}
    process = daemon.process

    def process_marked(batch: Any) -> None:
        src = source()
        if not mark and src is not None and src.t_first is not None:
            mark["events"] = daemon.events_seen
        process(batch)

    daemon.process = process_marked
    return mark


def daemon_rate(spec: dict) -> dict:
    """(b) anomalyd end to end: ``Daemon.run(count=N)`` with warm window buffers; rate, memory, histograms. The
    events it counts must have been scored (:func:`check_scored`, else ``RuntimeError``)."""
    import torch

    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.source import make_source

    fleet = common.Fleet(spec["n_streams"], FEATURES)
    holder: dict[str, TimedSource] = {}
    phases = Phases()

    def factory(**kwargs: Any) -> TimedSource:
        source = make_source(**kwargs, **spec.get("consumer_settings", {}))  # the benchmark's --consumer-setting
        holder["src"] = TimedSource(source, phases, lambda: common.cpu_now(spec),
                                    warm_events=int(WARM_FRACTION * spec["n_events"]))
        return holder["src"]

    if spec.get("switch_interval_ms"):  # this process only (each run has its own)
        sys.setswitchinterval(spec["switch_interval_ms"] / 1000)
    rss0 = common.rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(load_config(daemon_config(Path(tmp), spec)), source_factory=factory)
        instrument(daemon, phases)
        processed_before = _mark_processed(daemon, lambda: holder.get("src"))  # the source comes with run()
        rss_models = common.rss_bytes()
        seed_windows(daemon, fleet, spec["first_step"], spec["stride"])
        rss_seeded = common.rss_bytes()
        if spec.get("before_run"):
            spec["before_run"](daemon)
        cpu0, threads0 = common.cpu_seconds(), common.thread_cpu_seconds()
        code = daemon.run(count=spec["n_events"], timeout=spec.get("timeout_s", 300))
        cpu_s = common.cpu_seconds() - cpu0
        threads1 = common.thread_cpu_seconds()
        cpu_threads = {k: v - threads0.get(k, 0.0) for k, v in threads1.items() if v - threads0.get(k, 0.0) >= 0.05}
    src = holder["src"]
    if code != 0 or daemon.events_seen < spec["n_events"] or src.t_commit is None:
        raise RuntimeError(f"daemon exit {code}, saw {daemon.events_seen} of {spec['n_events']} events")
    if src.t_first is None or "events" not in processed_before:
        raise RuntimeError(f"no poll after the first {WARM_FRACTION:.0%} of {daemon.events_seen} events: too few "
                           "events to time")
    n_first = processed_before["events"]
    route = daemon.routes[0]
    metrics = metric_summary(daemon.registry)
    scoring = check_scored(metrics, daemon.events_seen, spec["stride"], spec["models"])  # raises when they were not
    out = {"events": daemon.events_seen, "events_s": (daemon.events_seen - n_first) / (src.t_commit - src.t_first),
           "seconds": src.t_commit - src.t_first, "rss": src.rss_commit, "rss_after_close": common.rss_bytes(),
           "rss_start": rss0,
           "rss_models": rss_models, "rss_seeded": rss_seeded, "buffer_bytes": route.buffer.memory_bytes(),
           "streams": len(route.stream_names), "fused": daemon.engine.fused,
           "metrics": metrics, "scoring": scoring, "phases": phases.report(),
           "threads": torch.get_num_threads(), "cpu_s": cpu_s, "cpu_threads": cpu_threads,
           "scoring_threads": None if daemon.scoring_threads is None else  # model_threads 0: adaptive (last, switches)
           {"last": daemon.scoring_threads.threads, "switches": daemon.scoring_threads.switches},
           "cpu": common.cpu_used(src.cpu_first, src.cpu_commit, src.t_commit - src.t_first,
                           daemon.events_seen - n_first)}
    return out


def engine_rate(spec: dict) -> dict:
    """(e) The same model through ``InferenceEngine.score`` on the fleet's windows from memory."""
    from detector.base import sliding_windows
    from detector.engine import InferenceEngine
    from pipelines.model_store import ModelStore

    fleet = common.Fleet(max(spec["n_streams"], 64), FEATURES)
    det = ModelStore(spec["models_dir"]).load(spec["models"][0]).detector
    engine = InferenceEngine(spec.get("device", "cpu"), spec.get("precision", "float32"))
    engine.swap({"m": det})
    out = {"fused": engine.fused, "windows_s": {}}
    for b in spec["batches"]:
        per = max(1, b // 64)  # windows from 64 streams, consecutive steps
        wins = np.concatenate([sliding_windows(fleet.values(np.arange(per + WINDOW - 1), np.full(per + WINDOW - 1, s)),
                                               WINDOW) for s in range(64)])[:b]
        wins = np.ascontiguousarray(wins)  # (b, W, F)
        t = common.measure(lambda w=wins: engine.score({"m": w}), min_time=spec.get("min_time", 2.0))
        out["windows_s"][b] = b / t.median_s
    return out
