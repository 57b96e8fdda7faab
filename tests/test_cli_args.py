"""Command-line flags and environment the CLI refuses before it starts anything (exit 2, the flag named)."""

from __future__ import annotations

import pytest

from pipelines.cli import main


@pytest.mark.parametrize(("argv", "error"), [
    (["produce", "--streams", "0"], "argument --streams: must be >= 1, got 0"),
    (["produce", "--anomalies", "-1"], "argument --anomalies: must be >= 0, got -1"),
    (["produce", "--interval-ms", "0"], "argument --interval-ms: must be >= 1, got 0"),
    (["produce", "--rate", "nan"], "argument --rate: must be >= 0.0, got nan"),
    (["produce", "--steps", "x"], "argument --steps: expected an integer, got 'x'"),
    (["demo", "--rate", "0"], "argument --rate: must be > 0, got 0"),  # a ZeroDivisionError once the broker ran
    (["demo", "--streams", "0"], "argument --streams: must be >= 1, got 0"),
    (["demo", "--duration", "-5"], "argument --duration: must be >= 0.0, got -5"),
])
def test_bad_flags_are_refused_before_anything_starts(argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert error in capsys.readouterr().err


def test_a_log_format_from_the_environment_is_checked_and_case_insensitive(monkeypatch, capsys):
    monkeypatch.setenv("ANOMALYD_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exited:
        main(["check", "-c", "deploy/config.example.yaml"])
    assert exited.value.code == 2
    assert "ANOMALYD_LOG_FORMAT: must be text or json, got 'xml'" in capsys.readouterr().err
    monkeypatch.setenv("ANOMALYD_LOG_FORMAT", "JSON")  # was text output, without a word
    from pipelines.cli import build_parser

    assert build_parser().parse_args(["check", "-c", "x.yaml"]).log_format == "json"


@pytest.mark.parametrize("argv", [
    ["--log-format", "json", "--log-level", "debug", "run", "-c", "c.yaml"],
    ["run", "-c", "c.yaml", "--log-format", "json", "--log-level", "debug"],  # a Kubernetes args: list appended to
    ["--log-format", "text", "run", "-c", "c.yaml", "--log-format", "json", "--log-level", "debug"],  # after wins
    ["evaluate", "nab", "--data", "d", "--output", "o", "--log-level", "DEBUG", "--log-format", "json"],
])
def test_the_log_options_are_taken_before_or_after_the_command(argv, monkeypatch):
    from pipelines.cli import build_parser

    monkeypatch.delenv("ANOMALYD_LOG_FORMAT", raising=False)
    args = build_parser().parse_args(argv)
    assert (args.log_format, args.log_level) == ("json", "DEBUG")
    plain = build_parser().parse_args(argv[argv.index("run"):argv.index("c.yaml") + 1] if "run" in argv else
                                      ["evaluate", "nab", "--data", "d", "--output", "o"])
    assert (plain.log_format, plain.log_level) == ("text", "INFO")


def test_the_demo_does_not_replace_models_it_did_not_make(tmp_path, capsys):
    """--workdir pointed at a real models directory: the demo deleted DIR/models before anything else."""
    kept = tmp_path / "models" / "sensors-gru" / "20261126T100000000Z"
    kept.mkdir(parents=True)
    (kept / "model.json").write_text("{}")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "was not made by the demo; not replacing it" in capsys.readouterr().err
    assert (kept / "model.json").read_text() == "{}"
