"""Strategy and asynchronous-mode settings, the secure-aggregation table and the factories.

Under secure aggregation the aggregator learns only the sum of the masked client updates,
so a strategy can run there only if the weighted sum of the deltas is all it needs:

==================  =======================  ===============================================
strategy            secure aggregation        why
==================  =======================  ===============================================
fedavg, fedprox     yes                      weighted mean = sum / total weight
fedadam, fedyogi,   yes                      the server optimizer acts on the mean only
fedadagrad
median              no                       needs every client's value of a coordinate
trimmed_mean        no                       needs every client's value of a coordinate
norm bounding       client side only         server-side clipping needs each client's delta
==================  =======================  ===============================================

Under secure aggregation, fold the unmasked sum once: ``strategy.fold(weighted_sum /
total_weight, total_weight)`` gives the same mean as folding each client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fanomad_stream.errors import ConfigError
from fanomad_stream.federate.buffered import BufferedAsyncAggregator, StalenessFunction
from fanomad_stream.federate.robust import CoordinateMedian, NormBounding, TrimmedMean
from fanomad_stream.federate.server_optimizers import FedAdagrad, FedAdam, FedYogi
from fanomad_stream.federate.strategies import FedAvg, FedProx, Strategy

StrategyName = Literal[
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean"
]
NormBoundSide = Literal["server", "client"]

# Whether each strategy needs only the weighted sum of the deltas (see the module docstring).
SECURE_AGGREGATION: dict[str, bool] = {
    "fedavg": True,
    "fedprox": True,
    "fedadam": True,
    "fedyogi": True,
    "fedadagrad": True,
    "median": False,
    "trimmed_mean": False,
}

# The hyperparameters each strategy reads; setting any other one is a configuration error.
_HYPERPARAMETERS: dict[str, frozenset[str]] = {
    "fedavg": frozenset({"server_learning_rate"}),
    "fedprox": frozenset({"server_learning_rate", "proximal_mu"}),
    "fedadam": frozenset({"eta", "eta_l", "beta_1", "beta_2", "tau"}),
    "fedyogi": frozenset({"eta", "eta_l", "beta_1", "beta_2", "tau"}),
    "fedadagrad": frozenset({"eta", "eta_l", "beta_1", "tau"}),
    "median": frozenset({"server_learning_rate"}),
    "trimmed_mean": frozenset({"server_learning_rate", "trim_fraction"}),
}
_SHARED = frozenset({"name", "max_update_norm", "norm_bound_side"})


def check_strategy_compatible(
    strategy_name: str,
    secure_aggregation: bool,
    *,
    norm_bound_side: NormBoundSide | None = None,
) -> None:
    """Raise ConfigError if ``strategy_name`` cannot run with the given secure-aggregation flag.

    Parameters
    ----------
    strategy_name
        One of the keys of ``SECURE_AGGREGATION``.
    secure_aggregation
        True when the aggregator will see only the sum of the client updates.
    norm_bound_side
        Where deltas are clipped when norm bounding is on, or None when it is off.
    """
    if strategy_name not in SECURE_AGGREGATION:
        msg = f"unknown strategy {strategy_name!r}; known strategies: {sorted(SECURE_AGGREGATION)}"
        raise ConfigError(msg)
    if not secure_aggregation:
        return
    if not SECURE_AGGREGATION[strategy_name]:
        sum_only = sorted(name for name, ok in SECURE_AGGREGATION.items() if ok)
        msg = (
            f"strategy {strategy_name!r} cannot run under secure aggregation: it needs each "
            "client's update, and the aggregator sees only their sum. Use one of "
            f"{sum_only}, or turn secure aggregation off"
        )
        raise ConfigError(msg)
    if norm_bound_side == "server":
        msg = (
            "server-side norm bounding cannot run under secure aggregation: the aggregator "
            "never sees a single client's update to clip. Set norm_bound_side: client"
        )
        raise ConfigError(msg)


class StrategySettings(BaseModel):
    """The federation strategy and its hyperparameters, as read from the config file.

    Only the hyperparameters of the chosen ``name`` may be set. Any other one is rejected, so
    a ``proximal_mu`` left over from a FedProx run does not silently stop mattering.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: StrategyName = "fedavg"
    # Factor on the combined delta before it is added (FedAvg, FedProx, median, trimmed mean).
    server_learning_rate: float = Field(default=1.0, gt=0.0)
    # FedProx proximal weight mu: clients add mu/2 * ||w - w_global||² to their loss.
    proximal_mu: float = Field(default=0.01, ge=0.0)
    # Server optimizers: server and client learning rates, moment decays, adaptivity.
    eta: float = Field(default=1e-2, gt=0.0)
    eta_l: float | None = Field(default=None, gt=0.0)
    beta_1: float | None = Field(default=None, ge=0.0, lt=1.0)  # None: 0.9, FedAdagrad 0
    beta_2: float = Field(default=0.99, ge=0.0, lt=1.0)
    tau: float = Field(default=1e-3, gt=0.0)
    # Trimmed mean: fraction of updates dropped at each end of every coordinate.
    trim_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    # Norm bounding: maximum L2 norm of one client's delta, None for no bound.
    max_update_norm: float | None = Field(default=None, gt=0.0)
    norm_bound_side: NormBoundSide = "server"

    @model_validator(mode="after")
    def _only_own_hyperparameters(self) -> StrategySettings:
        foreign = sorted(self.model_fields_set - _HYPERPARAMETERS[self.name] - _SHARED)
        if foreign:
            msg = (
                f"strategy {self.name!r} does not use {foreign}; remove them or pick a strategy "
                f"that does. {self.name!r} reads {sorted(_HYPERPARAMETERS[self.name])}"
            )
            raise ValueError(msg)
        if "norm_bound_side" in self.model_fields_set and self.max_update_norm is None:
            msg = "norm_bound_side is set but max_update_norm is not; set both or neither"
            raise ValueError(msg)
        return self

    def check_secure_aggregation(self, secure_aggregation: bool) -> None:
        """Raise ConfigError if these settings cannot run with ``secure_aggregation``."""
        side = None if self.max_update_norm is None else self.norm_bound_side
        check_strategy_compatible(self.name, secure_aggregation, norm_bound_side=side)

    def build(self) -> Strategy:
        """Return a new strategy for these settings, with its server state at round 0."""
        strategy = self._build_core()
        if self.max_update_norm is not None:
            strategy = NormBounding(
                strategy,
                max_norm=self.max_update_norm,
                client_side=self.norm_bound_side == "client",
            )
        return strategy

    def _build_core(self) -> Strategy:
        rate = self.server_learning_rate
        if self.name == "fedavg":
            return FedAvg(server_learning_rate=rate)
        if self.name == "fedprox":
            return FedProx(proximal_mu=self.proximal_mu, server_learning_rate=rate)
        if self.name == "median":
            return CoordinateMedian(server_learning_rate=rate)
        if self.name == "trimmed_mean":
            return TrimmedMean(trim_fraction=self.trim_fraction, server_learning_rate=rate)
        if self.name == "fedadagrad":
            beta_1 = 0.0 if self.beta_1 is None else self.beta_1
            return FedAdagrad(eta=self.eta, eta_l=self.eta_l, beta_1=beta_1, tau=self.tau)
        optimizer = FedAdam if self.name == "fedadam" else FedYogi
        return optimizer(
            eta=self.eta,
            eta_l=self.eta_l,
            beta_1=0.9 if self.beta_1 is None else self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
        )


class BufferedAsyncSettings(BaseModel):
    """Buffered asynchronous mode (FedBuff): apply every ``buffer_size`` accepted updates."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    buffer_size: int = Field(default=4, ge=1)
    max_staleness: int = Field(default=8, ge=0)
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    # Polynomial exponent or hinge slope. With the polynomial, 0.5 gives 1 / sqrt(1 + staleness).
    staleness_a: float = Field(default=0.5, ge=0.0)
    # Staleness up to which the hinge keeps weight 1.
    staleness_b: int = Field(default=4, ge=0)
    weight_by_samples: bool = True

    def build(
        self, strategy: Strategy, global_weights: Mapping[str, np.ndarray], *, version: int = 0
    ) -> BufferedAsyncAggregator:
        """Return an aggregator over ``strategy`` starting at ``global_weights``."""
        return BufferedAsyncAggregator(
            strategy,
            global_weights,
            buffer_size=self.buffer_size,
            max_staleness=self.max_staleness,
            staleness=StalenessFunction(self.staleness, self.staleness_a, self.staleness_b),
            weight_by_samples=self.weight_by_samples,
            version=version,
        )
