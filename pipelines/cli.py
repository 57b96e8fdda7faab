"""``anomalyd`` command line: run, check, train, produce, replay, demo, evaluate."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["main", "build_parser"]


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` >= ``low`` (an error naming the flag, before anything starts)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def _positive(text: str) -> float:
    """An argparse type: a number > 0."""
    value = _at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _bootstrap(text: str) -> str:
    """An argparse type: a comma-separated list of Kafka brokers, host:port (as kafka.bootstrap_servers)."""
    from ._config_checks import bootstrap_servers_problem

    if problem := bootstrap_servers_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run the streaming daemon", description=(
        "Consume sensor events from Kafka, score sliding windows with the configured models, emit alerts. "
        "SIGTERM/SIGINT: finish the batch, flush, commit, exit 0 (1 when alerts or dead letters could not be "
        "delivered, or the commit failed, within shutdown.grace_period_s). SIGHUP: reload models. Exit 2: a config "
        "problem (named with its file and key); 1: a crash, or Kafka unreachable at start (kafka-python)."))
    p.add_argument("-c", "--config", required=True, help="YAML config (see deploy/config.example.yaml)")
    p.add_argument("--timeout", type=_positive, default=None, help="stop after this many seconds")
    p.set_defaults(func=_cmd_run)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="validate a config and its models as `run` would, optionally Kafka too",
                       description=(
        "Validates the config (with ANOMALYD_* overrides), loads every served model and builds the routes, as "
        "`anomalyd run` does at start, and prints them. --connect also logs in to Kafka with the configured "
        "client and security settings, looks up the topics and asks an enabled Alertmanager sink for its status. "
        "Exit 0: ok; 2: a config problem (key, model, a newest model version that does not load, Kafka "
        "credentials, certificate); 1: Kafka unreachable, an input topic missing, a dead-letter or alerts topic "
        "missing where the brokers do not create topics, or Alertmanager not answering or refusing the request "
        "(HTTP 401/403 included)."))
    p.add_argument("-c", "--config", required=True, help="YAML config (see deploy/config.example.yaml)")
    p.add_argument("--connect", action="store_true",
                   help="also log in to Kafka, look up the topics and ask Alertmanager (when enabled)")
    p.set_defaults(func=_cmd_check)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a GRU/LSTM autoencoder and store a new model version", description=(
        "Train from CSV/NPY files (one series per file, e.g. one per stream) or from a Kafka topic time range, "
        "calibrate the threshold on the validation part, and write <models-dir>/<name>/<version>/."),
        formatter_class=_DefaultsShown)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", type=Path,
                     help="CSV files (UTF-8; a header row naming each column once; a timestamp/ts/time column is "
                          "skipped; empty cells are missing values; columns in any order, the first file's kept) "
                          "or .npy files")
    src.add_argument("--kafka-topic", help="read training events from this topic")
    p.add_argument("--bootstrap", type=_bootstrap, default=None,
                   help="Kafka bootstrap servers (with --kafka-topic and no --config; default 127.0.0.1:9092)")
    p.add_argument("-c", "--config", default=None,
                   help="with --kafka-topic: take the brokers and credentials from this daemon config's kafka section")
    p.add_argument("--from-ms", type=int, default=None,
                   help="first event time (ms, the message's ts) to use; the topic is read from its first record")
    p.add_argument("--to-ms", type=int, default=None, help="last event timestamp (ms) to use from the topic")
    p.add_argument("--streams", default="*", help="glob of stream ids to train on (with --kafka-topic)")
    p.add_argument("--features", default=None, help="comma-separated feature names (Kafka dict messages)")
    p.add_argument("--name", required=True, help="model name (directory under --models-dir)")
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--kind", choices=["gru", "lstm"], default="gru", help="autoencoder kind")
    p.add_argument("--window", type=int, default=32, help="window length, in events of a stream")
    p.add_argument("--hidden", type=int, default=32, help="hidden units per recurrent layer")
    p.add_argument("--latent", type=int, default=8, help="size of the code between encoder and decoder")
    p.add_argument("--layers", type=int, default=1, help="recurrent layers in the encoder and in the decoder")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout between layers, in training")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training windows")
    p.add_argument("--batch-size", type=int, default=64, help="windows per training step")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (Adam)")
    p.add_argument("--threshold", choices=["quantile", "spot", "dspot"], default="spot",
                   help="how the alert threshold is calibrated on the validation scores")
    p.add_argument("--risk", type=float, default=1e-3,
                   help="spot/dspot: target false-alarm rate per window; quantile: the threshold is the (1 - risk) "
                        "quantile of the validation scores")
    p.add_argument("--scaler", choices=["robust", "standard"], default="robust",
                   help="per-feature scaling: median/IQR or mean/std")
    p.add_argument("--last-k", type=int, default=None, help="score the last k steps (default: whole window)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same data and seed: the same model on one CPU)")
    p.set_defaults(func=_cmd_train)


class _DefaultsShown(argparse.HelpFormatter):
    """Help that names an option's default, where it has one and its help does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_produce(sub) -> None:
    p = sub.add_parser("produce", help="send synthetic multi-sensor streams with injected anomalies to Kafka",
                       description="Rate-controlled synthetic generator; writes the injected anomalies to --truth.")
    p.add_argument("--bootstrap", type=_bootstrap, default="127.0.0.1:9092")
    p.add_argument("--topic", default="sensors")
    p.add_argument("--streams", type=_at_least(1), default=8)
    p.add_argument("--features", type=_at_least(2), default=4)
    p.add_argument("--prefix", default="pump")
    p.add_argument("--start-step", type=_at_least(0), default=3000, help="first step (steps before it are the history)")
    p.add_argument("--steps", type=_at_least(1), default=600)
    p.add_argument("--anomalies", type=_at_least(0), default=5)
    p.add_argument("--rate", type=_at_least(0.0, float), default=1000.0,
                   help="events per second (0 = as fast as possible)")
    p.add_argument("--interval-ms", type=_at_least(1), default=1000,
                   help="event-time spacing of one stream's readings; event times start now and run ahead of the "
                        "clock when --rate is faster, so a second run over the same streams before they have "
                        "passed is dropped as late (use another --prefix)")
    p.add_argument("--truth", type=Path, default=None, help="write the ground truth JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_produce)


def _add_replay(sub) -> None:
    p = sub.add_parser("replay", help="run files through the same detector path without Kafka", description=(
        "Each input line is one message value (JSON); the files are read in order as one topic partition. Alerts "
        "are printed as JSON lines on stdout, rejected lines with their reason and a count per outcome on stderr; "
        "a message without ts takes the start time plus its position among the messages (ms). Exit code 1 when "
        "no line was taken (none at all, or all rejected or unrouted)."))
    p.add_argument("-c", "--config", required=True)
    p.add_argument("inputs", nargs="+", type=Path, help="JSON-lines files of messages")
    p.set_defaults(func=_cmd_replay)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on a local Kafka (what `make demo` runs)", description=(
        "Starts a local Kafka broker, generates history, trains GRU and LSTM models, runs the daemon against "
        "a live producer with injected anomalies, prints alerts as they fire and a final injected-vs-detected "
        "table, and serves metrics. Ctrl-C exits cleanly."))
    p.add_argument("--duration", type=_positive, default=None, help="stop after this many seconds")
    p.add_argument("--port", type=int, default=19092, help="local Kafka port")
    p.add_argument("--http-port", type=int, default=9308, help="metrics/health port")
    p.add_argument("--workdir", type=Path, default=None, help="default: ~/.cache/anomalyd/demo")
    p.add_argument("--streams", type=_at_least(1), default=8)
    p.add_argument("--steps", type=_at_least(1), default=500)
    p.add_argument("--rate", type=_positive, default=400.0, help="events per second")
    p.set_defaults(func=_cmd_demo)


