"""Evaluation harness on small synthetic data: NAB corpus I/O, causal detectors, multivariate runner, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.evaluation import likelihood as lk
from pipelines.evaluation.cli import main
from pipelines.evaluation.multivariate import MultivariateSettings, evaluate_multivariate, load_entities
from pipelines.evaluation.nab import (
    load_corpus,
    read_result_files,
    run_corpus,
    score_results,
    write_result_files,
)
from pipelines.evaluation.nab_detector import NabDetectorConfig, NabStreamingDetector, parse_overrides
from pipelines.evaluation.nab_scorer import DEFAULT_PROFILES
from pipelines.evaluation.report import comparison_table

torch.set_num_threads(1)
TINY = {"window": 8, "hidden_size": 8, "latent_size": 2, "epochs": 2, "finetune_every": 64, "finetune_steps": 1}


def _series(n: int, spike_at: int | None, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 10 + np.sin(np.arange(n) * 2 * np.pi / 50) + 0.1 * rng.standard_normal(n)
    if spike_at is not None:
        x[spike_at] += 8.0
    return x


def _write_nab_corpus(root: Path) -> None:
    """Two anomalous files and one quiet file, 5-minute grid, NAB layout."""
    stamps = np.datetime64("2024-01-01T00:00") + np.arange(600) * np.timedelta64(5, "m")
    ts = [str(t).replace("T", " ") + ":00" for t in stamps]
    windows = {}
    for k, (name, spike) in enumerate([("synA/one.csv", 400), ("synA/two.csv", 300), ("synB/quiet.csv", None)]):
        x = _series(600, spike, k)
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in zip(ts, x, strict=True)))
        windows[name] = [] if spike is None else [[ts[spike - 10] + ".000000", ts[spike + 19] + ".000000"]]
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))


@pytest.fixture()
def nab_dir(tmp_path: Path) -> Path:
    _write_nab_corpus(tmp_path / "nab")
    return tmp_path / "nab"


def test_load_corpus_maps_windows_to_rows(nab_dir: Path) -> None:
    corpus = {f.name: f for f in load_corpus(nab_dir)}
    assert sorted(corpus) == ["synA/one.csv", "synA/two.csv", "synB/quiet.csv"]
    one = corpus["synA/one.csv"]
    assert one.windows == [(390, 419)]
    assert one.probation == 90  # floor(0.15 * 600)
    assert one.labels().sum() == 30
    assert corpus["synB/quiet.csv"].windows == []
    assert one.rows_per_day() == 288  # 5-minute grid


@pytest.mark.parametrize("bad", ["nan", "", "x"])
def test_a_value_that_is_not_a_finite_number_is_an_error_naming_the_file_and_line(nab_dir: Path, bad: str) -> None:
    """One NaN in a file made every later score NaN: the file then scored as a silent detector (half the corpus
    score gone, exit 0)."""
    path = nab_dir / "data" / "synA" / "two.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + "," + bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"two.csv:6: value must be a finite number, got \\['{bad}'\\]"):
        load_corpus(nab_dir)


@pytest.mark.parametrize("kind", ["gaussian", "gru", "lstm"])
def test_streaming_detector_is_causal(kind: str) -> None:
    x = _series(400, 300, 0)
    det_cfg = NabDetectorConfig(kind=kind, **TINY)
    full = NabStreamingDetector(det_cfg).score_stream(x, 60, period=50)  # seasonal floor active from row 100
    cut = 250
    changed = x.copy()
    changed[cut:] = np.random.default_rng(5).normal(50, 20, len(x) - cut)  # rewrite the future
    partial = NabStreamingDetector(det_cfg).score_stream(changed, 60, period=50)
    assert full.shape == (400,)
    assert np.all((full >= 0) & (full <= 1))
    np.testing.assert_array_equal(full[:cut], partial[:cut])
    assert not np.array_equal(full[cut:], partial[cut:])
    assert np.all(full[:60] == 0)


@pytest.mark.parametrize("kind", ["gaussian", "gru"])
def test_streaming_detector_finds_a_spike(kind: str) -> None:
    x = _series(500, 350, 1)
    s = NabStreamingDetector(NabDetectorConfig(kind=kind, **TINY)).score_stream(x, 75)
    assert abs(int(np.argmax(s)) - 350) <= 2
    assert s[350:360].max() >= 0.5


def test_run_score_and_result_files_round_trip(nab_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(nab_dir)
    results, seconds = run_corpus(corpus, lambda: NabStreamingDetector(NabDetectorConfig(kind="gaussian")),
                                  log=lambda _m: None)
    assert set(seconds) == set(results)
    summary = score_results(corpus, results, DEFAULT_PROFILES)
    assert summary["files"] == 3 and summary["windows"] == 2
    assert summary["standard"] > 90  # two clean spikes, nothing else
    write_result_files(tmp_path / "res", corpus, results)
    header = (tmp_path / "res" / "synA" / "one.csv").read_text().splitlines()[0]
    assert header == "timestamp,value,anomaly_score,label"
    again = score_results(corpus, read_result_files(tmp_path / "res"), DEFAULT_PROFILES)
    assert again["standard"] == pytest.approx(summary["standard"])


def test_likelihood_helpers_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    m = rng.standard_normal(300)
    np.testing.assert_allclose(lk.causal_mean(m, 5)[10], m[6:11].mean())
    mean, std = lk.past_mean_std(m, 50, 0.0)
    np.testing.assert_allclose(mean[120], m[70:120].mean())
    np.testing.assert_allclose(std[120], m[70:120].std())
    count, seen = lk.past_count_at_least(m, 1000, block=16)
    t = 200
    assert count[t] == np.sum(m[:t] >= m[t]) and seen[t] == t


def test_seasonal_floor_discounts_only_errors_that_recur_every_period() -> None:
    rng = np.random.default_rng(3)
    period, n = 40, 400
    e = 0.1 * rng.random(n)
    e[np.arange(5, n, period)] += 1.0  # the same error at the same phase of every period
    e[333] += 2.0  # a new one
    out = lk.seasonal_floor(e, period, periods=2, slack=2)
    ref = e.copy()
    for t in range(2 * period, n):  # brute force
        seen = min(e[max(0, t - k * period - 2) : t - k * period + 3].max() for k in (1, 2))
        ref[t] = max(e[t] - seen, 0.0)
    np.testing.assert_allclose(out, ref)
    np.testing.assert_array_equal(out[: 2 * period], e[: 2 * period])  # not enough history yet
    assert out[85] < 0.1 < 1.0 < e[85]  # third occurrence: expected
    assert out[333] > 1.9  # new: kept
    for t in (150, 333):  # causal: the future does not change the past
        changed = e.copy()
        changed[t + 1 :] = 5.0
        np.testing.assert_array_equal(lk.seasonal_floor(changed, period)[: t + 1], out[: t + 1])
    np.testing.assert_array_equal(lk.seasonal_floor(e, 4, slack=2), e)  # period too short for the slack: off
    np.testing.assert_array_equal(lk.seasonal_floor(e, period, periods=0), e)


def test_spatial_novelty_and_suppression() -> None:
    x = np.array([0.0, 1.0, 0.5, 1.02, 1.2, 0.9, -0.3])
    np.testing.assert_array_equal(lk.spatial_novelty(x, 2, margin=0.05), [0, 0, 0, 0, 1, 0, 1])
    s = np.array([0.1, 0.6, 0.7, 0.2, 0.9, 0.6, 0.1])
    np.testing.assert_array_equal(lk.suppress_after_alarm(s, 0.5, 2), [0.1, 0.6, 0, 0, 0.9, 0, 0])


def test_anomaly_loglik_flags_a_rise_in_error() -> None:
    rng = np.random.default_rng(0)
    raw = np.abs(rng.normal(0, 1, 2000))
    raw[1500:1510] += 6.0
    s = lk.anomaly_loglik(raw, avg=5, history=1000)
    assert s[1500:1515].max() > 0.5 > s[500:1490].max()


def test_parse_overrides() -> None:
    got = parse_overrides(["hold=200", "diff_channel=false", "spatial_margin=none", "lr=0.01"])
    assert got == {"hold": 200, "diff_channel": False, "spatial_margin": None, "lr": 0.01}
    with pytest.raises(ValueError, match="bad setting"):
        parse_overrides(["nope=1"])
    with pytest.raises(ValueError, match="chosen with --model"):  # it made every model, the baseline too, one kind
        parse_overrides(["kind=gaussian"])


def _write_entities(root: Path) -> None:
    rng = np.random.default_rng(0)
    for d in ("train", "test", "test_label"):
        (root / d).mkdir(parents=True)
    for k in range(2):
        t = np.arange(700)
        base = np.stack([np.sin(t / 7 + k), np.cos(t / 11), 0.5 * np.sin(t / 5)], axis=1)
        x = (base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)
        train, test = x[:400], x[400:].copy()
        labels = np.zeros(300, dtype=int)
        labels[150:170] = 1
        test[150:170, 1] += 3.0
        np.save(root / "train" / f"e{k}.npy", train)
        np.save(root / "test" / f"e{k}.npy", test)
        (root / "test_label" / f"e{k}.txt").write_text("".join(f"{v}\n" for v in labels))


def test_multivariate_runner(tmp_path: Path) -> None:
    _write_entities(tmp_path / "mv")
    entities = load_entities(tmp_path / "mv")
    s = MultivariateSettings(window=8, hidden_size=8, latent_size=4, epochs=2, max_windows=300)
    for kind in ("gaussian", "gru"):
        summary, results = evaluate_multivariate(entities, kind, s, log=lambda _m: None)
        assert summary["entities"] == 2
        assert len(results[0].scores) == 300
        for key in ("f1", "f1_point_adjusted", "f1_event", "auc_pr"):
            assert 0.0 <= summary[key] <= 1.0
        assert summary["f1_point_adjusted"] >= summary["f1"] - 1e-12
    assert summary["auc_pr"] > 0.5  # the injected shift is obvious to the autoencoder


def test_cli_nab_and_multivariate(nab_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "nab.json"
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    rc = main(["evaluate", "nab", "--data", str(nab_dir), "--model", "gru", "--output", str(out), "--quiet",
               "--plots", str(tmp_path / "plots"), "--scores-dir", str(tmp_path / "scores"), *sets])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("standard", "reward_low_FP_rate", "reward_low_FN_rate", "files"):
        assert key in res
    assert set(res["models"]) == {"gru", "gaussian"}
    assert (tmp_path / "plots" / "gru" / "synA__one.png").stat().st_size > 10_000
    assert (tmp_path / "scores" / "synB" / "quiet.csv").exists()  # the requested model: NAB layout
    assert (tmp_path / "scores" / "gaussian" / "synB" / "quiet.csv").exists()  # the added baseline

    _write_entities(tmp_path / "mv")
    out = tmp_path / "mv.json"
    rc = main(["evaluate", "multivariate", "--data", str(tmp_path / "mv"), "--model", "lstm", "--output",
               str(out), "--epochs", "1", "--window", "8", "--hidden", "8", "--quiet",
               "--report", str(tmp_path / "mv.md")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"f1", "f1_point_adjusted", "f1_event", "auc_pr", "entities"} <= set(res)
    assert "| lstm |" in (tmp_path / "mv.md").read_text()


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    assert main(["evaluate", "nab", "--data", str(tmp_path), "--output", str(tmp_path / "x.json")]) == 2
    assert main(["evaluate", "nab", "--data", str(tmp_path), "--model", "cnn", "--output", "x.json"]) == 2


@pytest.mark.parametrize("flag,where,named", [("--output", "dir", "dir"), ("--report", "file/r.md", "file"),
                                              ("--scores-dir", "file/scores", "file"), ("--plots", "file", "file"),
                                              ("--plots", "to-file/x", "file"), ("--raw-cache", "file/raw", "file"),
                                              ("--raw-cache", "file", "file")])
def test_outputs_that_cannot_be_written_are_refused_before_the_run(nab_dir: Path, tmp_path: Path, flag: str,
                                                                     where: str, named: str, monkeypatch,
                                                                     capsys) -> None:
    """A full NAB or SMD run takes hours: an --output that is a directory, or a --report, --scores-dir or --plots
    under a file, failed only when the results were written, and lost them (a --raw-cache, after the first file's
    training)."""
    from pipelines.evaluation import nab

    monkeypatch.setattr(nab, "run_corpus", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "to-file").symlink_to(tmp_path / "file")  # a link: checked where it leads
    argv = ["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--quiet"]
    argv += ["--output", str(tmp_path / "x.json")] if flag != "--output" else []
    assert main([*argv, flag, str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert flag in err and str(tmp_path / named) in err  # new directories for them: test_cli_nab_and_multivariate


def test_outputs_through_symbolic_links_are_written_where_they_lead(nab_dir: Path, tmp_path: Path) -> None:
    """A link to a file not made yet (latest.json -> run-42.json) and a link to a directory not made yet are
    written through, as a shell's redirection would: the first check had refused the one, the write the other."""
    (tmp_path / "latest.json").symlink_to(tmp_path / "run-42.json")
    (tmp_path / "plots").symlink_to(tmp_path / "plots-42")
    rc = main(["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--no-baseline", "--quiet",
               "--output", str(tmp_path / "latest.json"), "--plots", str(tmp_path / "plots")])
    assert rc == 0 and json.loads((tmp_path / "run-42.json").read_text())["files"] == 3
    assert list((tmp_path / "plots-42" / "gaussian").glob("*.png"))


