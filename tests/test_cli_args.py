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
    (["run", "-c", "c.yaml", "--timeout", "nan"], "argument --timeout: must be >= 0.0, got nan"),  # were taken
    (["run", "-c", "c.yaml", "--timeout", "-1"], "argument --timeout: must be >= 0.0, got -1"),
    (["produce", "--features", "1"], "argument --features: must be >= 2, got 1"),  # a ValueError once connected
    (["produce", "--bootstrap", "a:b"], "argument --bootstrap: cannot read 'a:b' as host:port"),  # int() error
    (["produce", "--bootstrap", ","], "argument --bootstrap: no broker in ','"),
    (["train", "--kafka-topic", "t", "--bootstrap", "k:0", "--name", "m", "--models-dir", "d"],
     "argument --bootstrap: cannot read 'k:0' as host:port"),
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


def test_the_demo_reads_its_own_config_without_the_users_overrides(tmp_path, monkeypatch):
    """ANOMALYD_* variables of the user's shell (their group id, their models) changed what the demo ran."""
    from pipelines.demo import demo_config

    path = tmp_path / "config.yaml"
    path.write_text("kafka: {group_id: demo-1}\n")
    monkeypatch.setenv("ANOMALYD_KAFKA__GROUP_ID", "theirs")
    monkeypatch.setenv("ANOMALYD_ALERTS__K", "x")
    cfg = demo_config(path)
    assert cfg.kafka.group_id == "demo-1" and cfg.env_keys == {}


def test_train_help_names_the_defaults_of_the_model_it_trains(capsys):
    """An operator could not tell the window or sizes a model gets (nor the README) without reading the code."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # the help's lines joined
    for default in ("--window WINDOW window length, in events of a stream (default: 32)", "(default: spot)",
                    "--seed SEED random seed", "(default: 0)", "--kind {gru,lstm} autoencoder kind (default: gru)"):
        assert default in text
    assert "(default: None)" not in text