def _version() -> str:
    """'anomalyd 0.1.0 (torch 2.x, kafka-python 3.x, confluent-kafka 2.x)': the installed distributions."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {of(d)}" for d in ("torch", "kafka-python", "confluent-kafka"))
    return f"anomalyd {of('anomalyd')} ({deps})"


class _VersionAction(argparse.Action):
    """``--version``: the versions are looked up only when asked (about 30 ms of package metadata, which every
    start of the daemon would otherwise pay)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the installed anomalyd, torch and Kafka client versions and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyd", description="Streaming anomaly detection on Kafka with GRU/LSTM autoencoders.",
        epilog="Quick start: `make demo`. Each command has --help.")
    _add_log_options(parser, "INFO", os.environ.get("ANOMALYD_LOG_FORMAT", "text").strip().lower())
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_check(sub)
    _add_train(sub)
    _add_produce(sub)
    _add_replay(sub)
    _add_demo(sub)
    try:
        from .evaluation.cli import add_evaluate_parser
    except ImportError:  # pragma: no cover - evaluation extras missing
        pass
    else:
        add_evaluate_parser(sub)
    _log_options_after_commands(parser)
    return parser


def _add_log_options(parser: argparse.ArgumentParser, level: str, fmt: str) -> None:
    parser.add_argument("--log-level", default=level, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="DEBUG, INFO (default), WARNING or ERROR")
    parser.add_argument("--log-format", choices=["text", "json"], default=fmt,
                        help="json: one JSON object per log line, for log collectors (default: $ANOMALYD_LOG_FORMAT "
                             "or text)")


