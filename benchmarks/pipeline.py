"""Pipeline benchmark: anomalyd end to end through a real local Kafka broker, against its two limits.

For S streams (1,000 and 100,000; 8 features, W=64, the GRU model of ``common.trained_detector``) a topic is
pre-filled with N events (every stream once per step, JSON ``{"stream","ts","values":[...]}``), then, each in
a fresh process and all in this run:

* (a) raw: the same Kafka client as the daemon (``pipelines.source``) polling + ``decode_batch``, no detection;
* (b) anomalyd: ``Daemon.run`` at stride 1 (every event scored) and stride 8, window buffers pre-seeded in
  memory with each stream's previous W-1 readings (a daemon that has been running), Kafka alert sink on;
  scoring serial and on a second thread (``processing.score_in_background``, the default), each with the
  daemon's own torch threads (``processing.model_threads: 0``: the CPUs the process may use; with the scoring
  thread, 1 to that many as busy as it is, ``pipelines.scoring_threads``) unless ``--threads`` fixes them for
  every process; at stride 8 (full run) the median of three daemons, as those
  runs last only a few seconds;
* (e) engine: ``InferenceEngine.score`` of the same model, with the same torch threads as the daemon it is
  compared with, on windows from memory at batch 512 and at the daemon's maximum micro-batch
  (``max_batch_windows`` = 4096); the faster of the two is used (the stricter ratio);

for kafka-python and confluent-kafka. A run fails rather than report an a whose records did not all decode, or
a b whose events were not scored (``daemon_metrics.check_scored``: replayed, unrouted, dead-lettered records, or windows
left unscored). Reported: events/s, the ratio b / min(a, e) (e in events/s = windows/s x
stride), the cores that (a) and (b) kept busy together with the broker (CPU seconds of the process and of the
broker JVM over the measured interval, per second: near the host's CPU count, the run was CPU-bound), the daemon's
loop phases, resident memory per stream (RSS difference between the 100,000- and
1,000-stream daemons), and (full run) a prototype loop with the engine on a second thread.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import common, harness, prototype

FULL = {"streams": [1000, 100_000], "events": {1000: 200_000, 100_000: 300_000}, "clients": ["kafka-python",
        "confluent"], "strides": [1, 8], "partitions": 4, "engine_batches": [512, 4096], "engine_min_time": 3.0,
        "prototype": False, "background": [False, True],
        # stride 8 (and the raw client) read more events: 200,000 lasted 2 s, and the last micro-batch's scoring
        # and commit after the last poll (0.1-0.25 s) cut b by 5-10 %; the median of 3 daemons for what noise is left
        "events_stride8": {1000: 1_000_000, 100_000: 1_200_000}, "repeats": {8: 3}}
QUICK = {"streams": [1000], "events": {1000: 30_000}, "clients": ["kafka-python"], "strides": [1, 8],
         "partitions": 4, "engine_batches": [512, 4096], "engine_min_time": 1.0, "background": [False, True]}


def models_dir(root: Path, kind: str, hidden: int = 64) -> tuple[str, list[str]]:
    """Save the benchmark model (``hidden`` units) into a model store under ``root``; returns (dir, [name])."""
    from pipelines.model_store import ModelStore

    det = common.trained_detector(kind, common.Fleet(4, harness.FEATURES), window=harness.WINDOW, hidden=hidden,
                                  log=common.log)
    ModelStore(root).save(f"bench-{kind}", det, version="v1")
    return str(root), [f"bench-{kind}"]


def run(cfg: dict, kind: str, threads: int | None, consumer_settings: dict | None = None,
        device: str = "cpu", precision: str = "float32", hidden: int = 64) -> dict:
    import torch

    from detector.device import inference_threads

    # torch threads of every process: --threads, else the daemon's own rule (processing.model_threads: 0; e and the
    # serial daemon use every CPU it allows, the scoring thread adapts)
    n_threads = threads or inference_threads(0) or torch.get_num_threads()  # None: OMP_NUM_THREADS decides
    rows, memory, protos = [], [], []
    kafka, bootstrap = harness.start_broker()
    common.log(f"broker at {bootstrap}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mdir, names = models_dir(Path(tmp), kind, hidden)
            base = {"bootstrap": bootstrap, "models_dir": mdir, "models": names, "threads": threads,
                    "consumer_settings": consumer_settings or {}, "device": device, "precision": precision,
                    "broker_pid": kafka.status().pid}  # its CPU is read around every measured interval
            for S in cfg["streams"]:
                n = cfg["events"][S]
                n8 = cfg.get("events_stride8", {}).get(S, n)  # stride 8 and the raw client
                fleet = common.Fleet(S, harness.FEATURES)
                topic = harness.new_topic(bootstrap, f"bench-s{S}", cfg["partitions"])
                t0 = time.perf_counter()
                produced = harness.prefill(bootstrap, topic, fleet, max(n, n8), first_step=harness.WINDOW + 8,
                                           by_name=cfg.get("values") == "object")
                common.log(f"S={S}: {max(n, n8)} events in {topic} ({produced:,.0f} msg/s, "
                           f"{time.perf_counter() - t0:.0f} s)")
                spec = {**base, "topic": topic, "n_streams": S, "n_events": n, "first_step": harness.WINDOW + 8}
                eng = harness.in_process(harness.engine_rate, {**spec, "threads": n_threads,
                                                               "batches": cfg["engine_batches"],
                                                               "min_time": cfg["engine_min_time"]})
                e_win = max(eng["windows_s"].values())  # the stricter ratio
                common.log(f"  engine, {n_threads} thread(s): " + ", ".join(f"B={b} {r:,.0f} windows/s"
                                                                    for b, r in eng["windows_s"].items()))
                for client in cfg["clients"]:
                    raw = harness.in_process(harness.raw_rate, {**spec, "client": client, "n_events": n8})
                    common.log(f"  {client} raw: {raw['events_s']:,.0f} events/s, {raw['cpu']['cores']:.2f} cores busy "
                               "with the broker")
                    if cfg.get("prototype") and S == min(cfg["streams"]):
                        for overlap, th in ((False, threads), (True, threads), (True, 1)):
                            pr = harness.in_process(prototype.loop_prototype, {**spec, "client": client, "stride": 1,
                                                                             "overlap": overlap, "threads": th})
                            protos.append({"streams": S, "client": client, "stride": 1, "overlap": overlap,
                                           "threads": th or pr["threads"],
                                           "events_s": pr["events_s"], "raw_events_s": raw["events_s"],
                                           "engine_events_s": e_win,
                                           "ratio": pr["events_s"] / min(raw["events_s"], e_win)})
                            common.log(f"  {client} prototype loop, overlap={overlap}, threads={th}: "
                                       f"{pr['events_s']:,.0f} events/s")
                    modes = [(bg, None, True) for bg in cfg["background"]]  # (background, GIL switch, ahead)
                    default_mode = modes[-1]  # the config default, listed last: the one memory is reported for
                    modes += [(True, ms, True) for ms in cfg.get("switch_intervals_ms", [])]
                    if cfg.get("poll_ahead_ab") and client == "confluent":  # kafka.poll_ahead off, in the same run
                        modes += [(True, None, False)]
                    for stride, (background, switch_ms, ahead) in [(s, m) for s in cfg["strides"] for m in modes]:
                        runs = [harness.in_process(harness.daemon_rate, {**spec, "client": client, "stride": stride,
                                                                         "background": background,
                                                                         "switch_interval_ms": switch_ms,
                                                                         "poll_ahead": ahead,
                                                                         "threads": threads,  # None: adaptive
                                                                         "n_events": n8 if stride == 8 else n})
                                for _ in range(cfg.get("repeats", {}).get(stride, 1))]
                        d = sorted(runs, key=lambda r: r["events_s"])[len(runs) // 2]  # the median run
                        e_ev = e_win * stride
                        bs = d["metrics"].get("anomalyd_inference_batch_size", {})
                        row = {"streams": S, "events": n8 if stride == 8 else n, "client": client, "stride": stride,
                               "scoring": ("background" if background else "serial")
                               + (f" gil {switch_ms:g}ms" if switch_ms else "")
                               + ("" if ahead else ", no poll ahead"), "threads": n_threads,
                               "adaptive": d["scoring_threads"],  # model_threads 0: {"last", "switches"}
                               "raw_events_s": raw["events_s"], "engine_windows_s": e_win, "engine_events_s": e_ev,
                               "anomalyd_events_s": d["events_s"],
                               "anomalyd_runs_events_s": [r["events_s"] for r in runs],
                               "ratio": d["events_s"] / min(raw["events_s"], e_ev),
                               "bound": "client" if raw["events_s"] < e_ev else "model",
                               "mean_batch": bs["sum"] / bs["count"] if bs.get("count") else None,
                               "rss_mib": d["rss"] / 2**20, "buffer_mib": d["buffer_bytes"] / 2**20,
                               "raw_cores": raw["cpu"]["cores"], "cores": d["cpu"]["cores"],
                               "cpu": d["cpu"], "raw_cpu": raw["cpu"],
                               "fused": d["fused"], "engine_all_batches": eng["windows_s"],
                               "seconds": d["seconds"], "phases": d["phases"],
                               "scoring_check": d["scoring"],  # daemon_metrics.check_scored: b counts scored events
                               "alerts": sum(d["metrics"].get("anomalyd_alerts", {}).values())}
                        rows.append(row)
                        adapt = d["scoring_threads"]
                        th = f"1-{n_threads} thread(s), ended at {adapt['last']} after {adapt['switches']} switch(es)" \
                            if adapt else f"{n_threads} thread(s)"
                        common.log(f"  {client} stride {stride}, {row['scoring']} scoring, {th}: "
                                   f"anomalyd {d['events_s']:,.0f} events/s"
                                   f"{' (median of ' + str(len(runs)) + ')' if len(runs) > 1 else ''}, "
                                   f"ratio {row['ratio']:.2f}, "
                                   f"RSS {row['rss_mib']:.0f} MiB")
                        if (background, switch_ms, ahead) == default_mode:
                            memory.append({"streams": S, "client": client, "stride": stride, "rss": d["rss"],
                                           "rss_after_close": d["rss_after_close"],
                                           "rss_start": d["rss_start"], "rss_models": d["rss_models"],
                                           "rss_seeded": d["rss_seeded"], "buffer_bytes": d["buffer_bytes"]})
    finally:
        if kafka.launched:
            kafka.stop()
    return {"rows": rows, "memory": memory, "per_stream": per_stream(memory), "prototype": protos}


def per_stream(memory: list[dict]) -> list[dict]:
    """Resident bytes per stream: RSS difference between the largest and smallest stream counts, same run kind."""
    out = []
    sizes = sorted({m["streams"] for m in memory})
    if len(sizes) < 2:
        for m in memory:
            out.append({**{k: m[k] for k in ("client", "stride")}, "bytes_per_stream": None,
                        "buffer_bytes_per_stream": m["buffer_bytes"] / m["streams"]})
        return out
    lo, hi = sizes[0], sizes[-1]
    for m in memory:
        if m["streams"] != hi:
            continue
        small = next(x for x in memory if x["streams"] == lo and (x["client"], x["stride"]) == (m["client"],
                                                                                               m["stride"]))
        out.append({"client": m["client"], "stride": m["stride"],
                    "bytes_per_stream": (m["rss"] - small["rss"]) / (hi - lo),
                    "buffer_bytes_per_stream": m["buffer_bytes"] / hi, "rss_mib_at_max": m["rss"] / 2**20})
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("pipeline", __doc__)
    p.add_argument("--kind", choices=["gru", "lstm"], default="gru", help="model kind (default gru)")
    p.add_argument("--hidden", type=int, default=64,
                   help="the model's hidden units (default 64; a few, e.g. 4, make the model nearly free on a CPU, "
                        "so that the loop's own cost, as beside a GPU, sets b)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each process (default: the daemon's rule, processing.model_threads 0)")
    p.add_argument("--scoring", choices=["serial", "background"], action="append",
                   help="only these scoring modes (repeatable; default both)")
    p.add_argument("--switch-interval-ms", type=float, action="append", default=[],
                   help="also run background scoring with sys.setswitchinterval at this many ms in the daemon's "
                        "process (repeatable; Python's default is 5 ms)")
    p.add_argument("--events", type=int, help="events at stride 1 for every stream count (default 200,000 for "
                   "1,000 streams and 300,000 for 100,000)")
    p.add_argument("--repeats", type=int, help="daemons per stride-8 case, the median reported (default 3)")
    p.add_argument("--stride", type=int, choices=[1, 8], action="append", help="only these strides (repeatable)")
    p.add_argument("--streams", type=int, action="append", help="only these stream counts (repeatable)")
    p.add_argument("--clients", choices=["kafka-python", "confluent"], action="append", help="only these clients")
    p.add_argument("--device", default="cpu", help="the daemon's and the engine's models.device (default cpu; "
                   "cuda on a GPU machine)")
    p.add_argument("--precision", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the daemon's and the engine's models.precision (default float32)")
    p.add_argument("--values", choices=["array", "object"], default="array",
                   help="messages' values as an array in feature order (default) or an object by feature name "
                        "(anomalyd produce's format)")
    p.add_argument("--poll-ahead-ab", action="store_true",
                   help="also run each confluent case with kafka.poll_ahead off (background scoring), in the same run")
    p.add_argument("--consumer-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a client setting for the raw loop's and the daemon's consumer, e.g. "
                        "fetch.queue.backoff.ms=1000 (confluent) or max_partition_fetch_bytes=1048576 (kafka-python)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in ("streams", "clients") if getattr(args, k)})
    if args.scoring:
        cfg["background"] = [mode == "background" for mode in ("serial", "background") if mode in args.scoring]
    if set(cfg["streams"]) - set(cfg["events"]):
        p.error(f"--streams: choose from {sorted(cfg['events'])}")
    cfg["switch_intervals_ms"] = args.switch_interval_ms
    cfg["values"] = args.values
    cfg["poll_ahead_ab"] = args.poll_ahead_ab
    if args.events:
        cfg["events"] = {s: args.events for s in cfg["events"]}
    if args.repeats:
        cfg["repeats"] = {8: args.repeats}
    if args.stride:
        cfg["strides"] = sorted(set(args.stride))
    settings = {}
    for item in args.consumer_setting:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--consumer-setting {item!r}: expected KEY=VALUE")
        settings[key] = int(value) if value.lstrip("-").isdigit() else value
    started = time.perf_counter()
    res = run(cfg, args.kind, args.threads, settings, args.device, args.precision, args.hidden)
    print(common.table(res["rows"], [
        ("streams", "streams", ",d"), ("client", "client", ""), ("stride", "stride", "d"), ("scoring", "scoring", ""),
        ("threads", "threads", "d"), ("raw_events_s", "a raw ev/s", ",.0f"),
        ("engine_events_s", "e engine ev/s", ",.0f"),
        ("anomalyd_events_s", "b anomalyd ev/s", ",.0f"), ("ratio", "b/min(a,e)", ".2f"), ("bound", "bound", ""),
        ("mean_batch", "mean batch", ",.0f"), ("raw_cores", "a cores", ".2f"), ("cores", "b cores", ".2f"),
        ("rss_mib", "RSS MiB", ",.0f")],
        f"\nPipeline, {args.kind.upper()} W=64 F=8 H={args.hidden} on {args.device}, {args.precision} "
        f"(events/s; e = best of batches {cfg['engine_batches']})"))
    print(common.table(res["per_stream"], [("client", "client", ""), ("stride", "stride", "d"),
                                           ("bytes_per_stream", "RSS bytes/stream", ",.0f"),
                                           ("buffer_bytes_per_stream", "window buffer bytes/stream", ",.0f"),
                                           ("rss_mib_at_max", "RSS MiB at max streams", ",.0f")],
                       "\nResident memory per stream"))
    if res["prototype"]:
        print(common.table(res["prototype"], [("client", "client", ""), ("overlap", "engine on 2nd thread", ""),
                                              ("threads", "torch threads", "d"),
                                              ("events_s", "events/s", ",.0f"), ("ratio", "/min(a,e)", ".2f")],
                           "\nPrototype loop (poll, decode, buffers, engine; no alerts/commits), stride 1"))
    common.write_json(args.json, "pipeline", {"quick": args.quick, "kind": args.kind, "hidden": args.hidden,
                                              "device": args.device,
                                              "precision": args.precision,
                                              "config": cfg,
                                              "threads": args.threads, "consumer_settings": settings, **res,
                                              "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
