"""``anomalyd train``: from files or a Kafka topic time range to a new model version in the store."""

from __future__ import annotations

import fnmatch
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from detector.models import ModelConfig
from detector.training import TrainConfig, enough_rows, load_series, train_detector

from .decode import FeatureSpec, decode_batch
from .kafka_io import client_security_config, kafka_python_bootstrap
from .model_store import ModelStore

__all__ = ["train_command", "read_topic_series"]


def _infer_features(values: list[bytes], streams_glob: str = "*") -> list[str]:
    """Feature names from the first message of a stream ``streams_glob`` takes that has any: dict keys in order,
    else f0..fN-1 (``value``: f0)."""
    for raw in values:
        try:
            msg = json.loads(raw)
        except (ValueError, TypeError):
            continue
        stream = msg.get("stream") if isinstance(msg, dict) else None
        if isinstance(stream, str) and not fnmatch.fnmatchcase(stream, streams_glob):
            continue
        if isinstance(msg, dict):
            vals = msg.get("values", [msg["value"]] if "value" in msg else None)
            if isinstance(vals, dict) and vals:
                return list(vals)
            if isinstance(vals, list) and vals:
                return [f"f{i}" for i in range(len(vals))]
    raise ValueError("no message with values to take the feature names from; pass --features")


def read_topic_series(bootstrap: str, topic: str, from_ms: int | None, to_ms: int | None, streams_glob: str,
                      feature_names: list[str] | None, timeout_s: float = 30.0,
                      security: Mapping[str, Any] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Events of ``topic`` with from_ms <= ts <= to_ms, decoded and validated exactly as the daemon does, grouped
    per stream id as (T, F) series in time order. Messages the daemon would dead-letter are skipped (counted).
    ``security``: the config's ``kafka.security`` settings (read with kafka-python).

    ``ts`` is the event time (the message's own ``ts``), which need not follow the broker's timestamps (a replay
    of history, a producer ahead of the clock): every partition is read from its first retained record to the
    end offsets taken at the start. Reading stops early only after ``timeout_s`` without a record, and then
    says which partitions it did not finish."""
    from kafka import KafkaConsumer, TopicPartition

    with kafka_python_bootstrap(bootstrap, security):
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                 consumer_timeout_ms=int(timeout_s * 1000),
                                 **client_security_config("kafka-python", security))
    values: list[bytes] = []
    keys: list[bytes | None] = []
    broker_ts: list[int] = []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not parts:
            raise ValueError(f"topic {topic!r} does not exist or has no partitions")
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        consumer.seek_to_beginning(*parts)  # the first retained record (seek(tp, 0) below it resets to latest)
        deadline = time.monotonic() + timeout_s
        while behind := {tp.partition: (consumer.position(tp), ends[tp]) for tp in parts
                         if consumer.position(tp) < ends[tp]}:
            if time.monotonic() > deadline:
                print(f"stopped reading {topic!r}: no record for {timeout_s:g}s; partitions not read to the end "
                      f"(position, end): {behind}")
                break
            for recs in consumer.poll(timeout_ms=500, max_records=10000).values():
                deadline = time.monotonic() + timeout_s
                for r in recs:
                    values.append(r.value or b"")
                    keys.append(r.key)
                    broker_ts.append(r.timestamp)
    finally:
        consumer.close()
    names = feature_names or _infer_features(values, streams_glob)
    spec = FeatureSpec(tuple(names))
    decoded = decode_batch(values, keys, np.asarray(broker_ts, dtype=np.int64),
                           lambda stream: spec if fnmatch.fnmatchcase(stream, streams_glob) else None, 1 << 20)
    if decoded.rejected:
        print(f"skipped {len(decoded.rejected)} messages that do not decode (first: {decoded.rejected[0][1]})")
    group = decoded.groups.get(spec)
    rows: dict[str, list[int]] = defaultdict(list)
    if group is not None:
        for i, (stream, ts) in enumerate(zip(group.stream, group.ts.tolist(), strict=True)):
            if (from_ms is None or ts >= from_ms) and (to_ms is None or ts <= to_ms):
                rows[stream].append(i)
    if not rows:
        raise ValueError(f"no events of streams {streams_glob!r} in {topic!r} for the given time range")
    series = []
    for idx in rows.values():
        idx = np.asarray(idx)
        series.append(group.values[idx[np.argsort(group.ts[idx], kind="stable")]])  # (T, F) in time order
    return series, list(names)


def train_command(args) -> int:
    if args.data:
        loaded = [load_series(p) for p in args.data]
        series, names = [x for x, _ in loaded], loaded[0][1]
        if any(n != names for _, n in loaded):
            raise ValueError("all --data files must have the same feature columns")
    else:
        feats = args.features.split(",") if args.features else None
        bootstrap, security = args.bootstrap, None
        if args.config:  # the daemon's brokers and credentials
            from .config import load_config

            kafka = load_config(args.config).kafka
            bootstrap, security = kafka.bootstrap_servers, kafka.security.client_settings()
        series, names = read_topic_series(bootstrap, args.kafka_topic, args.from_ms, args.to_ms, args.streams,
                                          feats, security=security)
        short = [s for s in series if not enough_rows(len(s), args.window)]
        if short:  # a stream that began just before --to-ms: too short to split, left out rather than fatal
            series = [s for s in series if enough_rows(len(s), args.window)]
            print(f"left out {len(short)} streams too short to train with window {args.window} "
                  f"({max(len(s) for s in short)} rows at most)")
            if not series:
                raise ValueError(f"no stream has enough rows to train with window {args.window}")
    mcfg = ModelConfig(kind=args.kind, n_features=series[0].shape[1], window=args.window, hidden_size=args.hidden,
                       num_layers=args.layers, latent_size=args.latent, dropout=args.dropout)
    params = {"risk": args.risk} if args.threshold in ("spot", "dspot") else {"q": 1 - args.risk}
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                       scaler=args.scaler, score_last_k=args.last_k, threshold=args.threshold, threshold_params=params)
    print(f"training {args.kind} on {len(series)} series, {sum(len(s) for s in series)} rows, features {names}")
    det = train_detector(series, mcfg, tcfg, feature_names=names)
    path = ModelStore(args.models_dir).save(args.name, det)
    print(f"saved {path}")
    return 0
