"""Pure aggregation arithmetic: weights in, weights out, no I/O.

Model weights are maps of parameter name to float32 array (``Weights``). Updates carry the
delta against the global weights they started from, so the new global model is
``global + weighted mean of deltas``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fanomad_stream.errors import RoundError

Weights = dict[str, np.ndarray]


class WeightedSum:
    """Streaming weighted sum of deltas: memory is one model, whatever the client count.

    Sums are kept in float64 so the fold order changes the result by rounding only.
    """

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._sum = {name: np.zeros(array.shape, dtype=np.float64) for name, array in template.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one delta with weight ``weight`` (>= 0, typically its sample count)."""
        if weight < 0 or not np.isfinite(weight):
            msg = f"update weight must be a finite number >= 0, got {weight!r}"
            raise ValueError(msg)
        for name, total in self._sum.items():
            total += weight * np.asarray(delta[name], dtype=np.float64)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> Weights:
        """Return the weighted mean delta; raise RoundError when the total weight is zero."""
        if self.total_weight <= 0:
            msg = (
                f"round has total weight {self.total_weight!r} over {self.count} updates; a "
                "weighted mean is undefined, so the global model stays as it was"
            )
            raise RoundError(msg)
        return {name: (total / self.total_weight).astype(np.float32) for name, total in self._sum.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], float]], template: Mapping[str, np.ndarray]) -> Weights:
    """Return the FedAvg mean of ``(delta, n_samples)`` pairs (McMahan et al., 2017)."""
    total = WeightedSum(template)
    for delta, weight in updates:
        total.add(delta, weight)
    return total.mean()


def apply_delta(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Weights:
    """Return ``weights + delta`` as float32 arrays."""
    return {name: (weights[name] + delta[name]).astype(np.float32) for name in weights}
