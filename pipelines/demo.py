"""``anomalyd demo`` / ``make demo``: the whole product end to end on a local Kafka broker."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from detector.models import ModelConfig
from detector.training import TrainConfig, train_detector

from .config import load_config
from .daemon import Daemon
from .kafka_io import make_producer
from .kafka_local import LocalKafka, cache_root, create_topic
from .model_store import ModelStore
from .produce import SyntheticFleet, produce_live, sent_anomalies

__all__ = ["run_demo", "match_alerts"]

HISTORY_STEPS = 2000


def match_alerts(truth: list[dict], alerts: list[dict], slack_ms: int) -> list[tuple[dict, dict | None]]:
    """Pair each injected anomaly with the first firing alert on its stream that starts within its span ± slack."""
    out = []
    for t in truth:
        hit = next((a for a in alerts if a["status"] == "firing" and a["stream"] == t["stream"]
                    and t["start_ts"] - slack_ms <= a["started_at"] <= t["end_ts"] + slack_ms), None)
        out.append((t, hit))
    return out


def _train_models(fleet: SyntheticFleet, models_dir: Path, say) -> list[str]:
    history = fleet.history(HISTORY_STEPS)
    store = ModelStore(models_dir)
    names = []
    for kind in ("gru", "lstm"):
        name = f"demo-{kind}"
        cfg = ModelConfig(kind=kind, n_features=len(fleet.feature_names), window=32, hidden_size=32, latent_size=8)
        t0 = time.perf_counter()
        det = train_detector(history, cfg, TrainConfig(epochs=10, lr=5e-3, batch_size=64, patience=3,
                                                       max_windows=3000, threshold="spot",
                                                       threshold_params={"risk": 1e-4}),
                             feature_names=fleet.feature_names, log=None)
        path = store.save(name, det)
        say(f"  trained {kind.upper():4s} in {time.perf_counter() - t0:5.1f}s -> {path}")
        names.append(name)
    return names


_DEMO_MARK = ".anomalyd-demo"  # in the models directory the demo made, which a later demo replaces


def demo_config(path: Path):
    """The demo's config file as written, without the user's ANOMALYD_* overrides (a group id, a topic or models
    directory of theirs would point the demo at their own Kafka topics or models)."""
    return load_config(path, env={})


def run_demo(args) -> int:
    say = print
    work = args.workdir or cache_root() / "demo"
    models = work / "models"
    if args.workdir and models.exists() and not (models / _DEMO_MARK).exists():  # someone else's models
        say(f"anomalyd demo: {models} exists and was not made by the demo; not replacing it (choose another "
            f"--workdir)", file=sys.stderr)
        return 2
    shutil.rmtree(models, ignore_errors=True)  # the last demo's models
    models.mkdir(parents=True)
    (models / _DEMO_MARK).touch()
    say(f"[1/5] starting a local Kafka broker on 127.0.0.1:{args.port}")
    kafka = LocalKafka(port=args.port)
    bootstrap = kafka.start()
    run_id = time.strftime("%H%M%S")
    topic, alerts_topic = f"demo-sensors-{run_id}", f"demo-alerts-{run_id}"
    create_topic(bootstrap, topic, partitions=2)
    create_topic(bootstrap, alerts_topic, partitions=1)

    fleet = SyntheticFleet(n_streams=args.streams, n_features=4, prefix="pump", seed=7)
    say(f"[2/5] training GRU and LSTM autoencoders on {HISTORY_STEPS} steps of history x {args.streams} streams")
    model_names = _train_models(fleet, work / "models", say)

    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"demo-{run_id}", "topics": [topic],
                  "dead_letter_topic": f"demo-dead-letter-{run_id}", "session_timeout_ms": 6000,
                  "heartbeat_interval_ms": 1000},
        "models": {"dir": str(work / "models"), "served": [{"name": n} for n in model_names], "device": "auto"},
        "routes": [{"match": "pump-*", "models": model_names, "combine": "max"}],
        "processing": {"max_delay_ms": 50},
        "alerts": {"k": 3, "n": 5, "m": 10, "cooldown_s": 5},
        "sinks": {"kafka": {"enabled": True, "topic": alerts_topic}, "log": {"enabled": False}},
        "http": {"bind": "127.0.0.1", "port": args.http_port},
    }
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    daemon = Daemon(demo_config(cfg_path))
    # daemon threads: a daemon or a producer that does not stop when asked does not keep the process alive
    runner = threading.Thread(target=lambda: setattr(daemon, "exit_code", daemon.run()), name="daemon", daemon=True)
    say(f"[3/5] daemon running (config {cfg_path}); metrics on http://127.0.0.1:{args.http_port}/metrics")
    runner.start()
    producer = prod = previous = None
    stop_producing = threading.Event()  # --duration, Ctrl-C, or an error: the producer sends no more
    produced: dict = {}  # what the producer thread sent, or the error that ended it
    try:  # whatever happens from here, the daemon and the producer are stopped
        deadline = time.monotonic() + 90
        while not daemon.is_ready() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)  # joining the consumer group takes a moment
        if not runner.is_alive():  # run() raised (an HTTP port taken, the broker refusing) or returned
            say(f"  the daemon stopped (exit code {getattr(daemon, 'exit_code', None)}; its error is above); "
                f"nothing produced. The broker is left running: `scripts/kafka.sh stop --port {args.port}` stops it")
            return 1
        if not daemon.is_ready():
            say("  the daemon did not become ready within 90 s (no partitions assigned); see the log above")

        plan = fleet.plan(HISTORY_STEPS, args.steps, n_anomalies=5, length=30)
        data, truth = fleet.live(HISTORY_STEPS, args.steps, plan)
        interval_ms = max(1, round(1000 * args.streams / args.rate))  # event time advances with wall time
        t0_ms = int(time.time() * 1000) - HISTORY_STEPS * interval_ms + 1000
        truth_path = work / "truth.json"
        producer = make_producer("kafka-python", bootstrap)
        say(f"[4/5] producing {args.steps} steps x {args.streams} streams at {args.rate:.0f} events/s "
            f"with {len(plan)} injected anomalies ({', '.join(p.kind + '@' + p.stream for p in plan)})")

        def send() -> None:
            try:
                produced["sent"] = produce_live(producer, topic, fleet, data, HISTORY_STEPS, t0_ms, interval_ms,
                                                args.rate, truth, truth_path, stop_producing)
            except Exception as exc:  # noqa: BLE001 - a failed delivery, said after the watch
                produced["error"] = exc

        prod = threading.Thread(target=send, name="producer", daemon=True)
        prod.start()

        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        alerts = _watch_alerts(bootstrap, alerts_topic, prod, stop, args.duration, say,
                               caught_up=lambda: daemon.events_seen >= len(fleet.names) * args.steps,
                               daemon_alive=runner.is_alive)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        stop_producing.set()  # before the joins: the producer stops pacing its schedule and flushes what it sent
        daemon.request_stop()
        runner.join(timeout=60)
        if runner.is_alive():
            say("  the daemon did not stop within 60 s")
        if prod is not None:
            prod.join(timeout=65)  # its flush waits 60 s at most
        if producer is not None:
            producer.close()

    if "error" in produced:
        say(f"  producer: {type(produced['error']).__name__}: {produced['error']}")
    sent = truth if "sent" not in produced else sent_anomalies(truth, fleet, HISTORY_STEPS, produced["sent"])
    if len(sent) < len(truth):
        say(f"  stopped before {len(truth) - len(sent)} of the {len(truth)} injected anomalies were produced")
    say("[5/5] injected vs detected")
    rows = match_alerts(sent, alerts, slack_ms=2 * 32 * interval_ms)
    say(f"  {'stream':10s} {'kind':12s} {'injected at':>12s} {'alert at':>10s} {'delay':>7s}  alert id")
    for t, a in rows:
        start = time.strftime("%H:%M:%S", time.localtime(t["start_ts"] / 1000))
        if a:
            at = time.strftime("%H:%M:%S", time.localtime(a["started_at"] / 1000))
            say(f"  {t['stream']:10s} {t['kind']:12s} {start:>12s} {at:>10s} "
                f"{(a['started_at'] - t['start_ts']) / 1000:6.2f}s  {a['id']}")
        else:
            say(f"  {t['stream']:10s} {t['kind']:12s} {start:>12s} {'MISSED':>10s}")
    matched = {a["id"] for _, a in rows if a}
    false_alarms = [a for a in alerts if a["status"] == "firing" and a["id"] not in matched]
    say(f"  detected {len(matched)}/{len(rows)} injected anomalies; {len(false_alarms)} other firing alerts; "
        f"daemon exit code {getattr(daemon, 'exit_code', None)}")
    say(f"  broker left running for inspection: `scripts/kafka.sh stop --port {args.port}` stops it")
    return 0 if getattr(daemon, "exit_code", 1) == 0 else 1


def _watch_alerts(bootstrap: str, topic: str, producer_thread: threading.Thread, stop: threading.Event,
                  duration: float | None, say, caught_up, daemon_alive=lambda: True,
                  linger_s: float = 5.0) -> list[dict]:
    """Print alerts as they arrive until Ctrl-C, ``duration``, or ``linger_s`` after the daemon caught up or
    stopped (``daemon_alive`` false: it scores nothing more)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    alerts: list[dict] = []
    started = time.monotonic()
    done_at = produced_at = None
    try:
        while not stop.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            if produced_at is None and not producer_thread.is_alive():
                produced_at = time.monotonic()
            if done_at is None and not daemon_alive():
                say("  the daemon stopped (its error is above): no more alerts")
                done_at = time.monotonic()
            if done_at is None and produced_at is not None and (caught_up() or time.monotonic() - produced_at > 60):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > linger_s:
                break
            for recs in consumer.poll(timeout_ms=200).values():
                for r in recs:
                    a = json.loads(r.value)
                    alerts.append(a)
                    feats = ", ".join(f"{t['feature']}={t['share']:.0%}" for t in a.get("top_features", []))
                    say(f"  ALERT {a['status']:8s} {a['stream']:8s} model={a['model']} peak={a['peak_score']:.2f} "
                        f"features: {feats}  id={a['id']}")
    finally:
        consumer.close()
    return alerts