@pytest.mark.parametrize("flag", ["--output", "--report"])
def test_outputs_to_a_pipe_are_written_through_the_path_as_given(nab_dir: Path, tmp_path: Path, flag: str) -> None:
    """--output /dev/stdout, or /dev/fd/63 from >(jq .), is a pipe: the check stored its real path,
    /proc/<pid>/fd/pipe:[N], which cannot be opened, and the run failed when it wrote its results."""
    import os
    import threading

    r, w = os.pipe()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(r, "rb").read()))  # the JSON may fill the pipe
    reader.start()
    try:
        argv = ["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--no-baseline", "--quiet"]
        argv += ["--output", str(tmp_path / "x.json")] if flag == "--report" else []
        rc = main([*argv, flag, f"/dev/fd/{w}"])
    finally:
        os.close(w)
        reader.join(timeout=30)
    assert rc == 0
    text = got[0].decode()
    if flag == "--output":
        assert json.loads(text)["files"] == 3
    else:
        assert "| gaussian |" in text


@pytest.mark.parametrize("command", ["nab", "multivariate"])
def test_plots_without_matplotlib_are_refused_before_the_run(nab_dir: Path, tmp_path: Path, command: str,
                                                             monkeypatch, capsys) -> None:
    """matplotlib is only in the dev extra: --plots without it scored the whole corpus, then stopped with an
    unexpected error (exit 1) before the results were written."""
    import sys

    from pipelines.evaluation import multivariate, nab

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on an install without it: find_spec and import fail
    monkeypatch.setattr(nab, "run_corpus", lambda *a, **k: pytest.fail("the run started"))
    monkeypatch.setattr(multivariate, "evaluate_multivariate", lambda *a, **k: pytest.fail("the run started"))
    data = nab_dir
    if command == "multivariate":
        _write_entities(tmp_path / "mv")
        data = tmp_path / "mv"
    rc = main(["evaluate", command, "--data", str(data), "--model", "gaussian", "--quiet",
               "--output", str(tmp_path / "x.json"), "--plots", str(tmp_path / "plots")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--plots needs matplotlib" in err and "pip install matplotlib" in err
    assert not (tmp_path / "plots").exists()


def test_a_failed_plot_loses_no_results(nab_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The figures were drawn after each model's run and before the JSON and the report were written: one that
    failed lost them all."""
    from pipelines.evaluation import plots

    def fail(*_a, **_k):
        raise RuntimeError("no figure")

    monkeypatch.setattr(plots, "plot_detection", fail)
    with pytest.raises(RuntimeError, match="no figure"):
        main(["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--quiet", "--output",
              str(tmp_path / "x.json"), "--report", str(tmp_path / "r.md"), "--plots", str(tmp_path / "plots")])
    assert set(json.loads((tmp_path / "x.json").read_text())["models"]) == {"gaussian"}
    assert "| gaussian |" in (tmp_path / "r.md").read_text()


def test_anomalyd_evaluate_errors_follow_the_log_format(tmp_path: Path) -> None:
    """README: with --log-format json every line is JSON, the final error included; evaluate printed text."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "--log-format", "json", "evaluate", "multivariate",
                           "--data", str(tmp_path / "none"), "--output", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err and all(json.loads(line)["level"] for line in err), proc.stderr
    assert "none" in json.loads(err[-1])["message"]


def test_comparison_table() -> None:
    table = comparison_table({"gru": {"params": 100, "standard": 61.234}}, [("standard", "NAB", ".1f")])
    assert table.splitlines()[2] == "| gru | 100 | n/a | n/a | n/a | 61.2 |"


def test_bonferroni_lowers_likelihood_channels_only() -> None:
    x = _series(500, None, 2)
    x[420:] += 5.0  # a level shift beyond the range seen so far: the spatial rule fires at full strength
    base = NabDetectorConfig(kind="gaussian", hold=0)
    with_b = NabStreamingDetector(base).score_stream(x, 75)
    without = NabStreamingDetector(base.replace(bonferroni=False)).score_stream(x, 75)
    assert np.all(with_b <= without + 1e-12)
    assert with_b[420] == 1.0  # spatial novelty is not a probability and is not corrected
    assert with_b[:420].sum() < without[:420].sum()


def test_plain_scores_keep_the_error_ranking() -> None:
    x = _series(400, 300, 3)
    det = NabStreamingDetector(NabDetectorConfig(kind="gaussian", postprocess=False))
    raw = det.raw_errors(x, 60)
    s = det.score_stream(x, 60)
    order = np.argsort(raw[60:], kind="stable")
    assert np.all(np.diff(s[60:][order]) >= 0)


def test_raw_error_cache(tmp_path: Path) -> None:
    x = _series(300, 200, 4)
    cfg = NabDetectorConfig(kind="gru", **TINY)
    first = NabStreamingDetector(cfg, raw_cache=tmp_path)
    s1 = first.score_stream(x, 45)
    assert not first.cache_hit and len(list(tmp_path.glob("gru-*.npy"))) == 1
    again = NabStreamingDetector(cfg, raw_cache=tmp_path)
    np.testing.assert_array_equal(again.score_stream(x, 45), s1)
    assert again.cache_hit
    post = NabStreamingDetector(cfg.replace(hold=10), raw_cache=tmp_path)  # post-processing only: a hit
    post.score_stream(x, 45)
    assert post.cache_hit
    other = NabStreamingDetector(cfg.replace(seed=1), raw_cache=tmp_path)  # different model: a miss
    other.score_stream(x, 45)
    assert not other.cache_hit


def test_the_raw_error_cache_misses_on_another_machine_or_code(tmp_path: Path, monkeypatch) -> None:
    """Raw errors differ in their last bits between CPUs (the maths libraries' code paths), and with the code: a
    cache made elsewhere, or before a change, was used as if it were this machine's and this code's."""
    from pipelines.evaluation import nab_detector

    x = _series(300, 200, 4)
    cfg = NabDetectorConfig(kind="gru", **TINY)
    NabStreamingDetector(cfg, raw_cache=tmp_path).score_stream(x, 45)
    here = nab_detector._machine_and_code()
    assert "torch " in here
    monkeypatch.setattr(nab_detector, "_machine_and_code", lambda: here + "|another CPU")
    elsewhere = NabStreamingDetector(cfg, raw_cache=tmp_path)
    elsewhere.score_stream(x, 45)
    assert not elsewhere.cache_hit


def test_anomalyd_evaluate_is_wired(nab_dir: Path, tmp_path: Path) -> None:
    from pipelines import cli as anomalyd
    out = tmp_path / "g.json"
    rc = anomalyd.main(["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--output", str(out),
                        "--quiet"])
    assert rc == 0 and json.loads(out.read_text())["files"] == 3


def test_the_report_is_not_printed_over_an_output_sent_to_stdout(nab_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`--output /dev/stdout > out.json`: the report was printed after the JSON on the same standard output (a
    pipe got invalid JSON; a file stdout was sent to got the report over the JSON's start). It is left out there:
    the JSON carries it (report_markdown)."""
    import sys

    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        rc = main(["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--no-baseline", "--quiet",
                   "--output", str(out)])
    assert rc == 0
    assert "| gaussian |" in json.loads(out.read_text())["report_markdown"]


def test_a_raw_cache_that_exists_need_not_be_writable(tmp_path: Path, monkeypatch) -> None:
    """The raw cache is written only on a miss: a read-only cache of hits served before the output check, which
    then refused it."""
    import argparse
    import os

    from pipelines.evaluation.cli import _check_outputs

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # read-only (root passes any permission bits)
    args = argparse.Namespace(output=None, report=None, scores_dir=None, plots=None, raw_cache=str(cache))
    _check_outputs(args)
    with pytest.raises(PermissionError, match="--raw-cache"):
        _check_outputs(argparse.Namespace(output=None, report=None, scores_dir=None, plots=None,
                                          raw_cache=str(tmp_path / "new")))


def test_a_raw_cache_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path: Path, caplog) -> None:
    """A read-only cache of hits passes the output check; a miss there then failed the whole run when it wrote."""
    import logging

    x = _series(300, 200, 4)
    (tmp_path / "file").write_text("")  # a cache path below a file: every write fails (root ignores modes)
    det = NabStreamingDetector(NabDetectorConfig(kind="gaussian"), raw_cache=tmp_path / "file" / "cache")
    with caplog.at_level(logging.WARNING, logger="anomalyd"):
        scores = det.score_stream(x, 45)
        det.score_stream(x, 45)
    assert len(scores) == len(x) and not det.cache_hit
    assert [r.getMessage() for r in caplog.records].count(next(iter(caplog.messages))) == 1  # said once
    assert "not written" in caplog.messages[0]


def test_a_raw_cache_write_cut_short_leaves_no_file_to_load(tmp_path: Path, monkeypatch) -> None:
    """A full disk cut the cached array short; the next run loaded it as a hit and failed."""
    import numpy

    from pipelines.evaluation import nab_detector

    real_save = numpy.save

    def cut_short(out, arr):
        real_save(out, arr[: len(arr) // 2])  # part of it written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nab_detector.np, "save", cut_short)
    NabStreamingDetector(NabDetectorConfig(kind="gaussian"), raw_cache=tmp_path).score_stream(_series(300, 200, 4), 45)
    assert not list(tmp_path.iterdir())  # neither a cut file to load nor its .partial on the full disk


def test_an_output_to_stdout_appended_to_a_file_keeps_what_the_file_held(nab_dir: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """`--output /dev/stdout >> log`: the output was opened again by its path, which truncated the file."""
    import sys

    out = tmp_path / "log"
    out.write_text("earlier\n")
    with open(out, "a") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["evaluate", "nab", "--data", str(nab_dir), "--model", "gaussian", "--no-baseline", "--quiet",
                     "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("earlier\n") and json.loads(text[len("earlier\n"):])["files"] == 3
