"""Intake benchmark: ``Daemon.process`` (decode, routing, window buffers, replay bookkeeping) from memory, on
poll batches of a given size, with no model call; and the cost of a full garbage collection of the daemon's
start-up objects, before and after ``gc.freeze()``.

    python -m benchmarks.intake --chunk 17 --streams 1000            # small polls, as at moderate live load
    python -m benchmarks.intake --chunk 5000 --streams 100000 --stride 8 --profile
    python -m benchmarks.intake --chunk 5000 --streams 100000 --decode-ab   # per-batch lookup vs SpecCache
    python -m benchmarks.intake --chunk 5000 --streams 1000 --stride 8 --overhead  # Daemon.process vs decode alone
    python -m benchmarks.intake --chunk 5000 --streams 1000 --values object --native-ab  # native vs Python decoder
    python -m benchmarks.intake --chunk 5000 --streams 1000 --score-overhead  # the scoring step beside the model
    python -m benchmarks.intake --chunk 5000 --streams 1000 --score-overhead --models gru,lstm --top-k 10
    python -m benchmarks.intake --chunk 5000 --streams 1000 --neighbour-ops 0 --neighbour-ops 10 --neighbour-ops 50

Every mode writes its numbers to ``--json`` (default ``~/.cache/anomalyd/bench/intake.json``), with the garbage
collection's; ``--quick``: 10,000 events (or 1 per stream if more) unless ``--events`` says otherwise.
"""

from __future__ import annotations

import cProfile
import gc
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import common, harness
from .baseline import _data
from .pipeline import models_dir