def _log_options_after_commands(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format after the command too (``anomalyd run -c c.yaml --log-format json``, as a
    Kubernetes ``args:`` list appends them); given there, they win over the same options given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_log_options(command, argparse.SUPPRESS, argparse.SUPPRESS)
                _log_options_after_commands(command)


class DaemonCrash(RuntimeError):
    """A ValueError or OSError out of a running daemon: a bug or an outage, reported with its trace (exit 1), where
    the same error types at start-up are taken as the operator's to fix (exit 2)."""


_RUN_STOP = threading.Event()  # set by SIGTERM/SIGINT from the very start of `anomalyd run`


def _command_of(argv: list[str]) -> str | None:
    """The sub-command in ``argv`` (skipping the global options' values), without parsing the rest."""
    it = iter(argv)
    for token in it:
        if token in ("--log-level", "--log-format"):
            next(it, None)
        elif not token.startswith("-"):
            return token
    return None


def _cmd_run(args) -> int:
    from .config import ConfigError, load_config
    from .daemon import Daemon
    from .httpserver import BindError
    from .kafka_security import KafkaAuthenticationError, KafkaBootstrapError
    from .model_wait import models_awaited

    cfg = load_config(args.config)
    try:  # models.wait_for_models_s: alive and not ready (rather than exit 2) until the served models load
        with models_awaited(cfg, _RUN_STOP) as started:
            if started is None:
                logging.getLogger("anomalyd").info("stop requested while waiting for models: exiting")
                return 0
            cfg = started
            daemon = None if _RUN_STOP.is_set() else Daemon(cfg, stop_event=_RUN_STOP)  # loads the models
    except BindError as exc:
        raise _bind_error(cfg, exc) from exc
    if daemon is None or _RUN_STOP.is_set():  # SIGTERM while starting: nothing consumed, nothing to commit
        logging.getLogger("anomalyd").info("stop requested during start-up: exiting before connecting to Kafka")
        return 0
    from .check_cmd import fast_paths

    logging.getLogger("anomalyd").info(fast_paths(daemon))  # which device and native paths this process uses
    try:
        return daemon.run(timeout=args.timeout)
    except KafkaAuthenticationError as exc:  # a config problem: name the file and the key
        raise ConfigError([f"{cfg.where('kafka.security')}: kafka.security: {exc}"]) from exc
    except BindError as exc:
        raise _bind_error(cfg, exc) from exc
    except (ConfigError, KafkaBootstrapError):
        raise
    except (ValueError, OSError) as exc:  # once running, not the config's fault: main's trace and exit 1, not 2
        raise DaemonCrash(str(exc)) from exc


def _bind_error(cfg, exc: OSError) -> Exception:
    """The config error of an HTTP port that is taken (http.port) or an http.bind that is not this host's."""
    from .config import ConfigError

    key = "http.port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "http.bind"
    return ConfigError([f"{cfg.where(key)}: {key}: {exc}"])


def _cmd_check(args) -> int:
    from .check_cmd import check_command

    return check_command(args.config, args.connect)


def _cmd_train(args) -> int:
    from .train_cmd import train_command

    return train_command(args)


def _cmd_produce(args) -> int:
    import time

    from .kafka_io import make_producer
    from .produce import SyntheticFleet, produce_live, sent_anomalies

    fleet = SyntheticFleet(args.streams, args.features, args.prefix, args.seed)
    plan = fleet.plan(args.start_step, args.steps, args.anomalies)
    data, truth = fleet.live(args.start_step, args.steps, plan)
    t0 = int(time.time() * 1000) - args.start_step * args.interval_ms
    if args.truth is not None:  # an earlier run's file must not stand for this one if this one fails
        args.truth.unlink(missing_ok=True)
    producer = make_producer("kafka-python", args.bootstrap)  # Ctrl-C while it connects: KeyboardInterrupt
    stop = threading.Event()  # Ctrl-C: the run ends there, what was sent is flushed and its truth written

    def _interrupted(signum: int, frame: object) -> None:
        if stop.is_set():  # a second one: not waiting for the flush either
            raise KeyboardInterrupt
        stop.set()

    old = signal.signal(signal.SIGINT, _interrupted)
    try:
        n = produce_live(producer, args.topic, fleet, data, args.start_step, t0, args.interval_ms,
                         args.rate or None, truth, args.truth, stop=stop)
    finally:
        signal.signal(signal.SIGINT, old)
        producer.close()
    injected = len(sent_anomalies(truth, fleet, args.start_step, n))
    print(f"sent {n} events for {args.streams} streams to {args.topic}; {injected} anomalies injected"
          + (" (stopped by Ctrl-C)" if stop.is_set() else ""))
    return 130 if stop.is_set() else 0


def _cmd_replay(args) -> int:
    from .replay import replay_files

    return replay_files(args.config, args.inputs)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339, milliseconds), level, logger, message, and the exception's
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out = {"time": time, "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # anomalyd never compiles with triton. torch.optim (training, the demo) imports torch._dynamo, which imports
    # triton when it is installed (torch's CUDA wheel), and triton's bindings then print a "nanobind: leaked ..."
    # report of about 60 lines when the process exits. Keep triton out of this process unless already loaded.
    sys.modules.setdefault("triton", None)  # type: ignore[arg-type]
    if _command_of(argv) == "run" and threading.current_thread() is threading.main_thread():
        # Before the heavy imports: a SIGTERM while starting up must still mean "stop cleanly" (exit 0).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: _RUN_STOP.set())
        # SIGHUP's default kills the process (exit 129): until the daemon takes it, a reload asked for while
        # starting is already served, as the models are read then
        signal.signal(signal.SIGHUP, lambda *_: None)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format not in ("text", "json"):  # from ANOMALYD_LOG_FORMAT: argparse checks no default
        parser.error(f"ANOMALYD_LOG_FORMAT: must be text or json, got {args.log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), handlers=[handler])
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error for operators; --log-level DEBUG shows the trace
        from .config import ConfigError
        from .httpserver import BindError
        from .kafka_security import KafkaBootstrapError

        log = logging.getLogger("anomalyd")
        if isinstance(exc, ConfigError | ValueError | KafkaBootstrapError | BindError | FileNotFoundError
                      | IsADirectoryError | NotADirectoryError | PermissionError):
            if args.log_format == "json":
                log.error("anomalyd: error: %s", exc)
            else:
                print(f"anomalyd: error: {exc}", file=sys.stderr)
            log.debug("traceback", exc_info=True)
            return 1 if isinstance(exc, KafkaBootstrapError) else 2  # 1: may work later; 2: fix the config
        # anything else is a bug or an outage: the trace, as one record (one JSON line with --log-format json)
        cause = exc.__cause__ if isinstance(exc, DaemonCrash) and exc.__cause__ is not None else exc
        log.critical("anomalyd: stopped by an unexpected error: %s: %s", type(cause).__name__, cause, exc_info=cause)
        return 1


if __name__ == "__main__":
    sys.exit(main())
