"""Strategy settings: validation, the secure-aggregation check and the factories."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fanomad_stream.errors import ConfigError
from fanomad_stream.federate.buffered import BufferedAsyncAggregator
from fanomad_stream.federate.robust import CoordinateMedian, NormBounding, TrimmedMean
from fanomad_stream.federate.server_optimizers import FedAdagrad, FedAdam, FedYogi
from fanomad_stream.federate.strategies import FedAvg, FedProx
from fanomad_stream.federate.strategy_settings import (
    SECURE_AGGREGATION,
    BufferedAsyncSettings,
    StrategySettings,
    check_strategy_compatible,
)

SUM_ONLY = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"]
NEEDS_EACH_UPDATE = ["median", "trimmed_mean"]


class TestSecureAggregationCheck:
    @pytest.mark.parametrize("name", SUM_ONLY + NEEDS_EACH_UPDATE)
    def test_all_strategies_without_secure_aggregation(self, name: str) -> None:
        """Without secure aggregation every strategy is accepted."""
        check_strategy_compatible(name, secure_aggregation=False)

    @pytest.mark.parametrize("name", SUM_ONLY)
    def test_sum_strategies_under_secure_aggregation(self, name: str) -> None:
        """Strategies that need only the weighted sum run under secure aggregation."""
        check_strategy_compatible(name, secure_aggregation=True)

    @pytest.mark.parametrize("name", NEEDS_EACH_UPDATE)
    def test_robust_strategies_rejected(self, name: str) -> None:
        """Median and trimmed mean under secure aggregation fail with a message naming them."""
        with pytest.raises(ConfigError, match=f"strategy '{name}' cannot run under secure"):
            check_strategy_compatible(name, secure_aggregation=True)

    def test_server_norm_bounding_rejected(self) -> None:
        """Server-side norm bounding under secure aggregation is rejected; client side passes."""
        with pytest.raises(ConfigError, match="norm_bound_side: client"):
            check_strategy_compatible("fedavg", True, norm_bound_side="server")
        check_strategy_compatible("fedavg", True, norm_bound_side="client")
        check_strategy_compatible("fedavg", False, norm_bound_side="server")

    def test_unknown_strategy_rejected(self) -> None:
        """An unknown name raises ConfigError listing the known ones."""
        with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
            check_strategy_compatible("fedsgd", secure_aggregation=False)

    def test_table_matches_strategy_objects(self) -> None:
        """The declared table agrees with what each built strategy reports."""
        for name, sum_only in SECURE_AGGREGATION.items():
            strategy = StrategySettings(name=name).build()  # type: ignore[arg-type]
            assert strategy.supports_secure_aggregation is sum_only, name


class TestStrategySettings:
    @pytest.mark.parametrize(
        ("raw", "expected_type"),
        [
            ({}, FedAvg),
            ({"name": "fedprox", "proximal_mu": 0.5}, FedProx),
            ({"name": "fedadam", "eta": 0.1}, FedAdam),
            ({"name": "fedyogi", "beta_2": 0.9}, FedYogi),
            ({"name": "fedadagrad", "tau": 0.01}, FedAdagrad),
            ({"name": "median"}, CoordinateMedian),
            ({"name": "trimmed_mean", "trim_fraction": 0.2}, TrimmedMean),
        ],
    )
    def test_build_each_strategy(self, raw: dict[str, Any], expected_type: type) -> None:
        """Each name builds its strategy class."""
        strategy = StrategySettings.model_validate(raw).build()
        assert type(strategy) is expected_type

    def test_hyperparameters_reach_strategy(self) -> None:
        """Configured values end up on the built strategy."""
        fedprox = StrategySettings(name="fedprox", proximal_mu=0.25).build()
        assert fedprox.configure_clients() == {"proximal_mu": 0.25}
        adam = StrategySettings(name="fedadam", eta=0.2, eta_l=0.05, beta_1=0.5, tau=0.1).build()
        assert isinstance(adam, FedAdam)
        assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.2, 0.5, 0.99, 0.1)
        assert adam.configure_clients() == {"learning_rate": 0.05}

    def test_beta_1_defaults_per_optimizer(self) -> None:
        """Unset beta_1 is 0.9 for FedAdam and FedYogi and 0 for FedAdagrad."""
        assert StrategySettings(name="fedyogi").build().beta_1 == 0.9  # type: ignore[attr-defined]
        assert StrategySettings(name="fedadagrad").build().beta_1 == 0.0  # type: ignore[attr-defined]

    def test_norm_bound_wraps_strategy(self) -> None:
        """max_update_norm wraps the strategy in NormBounding on the configured side."""
        server = StrategySettings(name="trimmed_mean", max_update_norm=2.0).build()
        assert isinstance(server, NormBounding)
        assert isinstance(server.inner, TrimmedMean)
        assert not server.client_side
        client = StrategySettings(max_update_norm=2.0, norm_bound_side="client").build()
        assert client.configure_clients() == {"max_update_norm": 2.0}

    @pytest.mark.parametrize(
        "raw",
        [
            {"name": "fedavg", "proximal_mu": 0.1},
            {"name": "fedprox", "eta": 0.1},
            {"name": "fedadagrad", "beta_2": 0.9},
            {"name": "median", "trim_fraction": 0.1},
        ],
    )
    def test_foreign_hyperparameter_rejected(self, raw: dict[str, Any]) -> None:
        """A hyperparameter the chosen strategy does not read is an error, not ignored."""
        with pytest.raises(ValidationError, match="does not use"):
            StrategySettings.model_validate(raw)

    @pytest.mark.parametrize(
        "raw",
        [
            {"name": "fedsgd"},
            {"typo_key": 1},
            {"name": "fedprox", "proximal_mu": -0.1},
            {"name": "fedadam", "beta_1": 1.0},
            {"name": "fedadam", "tau": 0.0},
            {"name": "fedadam", "eta": float("nan")},
            {"name": "trimmed_mean", "trim_fraction": 0.5},
            {"max_update_norm": 0.0},
            {"norm_bound_side": "client"},
            {"server_learning_rate": float("inf")},
        ],
    )
    def test_invalid_settings_rejected(self, raw: dict[str, Any]) -> None:
        """Unknown names and keys and values outside their range fail validation."""
        with pytest.raises(ValidationError):
            StrategySettings.model_validate(raw)

    def test_check_secure_aggregation_method(self) -> None:
        """The settings check covers both the strategy and the side of norm bounding."""
        StrategySettings(name="fedyogi").check_secure_aggregation(True)
        with pytest.raises(ConfigError, match="median"):
            StrategySettings(name="median").check_secure_aggregation(True)
        with pytest.raises(ConfigError, match="norm bounding"):
            StrategySettings(max_update_norm=1.0).check_secure_aggregation(True)


class TestBufferedAsyncSettings:
    def test_build_aggregator(self) -> None:
        """The settings build an aggregator with their buffer size, staleness and version."""
        settings = BufferedAsyncSettings(buffer_size=2, max_staleness=3, staleness="hinge")
        start = {"w": np.zeros(2, dtype=np.float32)}
        aggregator = settings.build(FedAvg(), start, version=5)
        assert isinstance(aggregator, BufferedAsyncAggregator)
        assert (aggregator.buffer_size, aggregator.max_staleness, aggregator.version) == (2, 3, 5)
        assert aggregator.staleness.kind == "hinge"

    @pytest.mark.parametrize(
        "raw",
        [{"buffer_size": 0}, {"max_staleness": -1}, {"staleness": "cubic"}, {"extra": 1}],
    )
    def test_invalid_async_settings_rejected(self, raw: dict[str, Any]) -> None:
        """Out-of-range or unknown asynchronous settings fail validation."""
        with pytest.raises(ValidationError):
            BufferedAsyncSettings.model_validate(raw)