def main(argv: list[str] | None = None) -> int:
    p = common.parser("intake", __doc__)
    p.add_argument("--chunk", type=int, default=80, help="records per poll batch (default 80)")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--events", type=int, default=None,
                   help="events (default: 60,000, or 3 per stream if more; --quick: 10,000, or 1 per stream)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    p.add_argument("--decode-ab", action="store_true",
                   help="only decode_batch: the route lookup per distinct stream and batch against a SpecCache "
                        "kept across batches, alternating in this process (4 pairs, caches warm)")
    p.add_argument("--overhead", action="store_true",
                   help="Daemon.process against decode_batch alone on the same records, alternating in this "
                        "process (4 pairs, each on new events): what the intake adds to the decoder")
    p.add_argument("--values", choices=["array", "object"], default="array",
                   help="messages' values as an array in feature order (default) or an object by feature name")
    p.add_argument("--native-ab", action="store_true",
                   help="only decode_batch: the native decoder against the Python one (orjson), alternating in "
                        "this process (4 pairs; the first also warms the caches)")
    p.add_argument("--score-overhead", action="store_true",
                   help="time Daemon._score (thresholds, alert state, metrics) on each poll's due windows, minus "
                        "the model's own time: the Python work the scoring thread does while holding the GIL")
    p.add_argument("--neighbour-ops", type=int, action="append", default=[], metavar="N",
                   help="Daemon.process while a second thread issues bursts of N tiny torch calls (each gives up and "
                        "re-takes the GIL) 40 times a second, as a GPU scoring thread does per micro-batch; 0 = no "
                        "second thread (repeatable; the variants alternate, 4 rounds, each on new events)")
    p.add_argument("--neighbour-call", choices=["op", "forward"], default="op",
                   help="what one neighbour call is: a tiny torch op (default), or an eager forward of a tiny GRU "
                        "autoencoder (Python module code between the ops, as in eager GPU scoring)")
    p.add_argument("--models", default="gru", choices=["gru", "lstm", "gru,lstm"],
                   help="the route's models (default gru; gru,lstm: two models combined, as in the demo)")
    p.add_argument("--top-k", type=int, default=0, help="metrics.top_k_streams (default 0: the gauge off)")
    p.add_argument("--malloc", choices=["daemon", "default"], default="daemon",
                   help="daemon: glibc malloc settings as Daemon.run applies them (pipelines.allocator); default: "
                        "glibc's own")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.malloc == "daemon":
        from pipelines.allocator import keep_freed_memory

        keep_freed_memory()
    from pipelines.config import load_config
    from pipelines.daemon import Daemon
    from pipelines.replay import _StderrDeadLetters
    from pipelines.sinks import FanoutSink
    from pipelines.source import RecordBatch

    fleet = common.Fleet(args.streams, harness.FEATURES)
    n_events = args.events or (max(10_000, args.streams) if args.quick else max(60_000, 3 * args.streams))
    pairs = 4 if args.overhead else 4 * len(args.neighbour_ops) if args.neighbour_ops else 1
    # --overhead: every pair's process gets new events
    messages, keys, _ = _data(fleet, n_events * pairs, by_name=args.values == "object")
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for kind in args.models.split(","):  # one route of these models
            mdir, got = models_dir(Path(tmp), kind)
            names += got
        spec = {"bootstrap": "127.0.0.1:9", "client": "kafka-python", "topic": "memory", "models_dir": mdir,
                "models": names, "stride": args.stride, "background": False, "threads": 1,
                "top_k_streams": args.top_k}
        daemon = Daemon(load_config(harness.daemon_config(Path(tmp), spec)))
    daemon.producer = _StderrDeadLetters()
    daemon.sinks = FanoutSink([])
    harness.seed_windows(daemon, fleet, harness.WINDOW + 8, args.stride)

    t = time.perf_counter()
    gc.collect()
    full_ms = (time.perf_counter() - t) * 1000
    tracked = len(gc.get_objects())
    gc.freeze()
    t = time.perf_counter()
    gc.collect()
    frozen_ms = (time.perf_counter() - t) * 1000
    print(f"full garbage collection: {full_ms:.1f} ms with {tracked:,} tracked objects; {frozen_ms:.3f} ms after "
          "gc.freeze()")
    args.facts = {"quick": args.quick, "streams": args.streams, "chunk": args.chunk, "stride": args.stride,
                  "events": n_events, "values": args.values, "models": args.models, "malloc": args.malloc,
                  "gc": {"full_ms": full_ms, "tracked_objects": tracked, "frozen_ms": frozen_ms}}

    batches = []
    for start in range(0, n_events * pairs, args.chunk):
        m = min(args.chunk, n_events * pairs - start)
        batches.append(RecordBatch(topic=["memory"] * m, partition=np.zeros(m, np.int32),
                                   offset=np.arange(start, start + m, dtype=np.int64),
                                   timestamp=np.full(m, harness.T0_MS, np.int64), key=keys[start:start + m],
                                   value=messages[start:start + m]))

    full = daemon.cfg.processing.max_batch_windows

    def go(batches: list = batches) -> None:
        for b in batches:
            daemon.process(b)
            if sum(r.pending_windows for r in daemon.routes) >= full:  # a full micro-batch, as the daemon flushes
                daemon._take_pending()  # drop the due windows: intake only, no model call

    if args.decode_ab:
        return _decode_ab(daemon, batches, args)
    if args.native_ab:
        return _native_ab(daemon, batches, args)
    if args.overhead:
        return _overhead(daemon, batches, pairs, go, args)
    if args.neighbour_ops:
        return _neighbour_ab(batches, args, go)
    if args.score_overhead:
        return _score_overhead(daemon, batches, args)
    prof = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    go()
    if prof:
        prof.disable()
    dt = time.perf_counter() - t
    print(f"intake, {args.streams:,} streams, batches of {args.chunk}: {n_events / dt:,.0f} events/s, "
          f"{dt / n_events * 1e6:.1f} us/event{' (under cProfile)' if prof else ''}")
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    _write(args, {"mode": "intake", "events_s": n_events / dt, "us_per_event": dt / n_events * 1e6,
                  "profiled": bool(prof)})
    return 0


