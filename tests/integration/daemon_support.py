"""Shared pieces of the daemon integration tests: tiny trained models, configs, producing, reading alerts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from detector.models import ModelConfig
from detector.training import TrainConfig, train_detector
from pipelines.kafka_io import make_producer
from pipelines.model_store import ModelStore
from pipelines.produce import SyntheticFleet, produce_live

HISTORY = 1500
INTERVAL_MS = 1000
N_STREAMS = 4
WINDOW = 16
SLACK_MS = 2 * WINDOW * INTERVAL_MS  # how far from an injected anomaly's start a firing alert may start


def fleet() -> SyntheticFleet:
    return SyntheticFleet(n_streams=N_STREAMS, n_features=4, prefix="pump", seed=3)


def train_models(models_dir: Path) -> list[str]:
    f = fleet()
    history = f.history(HISTORY)
    names = []
    for kind in ("gru", "lstm"):
        cfg = ModelConfig(kind=kind, n_features=4, window=WINDOW, hidden_size=16, latent_size=8)
        det = train_detector(history, cfg, TrainConfig(epochs=12, lr=5e-3, batch_size=64, patience=3, max_windows=3000,
                                                       device="cpu", threshold="spot",
                                                       threshold_params={"risk": 1e-4}),
                             feature_names=f.feature_names, log=None)
        ModelStore(models_dir).save(f"it-{kind}", det)
        names.append(f"it-{kind}")
    return names


def config_dict(bootstrap: str, topic: str, models_dir: Path, models: list[str], group: str | None = None,
                alerts_topic: str | None = None, client: str = "kafka-python", **overrides) -> dict:
    """A daemon config for ``topic``; group ``g-<topic>`` and alerts topic ``<topic>-alerts`` unless given."""
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group or f"g-{topic}", "topics": [topic],
                  "client": client,
                  "dead_letter_topic": f"{topic}-dlq", "session_timeout_ms": 15000, "heartbeat_interval_ms": 2000,
                  "poll_timeout_ms": 100},
        "models": {"dir": str(models_dir), "served": [{"name": n} for n in models], "device": "cpu",
                   "watch_interval_s": 3600},
        "routes": [{"match": "pump-*", "models": models, "combine": "max"}],
        "processing": {"max_delay_ms": 20, "max_batch_windows": 512},
        "alerts": {"k": 3, "n": 5, "m": 10, "cooldown_s": 300},
        "sinks": {"kafka": {"enabled": True, "topic": alerts_topic or f"{topic}-alerts"}, "log": {"enabled": False}},
        "http": {"bind": "127.0.0.1", "port": 0},
        "shutdown": {"grace_period_s": 20},
    }
    for key, value in overrides.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def produce_with_anomalies(bootstrap: str, topic: str, steps: int, kinds: tuple[str, ...],
                           truth_path: Path | None = None, rate: float | None = None,
                           first_steps: int | None = None, from_step: int = 0,
                           t0_ms: int | None = None) -> tuple[list[dict], int]:
    """Produce ``steps`` steps of every stream (continuing the training history) with one anomaly per kind; only
    the ``first_steps`` of them if given (ending inside an anomaly: its incident stays open), from ``from_step`` (the
    rest of an earlier call's, with its ``t0_ms``: event times that go on where it stopped)."""
    f = fleet()
    plan = f.plan(HISTORY, steps, n_anomalies=len(kinds), length=25, kinds=kinds)
    data, truth = f.live(HISTORY, steps, plan)
    data = data[:, from_step:first_steps]
    t0 = int(time.time() * 1000) - (HISTORY + steps) * INTERVAL_MS if t0_ms is None else t0_ms  # times end about now
    producer = make_producer("kafka-python", bootstrap)
    try:
        n = produce_live(producer, topic, f, data, HISTORY + from_step, t0, INTERVAL_MS, rate, truth, truth_path)
    finally:
        producer.close()
    return truth, n


def read_topic(bootstrap: str, topic: str, timeout_s: float = 5.0) -> list:
    """Every record of ``topic`` from the beginning (kafka-python ConsumerRecords)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        if not parts:
            return []
        c.assign(parts)
        c.seek_to_beginning(*parts)
        ends = c.end_offsets(parts)
        out = []
        deadline = time.monotonic() + timeout_s
        while any(c.position(tp) < ends[tp] for tp in parts) and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=200).values():
                out.extend(recs)
        return out
    finally:
        c.close()


def read_alerts(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(bootstrap, topic)]


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets of ``topic`` via the admin API (no consumer joins the group)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError:  # e.g. the group's coordinator is not known yet: nothing committed so far
        got = {}
    finally:
        admin.close()
    return {tp.partition: oam.offset for tp, oam in got.items() if tp.topic == topic and oam.offset >= 0}


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        return {tp.partition: off for tp, off in c.end_offsets(parts).items() if off > 0}  # only partitions with data
    finally:
        c.close()


def firing_per_anomaly(truth: list[dict], alerts: list[dict], slack_ms: int) -> list[list[dict]]:
    """For each injected anomaly, the distinct firing alerts (by id) on its stream that start near it."""
    out = []
    for t in truth:
        ids = {}
        for a in alerts:
            if (a["status"] == "firing" and a["stream"] == t["stream"]
                    and t["start_ts"] - slack_ms <= a["started_at"] <= t["end_ts"] + slack_ms):
                ids[a["id"]] = a
        out.append(list(ids.values()))
    return out
