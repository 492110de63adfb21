"""Shipped YAML configs, the errors a bad config gets, and seeded reproducibility."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fanomad_stream.cli import _parser
from fanomad_stream.config import AppConfig, KafkaSettings, load_config, parse_config
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.run import local_only_scores
from fanomad_stream.transport.kafka import client_options

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    """Every YAML file in configs/ passes validation."""
    assert isinstance(load_config(path), AppConfig)


def test_compose_config_shipped() -> None:
    """The compose stack's config is among the shipped configs."""
    assert "compose.yaml" in [p.name for p in CONFIGS]


@pytest.mark.parametrize(
    ("raw", "path", "detail"),
    [
        ({"edge": {"window_event": 100}}, "edge.window_event", "Extra inputs are not permitted"),
        ({"edge": {"threshold": {"quantile": 1.5}}}, "edge.threshold.quantile", "less than 1"),
        ({"model": {"learning_rate": 0}}, "model.learning_rate", "greater than 0"),
        (
            {"kafka": {"max_message_bytes": 10}},
            "kafka.max_message_bytes",
            "greater than or equal to 1048576",
        ),
        ({"replay": {"machines": []}}, "replay.machines", "at least 1 item"),
        ({"kafka": {"security_protocol": "SASL_SSL"}}, "kafka", "needs sasl_mechanism"),
        (
            {"kafka": {"ssl_keyfile": "client.key"}},
            "kafka",
            "ssl_keyfile is set without ssl_certfile",
        ),
    ],
    ids=[
        "unknown-key",
        "quantile-range",
        "learning-rate",
        "message-size",
        "no-machines",
        "sasl",
        "tls-key",
    ],
)
def test_bad_config_names_key_and_range(raw: dict[str, object], path: str, detail: str) -> None:
    """A bad key or value is rejected with its dotted path and the accepted range."""
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, source="test.yaml")

    message = str(caught.value)
    assert "test.yaml" in message
    assert f"  {path}:" in message
    assert detail in message


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    """An unknown key in a file on disk is reported with the file name and the key path."""
    path = tmp_path / "bad.yaml"
    path.write_text("aggregator:\n  quorum: 2\n  deadline_s: 5\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(path) in str(caught.value)
    assert "aggregator.deadline_s" in str(caught.value)


def test_tls_settings_reach_client_options() -> None:
    """security_protocol SSL gives every aiokafka client an SSL context that verifies hosts."""
    settings = KafkaSettings(security_protocol="SSL")

    options = client_options(settings)

    assert options["security_protocol"] == "SSL"
    assert options["ssl_context"].check_hostname is True


def test_environment_fills_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """FANOMAD_CONFIG, FANOMAD_BOOTSTRAP and FANOMAD_SITE stand in for the options."""
    monkeypatch.setenv("FANOMAD_CONFIG", "/etc/fanomad/compose.yaml")
    monkeypatch.setenv("FANOMAD_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("FANOMAD_SITE", "machine-1-3")

    args = _parser().parse_args(["edge"])

    assert args.config == Path("/etc/fanomad/compose.yaml")
    assert args.bootstrap == "kafka:9092"
    assert args.site == "machine-1-3"


def test_site_required_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without FANOMAD_SITE the edge command still requires --site."""
    monkeypatch.delenv("FANOMAD_SITE", raising=False)

    with pytest.raises(SystemExit):
        _parser().parse_args(["edge"])


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Train on one thread, as the edge service does; it is also faster on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
class TestSeededRuns:
    """The offline pipeline (edge scoring and window training, no Kafka) is reproducible."""

    @staticmethod
    def values(rows: int = 600) -> np.ndarray:
        rng = np.random.default_rng(11)
        data = rng.normal(size=(rows, 38)).astype(np.float32)
        data[500:510] += 6.0
        return data

    @staticmethod
    def config(seed: int) -> AppConfig:
        return parse_config(
            {
                "model": {"seed": seed, "local_epochs": 1},
                "edge": {"window_events": 200, "max_batch_records": 100, "hst_trees": 3},
            }
        )

    def test_same_seed_same_scores(self) -> None:
        """Two runs with the same config and seed give identical scores."""
        first = local_only_scores(self.values(), self.config(seed=7))
        second = local_only_scores(self.values(), self.config(seed=7))

        assert first.shape == (600,)
        np.testing.assert_array_equal(first, second)

    def test_other_seed_other_scores(self) -> None:
        """A different seed changes the scores, so the check above is not vacuous."""
        first = local_only_scores(self.values(), self.config(seed=7))
        other = local_only_scores(self.values(), self.config(seed=8))

        assert not np.array_equal(first, other)
