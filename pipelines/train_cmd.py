"""``anomalyd train``: from files or a Kafka topic time range to a new model version in the store."""

from __future__ import annotations

import fnmatch
import json
import time
from collections import defaultdict

import numpy as np

from detector.models import ModelConfig
from detector.training import TrainConfig, load_series, train_detector

from .model_store import ModelStore

__all__ = ["train_command", "read_topic_series"]


def read_topic_series(bootstrap: str, topic: str, from_ms: int | None, to_ms: int | None, streams_glob: str,
                      feature_names: list[str] | None, timeout_s: float = 30.0) -> tuple[list[np.ndarray], list[str]]:
    """Read events of ``topic`` with from_ms <= ts <= to_ms, grouped per stream id, as (T, F) series in time order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             consumer_timeout_ms=int(timeout_s * 1000))
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not parts:
            raise ValueError(f"topic {topic!r} does not exist or has no partitions")
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        starts = consumer.offsets_for_times({tp: from_ms for tp in parts}) if from_ms is not None else {}
        for tp in parts:
            got = starts.get(tp)
            consumer.seek(tp, got.offset if got is not None else 0) if from_ms is not None else consumer.seek(tp, 0)
        rows: dict[str, list[tuple[int, list[float]]]] = defaultdict(list)
        names = feature_names
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in parts) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500, max_records=10000).values():
                for r in recs:
                    try:
                        msg = json.loads(r.value)
                        stream = msg.get("stream") or (r.key or b"").decode()
                        ts = int(msg.get("ts", r.timestamp))
                    except (ValueError, AttributeError, TypeError):
                        continue
                    if (from_ms is not None and ts < from_ms) or (to_ms is not None and ts > to_ms):
                        continue
                    if not fnmatch.fnmatchcase(stream, streams_glob):
                        continue
                    vals = msg.get("values", [msg.get("value")])
                    if isinstance(vals, dict):
                        names = names or sorted(vals)
                        vals = [vals.get(n) for n in names]
                    rows[stream].append((ts, [np.nan if v is None else float(v) for v in vals]))
    finally:
        consumer.close()
    if not rows:
        raise ValueError(f"no events of streams {streams_glob!r} in {topic!r} for the given time range")
    series = [np.asarray([v for _, v in sorted(r, key=lambda x: x[0])], dtype=np.float32) for r in rows.values()]
    n_features = series[0].shape[1]
    return series, names or [f"f{i}" for i in range(n_features)]


def train_command(args) -> int:
    if args.data:
        loaded = [load_series(p) for p in args.data]
        series, names = [x for x, _ in loaded], loaded[0][1]
        if any(n != names for _, n in loaded):
            raise ValueError("all --data files must have the same feature columns")
    else:
        feats = args.features.split(",") if args.features else None
        series, names = read_topic_series(args.bootstrap, args.kafka_topic, args.from_ms, args.to_ms, args.streams,
                                          feats)
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
