"""Command-line parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanomad_stream.cli import _parser, main


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "c.yaml", "demo"],
        ["demo", "--config", "c.yaml"],
    ],
)
def test_config_before_or_after_command(argv: list[str]) -> None:
    """--config is accepted on either side of the subcommand."""
    args = _parser().parse_args(argv)
    assert args.config == Path("c.yaml")
    assert args.command == "demo"


def test_bad_config_exits_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid config file ends the command with exit code 2 and the key's path."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("edge:\n  window_events: -5\n")
    assert main(["--config", str(bad), "evaluate"]) == 2
    assert "edge.window_events" in capsys.readouterr().err


def test_edge_and_aggregator_take_modality() -> None:
    edge = _parser().parse_args(["edge", "--site", "s1", "--modality", "logs"])
    aggregator = _parser().parse_args(["aggregator", "--modality", "traces"])
    default = _parser().parse_args(["edge", "--site", "s1"])
    assert edge.modality == "logs"
    assert aggregator.modality == "traces"
    assert default.modality == "metrics"


def test_replay_takes_stream_datasets() -> None:
    args = _parser().parse_args(["replay", "nezha", "--limit", "500", "--speed", "10"])
    assert args.dataset == "nezha"
    assert args.limit == 500
    assert args.speed == 10.0
    with pytest.raises(SystemExit):
        _parser().parse_args(["replay", "loghub-unknown"])


def test_replay_missing_log_dir_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replay", "bgl", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "BGL_2k.log not found" in capsys.readouterr().err


def test_metrics_edge_rejects_sequence_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lstm.yaml"
    config.write_text("model:\n  kind: lstm_autoencoder\n")
    code = main(["--config", str(config), "edge", "--site", "s1"])
    assert code == 2
    assert "not supported for metrics" in capsys.readouterr().err


def test_site_named_harness_keeps_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the subcommand `harness` splits the arguments, not a value that reads the same."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("edge:\n  window_events: -5\n")
    assert main(["edge", "--site", "harness", "--config", str(bad)]) == 2
    assert "edge.window_events" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["harness", "--seeds", "0"], 0),
        (["--config", "c.yaml", "--log-json", "harness", "--list"], 3),
        (["edge", "--site", "harness"], 0),
        (["--log-level", "INFO"], None),
    ],
)
def test_subcommand_position(argv: list[str], expected: int | None) -> None:
    from fanomad_stream.cli import _subcommand_index

    assert _subcommand_index(_parser(), argv) == expected
