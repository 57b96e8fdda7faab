"""Latency benchmark: event->score and event->alert latency at half of the measured capacity.

In one run, per Kafka client: the daemon's sustained capacity is measured on a pre-filled topic (stride 1,
S=1,000 streams, as ``benchmarks.pipeline`` (b)); then a fresh daemon (window buffers pre-seeded, so every event
is scored) consumes a live topic while this process produces at half that capacity for D seconds, each event
stamped with its production time (``ts`` = wall clock, ms). Every second one more stream gets a level shift of
+8 for 12 events, so alerts fire and resolve. p50/p99 come from the daemon's own histograms
(``anomalyd_event_to_score_seconds``, ``anomalyd_event_to_alert_seconds``), interpolated inside their buckets
like Prometheus' ``histogram_quantile``; the bucket that holds p99 is reported too.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import common, daemon_metrics, harness
from .pipeline import models_dir

FULL = {"clients": ["kafka-python", "confluent"], "streams": 1000, "probe_events": 100_000, "seconds": 60}
QUICK = {"clients": ["kafka-python"], "streams": 1000, "probe_events": 20_000, "seconds": 12}
SHIFT_EVENTS = 12
WARMUP_S = 20.0  # live traffic before the measured seconds: the broker's JIT and the daemon's first batches
WARM_RATE = 14_000  # events/s of the broker warm-up (--warm-broker-s), about the offered rate of these runs
WARM_ROUNDS = 3  # at most this many warm-up passes per client
JIT_QUIET = 0.05  # cores: the broker's JIT threads below this in every pass of a round end the warm-up


def _live_daemon(spec: dict) -> dict:
    """The daemon on the live topic; sets ``spec['ready']`` once it has its partitions and seeded windows.
    Adds ``timeline``: every second after that, (time.monotonic(), event->score histogram, event->alert histogram)
    (CLOCK_MONOTONIC: one clock for every process of the host)."""
    ready = spec.pop("ready")
    timeline: list[tuple[float, dict | None, dict | None]] = []
    threads: list[int | None] = []  # every second, the scoring thread's intra-op threads (None: fixed)
    phases: list[dict[str, list]] = []  # every second, the loop's phases so far ({name: [calls, total s]})

    def watch(daemon) -> None:
        def loop() -> None:
            while not daemon.is_ready():
                time.sleep(0.01)
            ready.set()
            while daemon.is_ready() or not timeline:
                time.sleep(1.0)
                m = daemon_metrics.metric_summary(daemon.registry)  # the clock: the producer's (:func:`_rebased`)
                timeline.append((time.monotonic(), m.get("anomalyd_event_to_score_seconds"),
                                 m.get("anomalyd_event_to_alert_seconds")))
                threads.append(daemon.scoring_threads.threads if daemon.scoring_threads else None)
                phases.append({"records polled": [daemon.source.n_polled, 0.0],
                               **{k: [v[0], round(v[1], 4)] for k, v in daemon.bench_phases.stats.items()}})

        threading.Thread(target=loop, daemon=True).start()

    out = harness.daemon_rate({**spec, "before_run": watch})
    return {**out, "timeline": timeline, "threads_timeline": threads, "phases_timeline": phases}


def _produce_live(bootstrap: str, topic: str, fleet: common.Fleet, rate: float, seconds: float,
                  first_step: int) -> dict:
    """Produce ``rate`` events/s for ``seconds`` (every stream once per step), ts = production time."""
    import orjson
    from confluent_kafka import Producer

    n = int(rate * seconds)
    stream, step = fleet.events(first_step, n)
    vals = fleet.values(step, stream)  # (N, F)
    shift_every = max(1, int(rate))  # one more anomalous stream per second
    anomalous = np.zeros(n, dtype=bool)
    for k, start in enumerate(range(fleet.n_streams, n, shift_every)):
        s = (7 * k + 3) % fleet.n_streams
        hit = np.flatnonzero(stream[start:] == s)[:SHIFT_EVENTS] + start
        anomalous[hit] = True
    vals[anomalous] += 8.0
    rows = np.round(vals.astype(np.float64), 4).tolist()
    names = [fleet.names[s] for s in stream.tolist()]
    keys = [nm.encode() for nm in names]
    # everything but the time stamp encoded ahead: the producer shares the machine's CPUs with the daemon
    heads = [b'{"stream":' + orjson.dumps(nm) + b',"ts":' for nm in names]
    tails = [b',"values":' + orjson.dumps(r) + b"}" for r in rows]
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "1"})
    p.list_topics(topic, timeout=30)  # connected, with the topic's leaders, before the first time stamp
    t0, started = time.perf_counter(), time.monotonic()
    for i in range(n):
        ahead = t0 + i / rate - time.perf_counter()
        if ahead > 0.001:
            time.sleep(ahead)
        p.produce(topic, b"%s%d%s" % (heads[i], int(time.time() * 1000), tails[i]), keys[i])
        if i % 64 == 0:
            p.poll(0)
    p.flush(60)
    return {"events": n, "anomalous_events": int(anomalous.sum()), "achieved_rate": n / (time.perf_counter() - t0),
            "started": started}


def _rebased(timeline: list, started: float) -> list:
    """``timeline``'s times as seconds since the first event was produced: the steady mark (WARMUP_S) counts from
    there. It counted from the daemon's readiness, before the producer had encoded its messages (4-5 s), so the
    steady percentiles took in the first seconds of traffic."""
    return [(round(t - started, 1), score, alert) for t, score, alert in timeline]


def _warm_up(base: dict, bootstrap: str, fleet: common.Fleet, clients: list[str], seconds: float,
             first_step: int, broker_pid: int | None) -> list[dict]:
    """Unmeasured live passes of every measured client, before anything is measured: the daemon as measured, on
    a fresh topic, while this process produces ``WARM_RATE`` events/s for ``seconds``. They give the broker's
    JIT the paths these runs exercise (fetches as the daemons set them, commits, the alert producer); a bare
    consumer group did not, and the first client measured paid for the compilation: 0.35-0.8 of a core in its
    first seconds, on the two vCPUs it shares (benchmarks/RESULTS.md, Latency, thirteenth session). Rounds of
    passes repeat, up to ``WARM_ROUNDS``, until the JIT's threads used under ``JIT_QUIET`` of a core in every pass
    of a round. Returns each pass's client and the JIT's CPU seconds in it."""
    passes: list[dict] = []
    for _ in range(WARM_ROUNDS):
        for client in clients:
            topic = harness.new_topic(bootstrap, "lat-warm", 4)
            th, out = _start_live_daemon(base, client, topic, int(WARM_RATE * seconds), seconds)
            jit0 = common.jit_cpu_seconds(broker_pid) if broker_pid else float("nan")
            _produce_live(bootstrap, topic, fleet, WARM_RATE, seconds, first_step)
            jit = common.jit_cpu_seconds(broker_pid) - jit0 if broker_pid else float("nan")
            _join(th, out, client)
            passes.append({"client": client, "seconds": seconds, "broker_jit_cpu_s": round(jit, 2)})
            common.log(f"  warm-up pass ({client}): the broker's JIT used {jit:.2f} CPU s in {seconds:g} s")
        # an unknown JIT time (a broker this process did not start: NaN) counts as quiet
        if not any(p["broker_jit_cpu_s"] >= JIT_QUIET * seconds for p in passes[-len(clients):]):
            break
    return passes


def _start_live_daemon(base: dict, client: str, topic: str, n_events: int,
                       seconds: float) -> tuple[threading.Thread, dict]:
    """The daemon on ``topic`` in a process of its own, until ``n_events``; returns once it has its partitions,
    with the thread that waits for it and the dict its result goes into (:func:`_join`)."""
    ready = mp.get_context("spawn").Event()
    spec = {**base, "client": client, "topic": topic, "n_events": n_events, "ready": ready,
            "timeout_s": seconds + 120, "cooldown_s": 300}
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(harness.in_process(_live_daemon, spec)))
    th.start()
    if not ready.wait(180):
        raise RuntimeError(f"the live daemon ({client}) did not get its partitions in 180 s")
    return th, out


def _join(th: threading.Thread, out: dict, client: str) -> dict:
    th.join()
    if not out:
        raise RuntimeError(f"the live daemon ({client}) returned no result")
    return out


def run(cfg: dict, kind: str, threads: int | None, background: bool = True, max_delay_ms: int = 20,
        fetch: dict | None = None, offered: float | None = None, warm_broker_s: float = 0.0,
        device: str = "cpu") -> list[dict]:
    rows = []
    kafka, bootstrap = harness.start_broker()
    common.log(f"broker at {bootstrap}")
    first_step = harness.WINDOW + 8
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mdir, names = models_dir(Path(tmp), kind)
            S = cfg["streams"]
            fleet = common.Fleet(S, harness.FEATURES)
            base = {"bootstrap": bootstrap, "models_dir": mdir, "models": names, "threads": threads,
                    "background": background, "max_delay_ms": max_delay_ms, "n_streams": S, **(fetch or {}),
                    "device": device,
                    "first_step": first_step, "stride": 1}
            warm: list[dict] = []
            if warm_broker_s > 0:
                common.log(f"warming the broker: an unmeasured live daemon per client, {warm_broker_s:g} s each "
                           f"at {WARM_RATE:,} events/s, until its JIT is quiet")
                warm = _warm_up(base, bootstrap, fleet, cfg["clients"], warm_broker_s, first_step,
                                kafka.status().pid)
            probe_topic = harness.new_topic(bootstrap, "lat-probe", 4)
            harness.prefill(bootstrap, probe_topic, fleet, cfg["probe_events"], first_step)
            for client in cfg["clients"]:
                cap = harness.in_process(harness.daemon_rate, {**base, "client": client, "topic": probe_topic,
                                                               "n_events": cfg["probe_events"]})["events_s"]
                rate = offered or cap / 2
                common.log(f"{client}: capacity {cap:,.0f} events/s -> producing {rate:,.0f} events/s for "
                           f"{cfg['seconds']} s")
                topic = harness.new_topic(bootstrap, "lat-live", 4)
                n = int(rate * (WARMUP_S + cfg["seconds"]))
                th, out = _start_live_daemon(base, client, topic, n, cfg["seconds"])
                broker_pid = kafka.status().pid
                cpu0 = (time.process_time(), common.cpu_seconds(broker_pid) if broker_pid else None,
                        common.jit_cpu_seconds(broker_pid) if broker_pid else None)
                prod = _produce_live(bootstrap, topic, fleet, rate, WARMUP_S + cfg["seconds"], first_step)
                cpu_prod = time.process_time() - cpu0[0]
                cpu_broker = common.cpu_seconds(broker_pid) - cpu0[1] if broker_pid else None
                cpu_jit = common.jit_cpu_seconds(broker_pid) - cpu0[2] if broker_pid else None
                _join(th, out, client)
                out["timeline"] = _rebased(out.get("timeline") or [], prod["started"])
                m = out["metrics"]
                score_h = m["anomalyd_event_to_score_seconds"]
                alert_h = m.get("anomalyd_event_to_alert_seconds", {"buckets": [], "count": 0})
                adaptive = [t for t in out["threads_timeline"] if t is not None]
                label = str(out.get("threads"))
                if adaptive:
                    common.log(f"  scoring thread's intra-op threads, second by second: {adaptive}")
                    most = max(set(adaptive), key=adaptive.count)
                    label = f"adaptive: {most} in {adaptive.count(most) / len(adaptive):.0%} of seconds"
                row = {"client": client, "threads": label, "capacity_s": cap, "rate_s": rate,
                       "scoring_threads": out.get("scoring_threads"), "threads_timeline": out["threads_timeline"],
                       "achieved_rate_s": prod["achieved_rate"],
                       "events": n, "windows": score_h["count"],
                       "alert_messages": alert_h["count"],  # firing and resolved
                       "score_p50_ms": _ms(daemon_metrics.quantile(score_h, 0.5)),
                       "score_p99_ms": _ms(daemon_metrics.quantile(score_h, 0.99)),
                       "score_p99_bucket_ms": _ms(_bucket(score_h, 0.99)),
                       "alert_p50_ms": _ms(daemon_metrics.quantile(alert_h, 0.5)),
                       "alert_p99_ms": _ms(daemon_metrics.quantile(alert_h, 0.99)),
                       "alert_p99_bucket_ms": _ms(_bucket(alert_h, 0.99)),
                       "mean_batch": _mean(m.get("anomalyd_inference_batch_size")),
                       "rebalances": sum(m.get("anomalyd_rebalances", {}).values()),  # 1: the first join only
                       "cpu_s": {"daemon": out.get("cpu_s"), "producer": cpu_prod, "broker (while producing)":
                                 cpu_broker, "broker's JIT (while producing)": cpu_jit,
                                 "daemon threads": out.get("cpu_threads")},
                       "warm_up_passes": warm,
                       "histograms": {"event_to_score": score_h, "event_to_alert": alert_h},
                       "steady_from_s": WARMUP_S, **_steady(out.get("timeline") or [], score_h, alert_h),
                       "timeline": out.get("timeline"),
                       "phases_timeline": out.get("phases_timeline"),
                       "phases": out["phases"]}
                rows.append(row)
                common.log(f"  event->score p50 {row['score_p50_ms']} ms p99 {row['score_p99_ms']} ms; "
                           f"event->alert p50 {row['alert_p50_ms']} ms p99 {row['alert_p99_ms']} ms "
                           f"({row['alert_messages']:.0f} alert messages, {row['rebalances']:.0f} assignment(s))")
                common.log(f"  CPU seconds: {row['cpu_s']}")
                common.log("  " + "; ".join(f"{k}: {v['calls']} calls, {v['total_s']:.2f} s, "
                                            f"max {1000 * v['max_s']:.0f} ms" for k, v in out["phases"].items()))
    finally:
        if kafka.launched:
            kafka.stop()
    return rows


def _minus(end: dict, start: dict | None) -> dict:
    """Histogram of the observations made after ``start`` was taken (cumulative buckets and counts subtract)."""
    if not start:
        return end
    before = dict(start["buckets"])
    return {"buckets": [(le, c - before.get(le, 0.0)) for le, c in end["buckets"]],
            "count": end["count"] - start["count"], "sum": end["sum"] - start["sum"]}


def _steady(timeline: list, score_h: dict, alert_h: dict) -> dict:
    """Quantiles of the events scored after the first WARMUP_S seconds of live traffic (the daemon's first
    fetches and batches, the producer's first second), and events over 200 ms per second of the run."""
    mark = next((t for t in timeline if t[0] >= WARMUP_S), None)
    score, alert = _minus(score_h, mark and mark[1]), _minus(alert_h, mark and mark[2])
    slow, prev = [], None
    for t, h, _ in timeline:
        over = h["count"] - next((c for le, c in h["buckets"] if le >= 0.2), 0.0) if h else 0.0
        slow.append((t, over - (prev or 0.0)))
        prev = over
    return {"steady_score_p50_ms": _ms(daemon_metrics.quantile(score, 0.5)),
            "steady_score_p99_ms": _ms(daemon_metrics.quantile(score, 0.99)),
            "steady_alert_p50_ms": _ms(daemon_metrics.quantile(alert, 0.5)),
            "steady_alert_p99_ms": _ms(daemon_metrics.quantile(alert, 0.99)),
            "steady_alert_p99_bucket_ms": _ms(_bucket(alert, 0.99)), "steady_alert_messages": alert["count"],
            "over_200ms_per_second": slow}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def _mean(h: dict | None) -> float | None:
    return h["sum"] / h["count"] if h and h.get("count") else None


def _bucket(hist: dict, q: float) -> float | None:
    """Upper bound of the bucket that holds the q-quantile."""
    if not hist.get("count"):
        return None
    return next(le for le, c in hist["buckets"] if c >= q * hist["count"])


def main(argv: list[str] | None = None) -> int:
    p = common.parser("latency", __doc__)
    p.add_argument("--kind", choices=["gru", "lstm"], default="gru")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the daemon (default: its own rule, processing.model_threads 0)")
    p.add_argument("--serial", action="store_true", help="processing.score_in_background false in the daemons")
    p.add_argument("--clients", nargs="+", choices=["kafka-python", "confluent"], default=None,
                   help="clients to run (default: both; --quick: kafka-python)")
    p.add_argument("--fetch-min-bytes", type=int, default=None, help="kafka.fetch_min_bytes in the daemons")
    p.add_argument("--fetch-max-wait-ms", type=int, default=None, help="kafka.fetch_max_wait_ms in the daemons")
    p.add_argument("--max-delay-ms", type=int, default=20, help="processing.max_delay_ms in the daemons (default 20)")
    p.add_argument("--warm-broker-s", type=float, default=None,
                   help="seconds of each unmeasured live daemon per client and round through the fresh broker "
                        "before any client is measured (default 20; --quick: 10; 0: none)")
    p.add_argument("--device", default="cpu", help="the daemons' models.device (default cpu; cuda on a GPU machine)")
    p.add_argument("--seconds", type=int, default=None,
                   help="measured seconds per client after the warm-up (default 60; --quick: 12)")
    p.add_argument("--rate", type=float, default=None,
                   help="offered events/s instead of half the measured capacity (capacity is still measured)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.clients:
        cfg["clients"] = args.clients
    if args.seconds:
        cfg["seconds"] = args.seconds
    if args.warm_broker_s is None:
        args.warm_broker_s = 10.0 if args.quick else 20.0
    started = time.perf_counter()
    fetch = {k: v for k, v in (("fetch_min_bytes", args.fetch_min_bytes), ("fetch_max_wait_ms",
                                                                         args.fetch_max_wait_ms)) if v is not None}
    rows = run(cfg, args.kind, args.threads, not args.serial, args.max_delay_ms, fetch, args.rate,
               args.warm_broker_s, args.device)
    print(common.table(rows, [
        ("client", "client", ""), ("threads", "threads", ""), ("capacity_s", "capacity ev/s", ",.0f"),
        ("rate_s", "offered ev/s", ",.0f"),
        ("achieved_rate_s", "produced ev/s", ",.0f"), ("windows", "windows", ",.0f"),
        ("alert_messages", "alert msgs", ",.0f"),
        ("score_p50_ms", "score p50 ms", ""), ("score_p99_ms", "score p99 ms", ""),
        ("score_p99_bucket_ms", "(bucket <=)", ""), ("alert_p50_ms", "alert p50 ms", ""),
        ("alert_p99_ms", "alert p99 ms", ""), ("alert_p99_bucket_ms", "(bucket <=)", ""),
        ("mean_batch", "mean batch", ",.0f"), ("steady_score_p99_ms", "steady score p99", ""),
        ("steady_alert_p50_ms", "steady alert p50", ""), ("steady_alert_p99_ms", "steady alert p99", ""),
        ("steady_alert_p99_bucket_ms", "(bucket <=)", "")],
        f"\nLatency at {f'{args.rate:,.0f} events/s' if args.rate else 'half capacity'}, "
        f"{args.kind.upper()} W=64 F=8 H=64, {cfg['streams']} streams, "
        f"{cfg['seconds']} s, on {args.device}"))
    common.write_json(args.json, "latency", {"quick": args.quick, "kind": args.kind, "device": args.device,
                                             "config": cfg,
                                             "threads": args.threads, "background": not args.serial, "fetch": fetch,
                                             "max_delay_ms": args.max_delay_ms, "rate": args.rate,
                                             "warm_broker_s": args.warm_broker_s, "rows": rows,
                                             "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
