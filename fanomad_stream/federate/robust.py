"""Robust aggregation: coordinate-wise median, trimmed mean and norm bounding.

Median and trimmed mean need every value of a coordinate at once, so they buffer the round's
deltas and cannot run under secure aggregation. Norm bounding is a wrapper around any strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fanomad_stream.federate.aggregate import (
    Weights,
    check_update,
    clip_by_norm,
    coordinate_median,
    trimmed_mean,
)
from fanomad_stream.federate.strategies import RoundStrategy, Strategy, StrategyWrapper


class _BufferedStrategy(RoundStrategy):
    """A strategy that keeps every delta of the round, because its statistic needs them all.

    Memory grows with the number of updates in the round: one model copy per update. Updates
    with ``n_samples == 0`` carry no data, so they are validated and counted but not kept.
    """

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self._deltas: list[Weights] = []
        self._count = 0

    @property
    def streaming(self) -> bool:
        return False

    @property
    def supports_secure_aggregation(self) -> bool:
        return False

    @property
    def folded(self) -> int:
        return self._count if self._open else 0

    def _reset(self, template: Weights) -> None:
        self._deltas = []
        self._count = 0

    def _accumulate(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        self._count += 1
        if n_samples > 0:
            self._deltas.append(
                {name: np.array(array, dtype=np.float32) for name, array in delta.items()}
            )

    def _save(self) -> dict[str, Any]:
        return {"deltas": list(self._deltas), "count": self._count}

    def _load(self, state: Mapping[str, Any]) -> None:
        self._deltas = [
            {name: np.array(array, dtype=np.float32) for name, array in delta.items()}
            for delta in state["deltas"]
        ]
        self._count = int(state["count"])


class CoordinateMedian(_BufferedStrategy):
    """Coordinate-wise median of the round's deltas; buffers every delta of the round."""

    name = "median"

    def aggregate_deltas(self) -> Weights:
        self._require_open("aggregate")
        return coordinate_median(self._deltas)


class TrimmedMean(_BufferedStrategy):
    """Coordinate-wise trimmed mean of the round's deltas; buffers every delta of the round.

    Parameters
    ----------
    trim_fraction
        Fraction beta of the updates dropped at each end of every coordinate, in [0, 0.5).
        With n updates, ``floor(beta * n)`` are dropped at each end.
    server_learning_rate
        As for FedAvg.
    """

    name = "trimmed_mean"

    def __init__(self, *, trim_fraction: float, server_learning_rate: float = 1.0) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            msg = f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}"
            raise ValueError(msg)
        super().__init__(server_learning_rate=server_learning_rate)
        self.trim_fraction = trim_fraction

    def aggregate_deltas(self) -> Weights:
        self._require_open("aggregate")
        return trimmed_mean(self._deltas, self.trim_fraction)


class NormBounding(StrategyWrapper):
    """Scale every delta down to L2 norm ``max_norm`` before the inner strategy folds it.

    Bounding the norm limits how far one client can move the global model. With
    ``client_side=True`` the server does not clip. Instead clients clip with
    ``aggregate.clip_by_norm`` and read ``max_update_norm`` from ``configure_clients``. Only
    that form runs under secure aggregation, because there the server receives no single
    client's delta.

    Parameters
    ----------
    inner
        The strategy that combines the bounded deltas.
    max_norm
        Maximum L2 norm of one client's delta, over all parameters flattened together, in the
        units of the model parameters. Must be > 0.
    client_side
        True to leave clipping to the clients.
    """

    def __init__(self, inner: Strategy, *, max_norm: float, client_side: bool = False) -> None:
        if not max_norm > 0 or not math.isfinite(max_norm):
            msg = f"max_norm must be a finite number > 0, got {max_norm!r}"
            raise ValueError(msg)
        super().__init__(inner)
        self.max_norm = max_norm
        self.client_side = client_side
        self.clipped = 0

    @property
    def supports_secure_aggregation(self) -> bool:
        return self.client_side and self.inner.supports_secure_aggregation

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        super().begin_round(global_weights)
        self.clipped = 0

    def fold(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        if self.client_side:
            self.inner.fold(delta, n_samples)
            return
        # Validate before the norm is taken, so a malformed delta is rejected with its reason.
        check_update(delta, n_samples, self.inner.global_weights)
        bounded, norm = clip_by_norm(delta, self.max_norm)
        self.inner.fold(bounded, n_samples)
        self.clipped += int(norm > self.max_norm)

    def configure_clients(self) -> dict[str, float]:
        settings = self.inner.configure_clients()
        if self.client_side:
            settings["max_update_norm"] = self.max_norm
        return settings

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "clipped": self.clipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.clipped = int(state["clipped"])
