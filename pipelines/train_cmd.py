"""``anomalyd train``: from files or a Kafka topic time range to a new model version in the store."""

from __future__ import annotations

import os

import numpy as np

from detector.device import resolve_device
from detector.models import ModelConfig
from detector.thresholds import make_threshold
from detector.training import TrainConfig, enough_rows, load_series, train_detector

from ._config_checks import is_plain_name
from .config import KafkaConfig, ProcessingConfig, load_config
from .model_store import ModelStore
from .train_topic import check_selection, parse_features, read_topic_series

__all__ = ["train_command"]


def _threshold_params(args) -> dict:
    return {"risk": args.risk} if args.threshold in ("spot", "dspot") else {"q": 1 - args.risk}


def _check_args(args) -> None:
    """Refuse arguments that would train nothing, write outside ``--models-dir`` or fail only after training."""
    problems = []
    for flag, value, low in (("--epochs", args.epochs, 1), ("--window", args.window, 2), ("--hidden", args.hidden, 1),
                             ("--latent", args.latent, 1), ("--layers", args.layers, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            problems.append(f"{flag}: must be >= {low}, got {value}")
    if not args.lr > 0:
        problems.append(f"--lr: must be > 0, got {args.lr}")
    if not 0 < args.risk < 1:
        problems.append(f"--risk: must be between 0 and 1, got {args.risk}")
    else:  # what the threshold itself refuses (SPOT: risk below 1 - its initial quantile), before training
        try:
            make_threshold(args.threshold, **_threshold_params(args))
        except ValueError as exc:
            problems.append(f"--risk: {exc}")
    try:
        resolve_device(args.device)
    except ValueError as exc:  # a name torch does not know was a traceback once training began
        problems.append(f"--device: {exc}")
    if not 0 <= args.dropout < 1:
        problems.append(f"--dropout: must be in [0, 1), got {args.dropout}")
    if args.last_k is not None and not 1 <= args.last_k <= args.window:
        problems.append(f"--last-k: must be between 1 and --window ({args.window}), got {args.last_k}")
    if args.data:  # these select from a topic; a file is trained on whole, columns and rows
        streams = None if args.streams == "*" else args.streams
        given = [flag for flag, value in (("--features", args.features), ("--from-ms", args.from_ms),
                                          ("--to-ms", args.to_ms), ("--streams", streams), ("--config", args.config),
                                          ("--bootstrap", args.bootstrap))
                 if value is not None]
        if given:
            problems.append(f"{', '.join(given)}: only with --kafka-topic (--data trains on whole files)")
    else:
        problems.extend(_selection_problems(args))
    if not args.name or not is_plain_name(args.name):
        problems.append(f"--name: must be a plain directory name (as models.served[].name), got {args.name!r}")
    if problems:
        raise ValueError("; ".join(problems))
    try:  # before the training, not after it
        args.models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--models-dir: cannot create {args.models_dir}: {exc.strerror or exc}") from None
    if not os.access(args.models_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--models-dir: {args.models_dir} is not writable")
    model_dir = args.models_dir / args.name
    if model_dir.exists() and not model_dir.is_dir():  # the save, after the training, would fail on it
        raise ValueError(f"--name: {model_dir} exists and is not a directory")
    if model_dir.is_dir() and not os.access(model_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--name: {model_dir} is not writable")


def _selection_problems(args) -> list[str]:
    """--kafka-topic's arguments that would select nothing, save a version the daemon cannot load, or be ignored."""
    problems = []
    if args.config and args.bootstrap is not None:  # it was ignored: the config's brokers were read
        problems.append("--bootstrap: not with --config, whose kafka.bootstrap_servers (and credentials) are used")
    try:
        check_selection(args.from_ms, args.to_ms, None)
        if args.features is not None:
            parse_features(args.features)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def _load_data_files(paths: list[str], window: int) -> tuple[list[np.ndarray], list[str]]:
    """The --data files' series, their columns in the first file's order (the same names in another order are
    reordered); ValueError naming the file whose columns differ or that is too short to train on."""
    series, names = [], None
    for path in paths:
        x, cols = load_series(path)
        if names is None:
            names = cols
        elif cols != names:
            if sorted(cols) != sorted(names):
                raise ValueError(f"{path}: features {cols} are not those of {paths[0]}: {names}")
            x = x[:, [cols.index(name) for name in names]]
        if not enough_rows(len(x), window):
            raise ValueError(f"{path}: {len(x)} rows, too few to train with window {window}")
        series.append(x)
    return series, names


def train_command(args) -> int:
    _check_args(args)
    if args.data:
        series, names = _load_data_files(args.data, args.window)
    else:
        feats = parse_features(args.features) if args.features is not None else None
        bootstrap, security, max_bytes = args.bootstrap or "127.0.0.1:9092", None, KafkaConfig.max_message_bytes
        max_ahead_s = ProcessingConfig.max_event_time_ahead_s
        if args.config:  # the daemon's brokers, credentials, message size limit and event-time rule
            cfg = load_config(args.config)
            bootstrap, security = cfg.kafka.bootstrap_servers, cfg.kafka.security.client_settings()
            max_bytes, max_ahead_s = cfg.kafka.max_message_bytes, cfg.processing.max_event_time_ahead_s
        series, names = read_topic_series(bootstrap, args.kafka_topic, args.from_ms, args.to_ms, args.streams,
                                          feats, security=security, max_message_bytes=max_bytes,
                                          max_ahead_s=max_ahead_s)
        short = [s for s in series if not enough_rows(len(s), args.window)]
        if short:  # a stream that began just before --to-ms: too short to split, left out rather than fatal
            series = [s for s in series if enough_rows(len(s), args.window)]
            print(f"left out {len(short)} streams too short to train with window {args.window} "
                  f"({max(len(s) for s in short)} rows at most)")
            if not series:
                raise ValueError(f"no stream has enough rows to train with window {args.window}")
    mcfg = ModelConfig(kind=args.kind, n_features=series[0].shape[1], window=args.window, hidden_size=args.hidden,
                       num_layers=args.layers, latent_size=args.latent, dropout=args.dropout)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                       scaler=args.scaler, score_last_k=args.last_k, threshold=args.threshold,
                       threshold_params=_threshold_params(args))
    print(f"training {args.kind} on {len(series)} series, {sum(len(s) for s in series)} rows, features {names}")
    det = train_detector(series, mcfg, tcfg, feature_names=names)
    path = ModelStore(args.models_dir).save(args.name, det)
    print(f"saved {path}")
    return 0
