"""Checks every configured strategy must pass, whatever its arithmetic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fanomad_stream.errors import RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.strategies import Strategy
from fanomad_stream.federate.strategy_settings import StrategySettings

StateRoundTrip = Callable[[dict[str, Any]], dict[str, Any]]

CONFIGS: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedavg_eta_half": {"name": "fedavg", "server_learning_rate": 0.5},
    "fedprox": {"name": "fedprox", "proximal_mu": 0.1},
    "fedadam": {"name": "fedadam", "eta": 0.1},
    "fedyogi": {"name": "fedyogi", "eta": 0.1},
    "fedadagrad": {"name": "fedadagrad", "eta": 0.1},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "trim_fraction": 0.25},
    "fedavg+norm": {"name": "fedavg", "max_update_norm": 0.5},
    "median+norm": {"name": "median", "max_update_norm": 0.5},
    "fedavg+client_norm": {"max_update_norm": 0.5, "norm_bound_side": "client"},
}
# Strategies whose result is the sample-weighted mean of the deltas added to the start.
WEIGHTED_MEAN = ["fedavg", "fedprox", "fedavg+client_norm"]


def _build(config_id: str) -> Strategy:
    return StrategySettings.model_validate(CONFIGS[config_id]).build()


def _rounds_of_updates(seed: int, rounds: int, clients: int) -> list[list[tuple[Weights, float]]]:
    rng = np.random.default_rng(seed)
    return [
        [
            (
                {
                    "dense.weight": rng.normal(size=(3, 2)).astype(np.float32),
                    "dense.bias": rng.normal(size=3).astype(np.float32),
                },
                float(rng.integers(1, 100)),
            )
            for _ in range(clients)
        ]
        for _ in range(rounds)
    ]


START: Weights = {
    "dense.weight": np.arange(6, dtype=np.float32).reshape(3, 2) / 4,
    "dense.bias": np.array([0.5, -0.5, 1.0], dtype=np.float32),
}


def _run(
    strategy: Strategy, rounds: list[list[tuple[Weights, float]]], start: Weights = START
) -> Weights:
    weights = start
    for updates in rounds:
        strategy.begin_round(weights)
        for delta, n_samples in updates:
            strategy.fold(delta, n_samples)
        weights = strategy.finish_round()
    return weights


@pytest.fixture(params=sorted(CONFIGS))
def config_id(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def test_rejects_inconsistent_update(config_id: str) -> None:
    """A delta with a wrong shape is rejected with its reason and not counted."""
    strategy = _build(config_id)
    strategy.begin_round(START)
    bad = {"dense.weight": np.zeros((2, 3), np.float32), "dense.bias": np.zeros(3, np.float32)}
    with pytest.raises(UpdateRejectedError) as caught:
        strategy.fold(bad, 1.0)
    assert caught.value.reason == "shape_mismatch"
    assert strategy.folded == 0


def test_phases_out_of_order_raise(config_id: str) -> None:
    """Folding before begin_round and finishing a closed round raise RoundError."""
    strategy = _build(config_id)
    updates = _rounds_of_updates(seed=1, rounds=1, clients=2)
    with pytest.raises(RoundError):
        strategy.fold(*updates[0][0])
    _run(strategy, updates)
    with pytest.raises(RoundError):
        strategy.finish_round()


def test_fold_order_changes_rounding_only(config_id: str) -> None:
    """Folding the same updates in reverse order gives the same model up to float rounding."""
    updates = _rounds_of_updates(seed=2, rounds=2, clients=5)
    forward = _run(_build(config_id), updates)
    backward = _run(_build(config_id), [list(reversed(round_)) for round_ in updates])
    for name in START:
        np.testing.assert_allclose(backward[name], forward[name], rtol=1e-5, atol=1e-6)


def test_restore_mid_round_is_bitwise(config_id: str, through_msgpack: StateRoundTrip) -> None:
    """Saved in the middle of round 2 and restored, a strategy ends bitwise as uninterrupted."""
    updates = _rounds_of_updates(seed=3, rounds=3, clients=4)
    expected = _run(_build(config_id), updates)

    first = _build(config_id)
    weights = _run(first, updates[:1])
    first.begin_round(weights)
    for delta, n_samples in updates[1][:2]:
        first.fold(delta, n_samples)
    restored = _build(config_id)
    restored.load_state_dict(through_msgpack(first.state_dict()))
    assert restored.folded == 2
    for delta, n_samples in updates[1][2:]:
        restored.fold(delta, n_samples)
    result = _run(restored, updates[2:], start=restored.finish_round())
    for name in START:
        np.testing.assert_array_equal(result[name], expected[name])


@pytest.mark.parametrize("weighted_id", WEIGHTED_MEAN)
def test_weighted_mean_matches_numpy(weighted_id: str) -> None:
    """Weighted-mean strategies equal the start plus np.average of the deltas."""
    updates = _rounds_of_updates(seed=4, rounds=1, clients=6)
    result = _run(_build(weighted_id), updates)
    samples = [n_samples for _, n_samples in updates[0]]
    for name in START:
        stacked = np.stack([delta[name] for delta, _ in updates[0]]).astype(np.float64)
        expected = START[name] + np.average(stacked, axis=0, weights=samples).astype(np.float32)
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)