def _write(args, payload: dict) -> None:
    """The mode's numbers, with the run's facts (``args.facts``: sizes, garbage collection), to ``--json``."""
    common.write_json(args.json, "intake", {**args.facts, **payload})


def _overhead(daemon, batches: list, pairs: int, go, args) -> int:
    from pipelines.decode import SpecCache, decode_batch

    per = -(-len(batches) // pairs)
    kept = SpecCache(daemon.intake._features_of)
    for b in batches:  # warm the caches: the daemon's own is warm after seeding
        decode_batch(b.value, b.key, b.timestamp, kept, 65536)
    diffs, pairs_us = [], []
    for rep in range(pairs):
        part = batches[rep * per:(rep + 1) * per]
        n = sum(len(b) for b in part)
        t = time.perf_counter()
        for b in part:
            decode_batch(b.value, b.key, b.timestamp, kept, 65536)
        dec = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        go(part)
        proc = (time.perf_counter() - t) / n * 1e6
        diffs.append(proc - dec)
        pairs_us.append({"decode_batch": dec, "process": proc})
        print(f"pair {rep + 1}: decode_batch {dec:.2f} us/event, Daemon.process {proc:.2f} us/event, "
              f"intake beyond decoding {proc - dec:.2f} us/event")
    print(f"intake beyond decoding, median of {pairs}: {sorted(diffs)[len(diffs) // 2]:.2f} us/event")
    _write(args, {"mode": "overhead", "pairs_us_per_event": pairs_us,
                  "median_us_per_event": sorted(diffs)[len(diffs) // 2]})
    return 0


def _neighbour_ab(batches: list, args, go) -> int:
    """``Daemon.process`` per event beside a thread of GIL hand-overs: each variant of ``--neighbour-ops`` in turn,
    4 rounds, every run on new events."""
    import threading

    variants = args.neighbour_ops
    call = _neighbour_call(args.neighbour_call)  # built once, before any timing
    per = -(-len(batches) // (4 * len(variants)))
    results: dict[int, list[float]] = {n: [] for n in variants}
    part = 0
    for rnd in range(4):
        for n_ops in variants:
            chunk = batches[part * per:(part + 1) * per]
            part += 1
            stop = threading.Event()
            calls = [0]

            def neighbour(n_ops: int = n_ops, stop: threading.Event = stop, calls: list = calls) -> None:
                while not stop.wait(0.025):  # a micro-batch every 25 ms
                    for _ in range(n_ops):
                        call()
                    calls[0] += n_ops

            thread = threading.Thread(target=neighbour, daemon=True) if n_ops else None
            if thread:
                thread.start()
            t = time.perf_counter()
            go(chunk)
            dt = time.perf_counter() - t
            stop.set()
            if thread:
                thread.join()
            us = dt / sum(len(b) for b in chunk) * 1e6
            results[n_ops].append(us)
            print(f"round {rnd + 1}: {n_ops} torch calls per burst ({calls[0] / dt:,.0f} calls/s): Daemon.process "
                  f"{us:.2f} us/event")
    for n_ops, us in results.items():
        print(f"{n_ops} calls per burst: median {sorted(us)[len(us) // 2]:.2f} us/event over 4 rounds")
    _write(args, {"mode": "neighbour", "call": args.neighbour_call, "us_per_event": results})
    return 0


def _neighbour_call(kind: str):
    """One neighbour call: a tiny torch op (its binding gives up and re-takes the GIL), or an eager forward of a
    tiny GRU autoencoder (dozens of such ops with Python module code between them)."""
    if kind == "op":
        x = torch.ones(8)
        return lambda: torch.add(x, 1.0)
    from detector.models import ModelConfig, build_model

    model = build_model(ModelConfig(kind="gru", n_features=8, window=4, hidden_size=8, latent_size=4)).eval()
    x = torch.zeros(1, 4, 8)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    return forward


def _score_overhead(daemon, batches: list, args) -> int:
    """Per poll: process, take the due windows, score them as the scoring thread does; report per window the
    whole step, the model calls, and the difference."""
    prof = cProfile.Profile() if args.profile else None
    total = model = 0.0
    windows = 0
    for b in batches:
        daemon.process(b)
        taken = daemon._take_pending()
        n = sum(len(p[1]) for _, parts in taken for p in parts)
        if not n:
            continue
        t = time.perf_counter()
        if prof:
            prof.enable()
        spent = _score_timed(daemon, taken)
        if prof:
            prof.disable()
        total += time.perf_counter() - t
        model += spent
        windows += n
    print(f"scoring step, {windows:,} windows in polls of {len(batches[0])}: {total / windows * 1e6:.2f} us/window "
          f"in all, model {model / windows * 1e6:.2f}, beside the model {(total - model) / windows * 1e6:.2f}")
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    _write(args, {"mode": "score-overhead", "top_k": args.top_k, "windows": windows,
                  "us_per_window": total / windows * 1e6, "model_us_per_window": model / windows * 1e6})
    return 0


def _score_timed(daemon, taken: list) -> float:
    """``daemon._score(taken)``; returns the seconds its model calls took (the routes' own timings)."""
    spent = 0.0
    score = type(taken[0][0]).score

    def timed(route, parts, engine, timings):
        nonlocal spent
        out = score(route, parts, engine, timings)
        spent += sum(timings.values())
        return out

    for route, _ in taken:
        route.score = timed.__get__(route)
    try:
        daemon._score(taken)
    finally:
        for route, _ in taken:
            del route.score
    return spent


def _native_ab(daemon, batches: list, args) -> int:
    from pipelines import decode
    from pipelines.decode import SpecCache

    native = decode._native_decoder()
    if native is None:
        print("the native decoder is unavailable (ANOMALYD_NATIVE_DECODE=0, or no compiler)", file=sys.stderr)
        return 1
    kept = SpecCache(daemon.intake._features_of)
    chooser = decode._native_decoder
    try:
        pairs = _decode_pairs(batches, {name: (lambda m=module: setattr(decode, "_native_decoder", lambda: m), kept)
                                        for name, module in (("native", native), ("python", None))})
    finally:
        decode._native_decoder = chooser
    _write(args, {"mode": "native-ab", "pairs_us_per_event": pairs})
    return 0


def _decode_ab(daemon, batches: list, args) -> int:
    from pipelines.decode import SpecCache, decode_batch

    intake = daemon.intake
    kept = SpecCache(intake._features_of)
    for b in batches:  # warm the router's cache and the SpecCache
        decode_batch(b.value, b.key, b.timestamp, kept, 65536)
    pairs = _decode_pairs(batches, {"lookup per batch": (lambda: None, intake._features_of),
                                    "SpecCache": (lambda: None, kept)})
    _write(args, {"mode": "decode-ab", "pairs_us_per_event": pairs})
    return 0


def _decode_pairs(batches: list, variants: dict) -> list[dict]:
    """``decode_batch`` over all ``batches`` with each variant in turn, 4 rounds: {name: (set-up, lookup)}, the
    set-up called before each timed pass. Returns each round's us/event by variant."""
    from pipelines.decode import decode_batch

    n = sum(len(b) for b in batches)
    rounds = []
    for rep in range(4):
        rounds.append({})
        for name, (set_up, lookup) in variants.items():
            set_up()
            t = time.perf_counter()
            for b in batches:
                decode_batch(b.value, b.key, b.timestamp, lookup, 65536)
            rounds[-1][name] = (time.perf_counter() - t) / n * 1e6
            print(f"pair {rep + 1}: decode_batch, {name}: {rounds[-1][name]:.2f} us/event")
    return rounds

if __name__ == "__main__":
    raise SystemExit(main())
