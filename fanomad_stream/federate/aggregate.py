"""Pure aggregation arithmetic: weights in, weights out, no I/O.

Model weights are maps of parameter name to float32 array (``Weights``). Updates carry the
delta against the global weights they started from, so the new global model is
``global + weighted mean of deltas``. Every function here computes in float64 and returns
float32, so the order of the inputs changes a result by rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fanomad_stream.errors import RoundError, UpdateRejectedError

Weights = dict[str, np.ndarray]


class WeightedSum:
    """Streaming weighted sum of deltas: memory is one model, whatever the client count.

    Sums are kept in float64 so the fold order changes the result by rounding only.
    """

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._sum = {
            name: np.zeros(array.shape, dtype=np.float64) for name, array in template.items()
        }
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
        return {
            name: (total / self.total_weight).astype(np.float32)
            for name, total in self._sum.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the running sum as a msgpack-friendly map (float64 arrays, numbers)."""
        return {
            "sum": {name: total.copy() for name, total in self._sum.items()},
            "total_weight": self.total_weight,
            "count": self.count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict``; arrays are copied, so read-only input is fine."""
        sums = state["sum"]
        if set(sums) != set(self._sum):
            msg = (
                f"saved sum has parameters {sorted(sums)}, the model has {sorted(self._sum)}; "
                "the checkpoint belongs to another model"
            )
            raise ValueError(msg)
        self._sum = {name: np.array(sums[name], dtype=np.float64) for name in self._sum}
        self.total_weight = float(state["total_weight"])
        self.count = int(state["count"])


def fedavg(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]], template: Mapping[str, np.ndarray]
) -> Weights:
    """Return the FedAvg mean of ``(delta, n_samples)`` pairs (McMahan et al., 2017)."""
    total = WeightedSum(template)
    for delta, weight in updates:
        total.add(delta, weight)
    return total.mean()


def apply_delta(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Weights:
    """Return ``weights + delta`` as float32 arrays."""
    return {name: (weights[name] + delta[name]).astype(np.float32) for name in weights}


def check_update(
    delta: Mapping[str, np.ndarray], n_samples: float, template: Mapping[str, np.ndarray]
) -> None:
    """Raise UpdateRejectedError unless ``delta`` fits ``template`` and ``n_samples`` is valid.

    Runs before any arithmetic, so a rejected update leaves every sum untouched. The error's
    ``reason`` is one of ``invalid_weight``, ``missing_parameter``, ``unknown_parameter``,
    ``shape_mismatch`` or ``non_finite``.
    """
    if isinstance(n_samples, bool) or not math.isfinite(n_samples) or n_samples < 0:
        msg = f"update weight n_samples must be a finite number >= 0, got {n_samples!r}"
        raise UpdateRejectedError("invalid_weight", msg)
    missing = sorted(set(template) - set(delta))
    if missing:
        msg = f"update lacks parameters {missing}; send a delta for every model parameter"
        raise UpdateRejectedError("missing_parameter", msg)
    unknown = sorted(set(delta) - set(template))
    if unknown:
        msg = f"update has parameters {unknown} that the global model does not have"
        raise UpdateRejectedError("unknown_parameter", msg)
    for name, expected in template.items():
        array = np.asarray(delta[name])
        if array.shape != expected.shape:
            msg = f"parameter {name!r} has shape {array.shape}, the model needs {expected.shape}"
            raise UpdateRejectedError("shape_mismatch", msg)
        if not np.isfinite(array).all():
            msg = f"parameter {name!r} of the update contains NaN or infinite values"
            raise UpdateRejectedError("non_finite", msg)


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of all parameters of ``delta`` flattened together."""
    squares = sum(
        float(np.sum(np.square(np.asarray(array, dtype=np.float64)))) for array in delta.values()
    )
    return math.sqrt(squares)


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[Weights, float]:
    """Scale ``delta`` down to L2 norm ``max_norm`` if it is longer; return it and its old norm.

    The norm is taken over all parameters flattened together. A delta within the bound,
    including an all-zero one, comes back unscaled as float32.

    Parameters
    ----------
    delta
        The update to bound.
    max_norm
        Maximum L2 norm, in the units of the model parameters. Must be > 0.
    """
    if not max_norm > 0 or not math.isfinite(max_norm):
        msg = f"max_norm must be a finite number > 0, got {max_norm!r}"
        raise ValueError(msg)
    norm = l2_norm(delta)
    if norm <= max_norm:
        return {
            name: np.asarray(array, dtype=np.float32).copy() for name, array in delta.items()
        }, norm
    scale = max_norm / norm
    clipped = {
        name: (np.asarray(array, dtype=np.float64) * scale).astype(np.float32)
        for name, array in delta.items()
    }
    return clipped, norm


def _stack(deltas: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(delta[name], dtype=np.float64) for delta in deltas])


def _require_updates(deltas: Sequence[Mapping[str, np.ndarray]], statistic: str) -> None:
    if not deltas:
        msg = f"{statistic} of zero updates is undefined, so the global model stays as it was"
        raise RoundError(msg)


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Weights:
    """Return the coordinate-wise median of ``deltas``.

    Sample counts play no part: each client is one vote per coordinate. With an even count the
    median of a coordinate is the mean of its two middle values.
    """
    _require_updates(deltas, "the coordinate-wise median")
    return {name: np.median(_stack(deltas, name), axis=0).astype(np.float32) for name in deltas[0]}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Weights:
    """Return the coordinate-wise trimmed mean of ``deltas``.

    For each coordinate, the ``floor(trim_fraction * n)`` largest and as many smallest values
    of the ``n`` updates are dropped and the rest averaged without sample weights.

    Parameters
    ----------
    deltas
        The round's updates, all with the same parameters and shapes.
    trim_fraction
        Fraction beta of the updates dropped at each end, in [0, 0.5). 0 gives the plain mean.
    """
    if not 0.0 <= trim_fraction < 0.5:
        msg = f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}"
        raise ValueError(msg)
    _require_updates(deltas, "the trimmed mean")
    count = len(deltas)
    trimmed = math.floor(trim_fraction * count)
    result = {}
    for name in deltas[0]:
        ordered = np.sort(_stack(deltas, name), axis=0)
        result[name] = ordered[trimmed : count - trimmed].mean(axis=0).astype(np.float32)
    return result
