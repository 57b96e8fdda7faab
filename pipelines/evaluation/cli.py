"""``anomalyd evaluate nab|multivariate``: accuracy and cost of the detectors on labelled data.

Both commands take ``--model gru|lstm|gaussian`` or a comma list (``--model gru,lstm``); the windowed-
Gaussian baseline is added to every run unless ``--no-baseline``, so each report shows the autoencoders
against it. The JSON output carries the first model's figures at the top level and every model under
``"models"``, plus a Markdown comparison table (also written with ``--report``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODEL_CHOICES = ("gru", "lstm", "gaussian")


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate`` (with ``nab`` and ``multivariate``) on an argparse subparsers object."""
    ev = subparsers.add_parser("evaluate", help="accuracy of the detectors on labelled benchmark data")
    ev.set_defaults(func=main_evaluate)  # for CLIs that dispatch on args.func
    sub = ev.add_subparsers(dest="evaluate_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, help="dataset directory")
        p.add_argument("--model", default="gru", help="gru | lstm | gaussian, or a comma list (gru,lstm)")
        p.add_argument("--output", required=True, help="JSON file with the results")
        p.add_argument("--plots", help="directory for one PNG per series/entity and model")
        p.add_argument("--report", help="also write the Markdown comparison table to this file")
        p.add_argument("--no-baseline", action="store_true", help="do not add the windowed-Gaussian baseline")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        p.add_argument("--quiet", action="store_true", help="no per-file progress lines")

    nab = sub.add_parser("nab", help="NAB-format corpus, NAB streaming rules and scorer")
    common(nab)
    nab.add_argument("--scores-dir", help="write per-row scores as NAB result files DIR/<category>/<name>.csv "
                     "(first model; further models, the baseline included, under DIR/<model>/)")
    nab.add_argument("--files", help="only files whose name contains this text (quick checks)")
    nab.add_argument("--set", action="append", metavar="KEY=VALUE", dest="settings",
                     help="override a NabDetectorConfig setting for every file (repeatable)")
    nab.add_argument("--raw-cache", help="reuse raw model errors stored here (compare post-processing variants)")

    mv = sub.add_parser("multivariate", help="SMD/ASD layout: train/, test/, test_label/")
    common(mv)
    mv.add_argument("--entities", help="comma list of entities (default: all)")
    mv.add_argument("--epochs", type=int, default=None)
    mv.add_argument("--window", type=int, default=None)
    mv.add_argument("--hidden", type=int, default=None)
    mv.add_argument("--max-windows", type=int, default=None, help="training windows per epoch (cap)")
    mv.add_argument("--device", default="cpu")
    return ev


def _models(text: str, baseline: bool) -> list[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_CHOICES]
    if not models or bad:
        raise ValueError(f"--model must be a comma list of {MODEL_CHOICES}, got {text!r}")
    if baseline and "gaussian" not in models:
        models.append("gaussian")
    return list(dict.fromkeys(models))


def _jsonable(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the run and not after its hours, outputs that could not be written: ``--output`` and
    ``--report`` files, ``--scores-dir``, ``--plots`` and ``--raw-cache`` directories, and ``--plots`` without
    matplotlib. A path that exists is kept as given: ``/dev/stdout`` or the ``/dev/fd/63`` of ``>(jq .)`` is a pipe,
    whose real path (``/proc/<pid>/fd/pipe:[N]``) cannot be opened. One that does not exist yet is replaced by its
    real path (symbolic links followed, one to a path not made yet too), which the writers then make and write."""
    if getattr(args, "plots", None) and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plots needs matplotlib, which is not installed (it is in neither the [fast] extra nor "
                         "the container image): pip install matplotlib, or leave out --plots")
    for flag, attr, directory in (("--output", "output", False), ("--report", "report", False),
                                  ("--scores-dir", "scores_dir", True), ("--plots", "plots", True),
                                  ("--raw-cache", "raw_cache", True)):
        text = getattr(args, attr, None)
        if not text:
            continue
        given = Path(text)
        if attr == "raw_cache" and given.is_dir():  # written only on a miss: a read-only cache of hits serves
            continue
        path = target = given if given.exists() else Path(os.path.realpath(text))  # exists(): links followed
        if path.exists() and path.is_dir() != directory:  # a file, a pipe or a character device is a file here
            what = ("a directory", "a file") if path.is_dir() else ("a file", "a directory")
            raise (IsADirectoryError if path.is_dir() else NotADirectoryError)(f"{flag} {text}: is {what[0]}, "
                                                                                f"not {what[1]} to write")
        while not target.exists() and target != target.parent:  # the first part that exists is created under
            target = target.parent
        if target != path and not target.is_dir():
            raise NotADirectoryError(f"{flag} {text}: {target} is not a directory")
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{flag} {text}: {target} is not writable")
        setattr(args, attr, str(path))


def _is_stdout(path: str | None) -> bool:
    """Whether ``path`` is the file standard output goes to (``/dev/stdout``, or the file it was sent to)."""
    try:
        out = os.fstat(sys.stdout.fileno())
        st = os.stat(path) if path else None
    except (OSError, ValueError, io.UnsupportedOperation):  # no real stdout (a test's capture), no such file
        return False
    return st is not None and (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def _print_report(args: argparse.Namespace, report: str) -> None:
    """The report on standard output, unless an output goes there already (``--output /dev/stdout``): the JSON
    and the report one after the other made neither readable (a file stdout was sent to: the report over it)."""
    if not any(_is_stdout(path) for path in (args.output, getattr(args, "report", None))):
        print(report)


def _write(path: str, text: str) -> None:
    """``text`` to ``path``; to standard output itself where that is where it goes: opened again, /dev/stdout
    truncated the file of a ``>> file`` (what it held before was lost)."""
    if _is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _write_outputs(args: argparse.Namespace, models: list[str], summaries: dict, report: str, seconds: float) -> None:
    out = dict(summaries[models[0]])
    out.update({"model": models[0], "models": summaries, "seconds": seconds, "report_markdown": report})
    _write(args.output, json.dumps(_jsonable(out), indent=2) + "\n")
    if args.report:
        _write(args.report, report)


def run_nab(args: argparse.Namespace, log) -> int:
    from pipelines.evaluation.nab import (
        load_corpus,
        load_corpus_profiles,
        run_corpus,
        score_results,
        write_result_files,
    )
    from pipelines.evaluation.nab_detector import NabDetectorConfig, NabStreamingDetector, parse_overrides
    from pipelines.evaluation.report import nab_report

    t_start = time.perf_counter()
    models = _models(args.model, not args.no_baseline)
    overrides = parse_overrides(args.settings)
    _check_outputs(args)
    corpus = load_corpus(args.data)
    if args.files:
        corpus = [f for f in corpus if args.files in f.name]
        if not corpus:
            raise ValueError(f"no file name contains {args.files!r}")
    profiles = load_corpus_profiles(args.data)
    n_rows = sum(len(f.values) for f in corpus)
    summaries: dict[str, dict] = {}
    to_plot: list[tuple[str, dict, dict]] = []
    for kind in models:
        cfg = NabDetectorConfig(kind=kind).replace(**overrides)
        log(f"NAB: {kind} on {len(corpus)} files ({n_rows} rows)")
        made: list[NabStreamingDetector] = []

        def make(cfg: NabDetectorConfig = cfg, made: list = made) -> NabStreamingDetector:
            made.append(NabStreamingDetector(cfg, raw_cache=args.raw_cache))
            return made[-1]

        results, seconds = run_corpus(corpus, make, log=log)
        summary = score_results(corpus, results, profiles)
        train_s = sum(d.train_seconds for d in made)
        total_s = sum(seconds.values())
        summary.update(made[0].cost())
        summary.update({
            "train_seconds": train_s,
            "run_seconds": total_s,
            "rows_per_second": n_rows / max(total_s - train_s, 1e-9),
            "raw_cache_hits": sum(d.cache_hit for d in made),
            "config": {k: v for k, v in vars(cfg).items()},
        })
        summaries[kind] = summary
        log(f"NAB {kind}: standard {summary['standard']:.1f}  low-FP {summary['reward_low_FP_rate']:.1f}  "
            f"low-FN {summary['reward_low_FN_rate']:.1f}  ({total_s:.0f}s)")
        if args.scores_dir:
            target = Path(args.scores_dir) if kind == models[0] else Path(args.scores_dir) / kind
            write_result_files(target, corpus, results)
        if args.plots:
            to_plot.append((kind, results, summary))
    seconds_all = time.perf_counter() - t_start
    report = nab_report(summaries, args.data, seconds_all)
    _write_outputs(args, models, summaries, report, seconds_all)
    _print_report(args, report)
    for kind, results, summary in to_plot:  # after the results are written: a failed figure loses none of them
        _nab_plots(Path(args.plots) / kind, corpus, results, summary)
    return 0


def _nab_plots(out_dir: Path, corpus, results, summary: dict) -> None:
    from pipelines.evaluation.plots import plot_detection, safe_filename

    thr = float(summary["details"]["standard"]["threshold"])
    for f in corpus:
        plot_detection(out_dir / f"{safe_filename(f.name)}.png", f"{f.name}  (standard-profile threshold)",
                       f.values, results[f.name], thr, f.labels(), probation=f.probation)


def run_multivariate(args: argparse.Namespace, log) -> int:
    from pipelines.evaluation.multivariate import MultivariateSettings, evaluate_multivariate, load_entities
    from pipelines.evaluation.plots import plot_detection, safe_filename
    from pipelines.evaluation.report import multivariate_report

    t_start = time.perf_counter()
    models = _models(args.model, not args.no_baseline)
    _check_outputs(args)
    names = [e.strip() for e in args.entities.split(",")] if args.entities else None
    entities = load_entities(args.data, names)
    s = MultivariateSettings(device=args.device)
    for key, value in (("epochs", args.epochs), ("window", args.window), ("hidden_size", args.hidden),
                       ("max_windows", args.max_windows)):
        if value is not None:
            setattr(s, key, value)
    summaries: dict[str, dict] = {}
    to_plot: list[tuple[str, list]] = []
    for kind in models:
        log(f"multivariate: {kind} on {len(entities)} entities")
        summary, results = evaluate_multivariate(entities, kind, s, log=log)
        summary["settings"] = vars(s)
        summaries[kind] = summary
        log(f"{kind}: f1 {summary['f1']:.3f}  f1_pa {summary['f1_point_adjusted']:.3f}  "
            f"f1_event {summary['f1_event']:.3f}  auc_pr {summary['auc_pr']:.3f}")
        if args.plots:
            to_plot.append((kind, results))
    seconds_all = time.perf_counter() - t_start
    report = multivariate_report(summaries, args.data, seconds_all)
    _write_outputs(args, models, summaries, report, seconds_all)
    _print_report(args, report)
    for kind, results in to_plot:  # after the results are written: a failed figure loses none of them
        for e, r in zip(entities, results, strict=True):
            plot_detection(Path(args.plots) / kind / f"{safe_filename(e.name)}.png",
                           f"{e.name} ({kind}, calibrated threshold)", e.test, r.scores, r.threshold,
                           e.labels, log_scores=True)
    return 0


def main_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate nab`` or ``evaluate multivariate``; returns a process exit code. Bad input raises
    (``ValueError``, ``FileNotFoundError``, ...), which ``anomalyd``'s main reports in the chosen log format."""
    torch.set_num_threads(max(1, args.threads))
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.evaluate_command == "nab":
        return run_nab(args, log)
    return run_multivariate(args, log)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.evaluation.cli``: evaluate alone, bad input reported as one line and exit 2."""
    parser = argparse.ArgumentParser(prog="anomalyd")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return main_evaluate(parser.parse_args(argv))
    except (OSError, ValueError) as exc:
        print(f"anomalyd evaluate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Standalone use before ``anomalyd evaluate`` exists: python -m pipelines.evaluation.cli nab ...
    sys.exit(main(["evaluate", *sys.argv[1:]]))
