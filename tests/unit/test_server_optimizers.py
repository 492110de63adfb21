"""Adaptive server optimizers: moments and steps against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fanomad_stream.federate.robust import CoordinateMedian
from fanomad_stream.federate.server_optimizers import (
    FedAdagrad,
    FedAdam,
    FedYogi,
    ServerOptimizer,
    adagrad_second_moment,
    adam_second_moment,
    adaptive_step,
    first_moment,
    yogi_second_moment,
)

StateRoundTrip = Callable[[dict[str, Any]], dict[str, Any]]


def _vector(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


START = _vector(1.0, -1.0)


class OneClientRounds:
    """Runs successive rounds from START with one client each, so g is that client's delta."""

    def __init__(self, optimizer: ServerOptimizer) -> None:
        self.optimizer = optimizer
        self.weights = START

    def step(self, delta: dict[str, np.ndarray]) -> np.ndarray:
        self.optimizer.begin_round(self.weights)
        self.optimizer.fold(delta, 10.0)
        self.weights = self.optimizer.finish_round()
        return self.weights["w"]


class TestMomentFunctions:
    def test_first_moment(self) -> None:
        """m = beta_1 * m + (1 - beta_1) * g."""
        result = first_moment(np.array([1.0, -2.0]), np.array([3.0, 4.0]), 0.75)
        np.testing.assert_array_equal(result, [0.75 + 0.75, -1.5 + 1.0])

    def test_adagrad_second_moment(self) -> None:
        """v = v + g²."""
        result = adagrad_second_moment(np.array([0.5, 1.0]), np.array([2.0, -3.0]))
        np.testing.assert_array_equal(result, [4.5, 10.0])

    def test_adam_second_moment(self) -> None:
        """v = beta_2 * v + (1 - beta_2) * g²."""
        result = adam_second_moment(np.array([1.0, 4.0]), np.array([2.0, -2.0]), 0.5)
        np.testing.assert_array_equal(result, [2.5, 4.0])

    def test_yogi_second_moment_sign(self) -> None:
        """Yogi grows v where g² > v and shrinks it where g² < v, by (1 - beta_2) * g²."""
        result = yogi_second_moment(np.array([1.0, 16.0]), np.array([2.0, -2.0]), 0.5)
        # Coordinate 0: g² = 4 > 1, v = 1 + 0.5 * 4. Coordinate 1: g² = 4 < 16, v = 16 - 2.
        np.testing.assert_array_equal(result, [3.0, 14.0])

    def test_adaptive_step(self) -> None:
        """step = eta * m / (sqrt(v) + tau)."""
        result = adaptive_step(np.array([1.2, -0.6]), np.array([1.69, 0.25]), 0.9, 0.5)
        np.testing.assert_allclose(result, [0.9 * 1.2 / 1.8, 0.9 * -0.6 / 1.0], rtol=1e-15)


class TestOptimizerRounds:
    def test_fedadagrad_two_rounds(self) -> None:
        """FedAdagrad sums squared pseudo-gradients from v = tau² and steps eta*m/(sqrt(v)+tau)."""
        optimizer = FedAdagrad(eta=0.9, beta_1=0.0, tau=0.5)
        rounds = OneClientRounds(optimizer)
        g1 = np.array([1.25, -0.5])
        first = rounds.step(_vector(*g1))
        # v1 = 0.25 + g1²; m1 = g1 because beta_1 = 0.
        v1 = np.array([0.25 + 1.5625, 0.25 + 0.25])
        np.testing.assert_allclose(optimizer.state_dict()["v"]["w"], v1, rtol=1e-15)
        x1 = np.array([1.0, -1.0]) + 0.9 * g1 / (np.sqrt(v1) + 0.5)
        np.testing.assert_allclose(first, x1, rtol=1e-6)

        g2 = np.array([0.5, 0.5])
        second = rounds.step(_vector(*g2))
        v2 = v1 + np.array([0.25, 0.25])
        x2 = first.astype(np.float64) + 0.9 * g2 / (np.sqrt(v2) + 0.5)
        np.testing.assert_allclose(second, x2, rtol=1e-6)

    def test_fedadagrad_clean_numbers(self) -> None:
        """With v = 0.25 + 1.44 = 1.3², eta 0.9 and g 1.2 the step is 0.9 * 1.2 / 1.8 = 0.6."""
        optimizer = FedAdagrad(eta=0.9, beta_1=0.0, tau=0.5)
        result = OneClientRounds(optimizer).step(_vector(1.2, 0.0))
        np.testing.assert_allclose(result, [1.6, -1.0], rtol=1e-6)

    def test_fedadam_two_rounds(self) -> None:
        """FedAdam keeps exponential moments without bias correction."""
        optimizer = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=0.01)
        rounds = OneClientRounds(optimizer)
        first = rounds.step(_vector(0.5, -0.25))
        # m1 = 0.1 * g1; v1 = 0.99 * 0.01² + 0.01 * g1².
        m1 = np.array([0.05, -0.025])
        v1 = np.array([0.000099 + 0.0025, 0.000099 + 0.000625])
        state = optimizer.state_dict()
        np.testing.assert_allclose(state["m"]["w"], m1, rtol=1e-12)
        np.testing.assert_allclose(state["v"]["w"], v1, rtol=1e-12)
        x1 = np.array([1.0, -1.0]) + 0.1 * m1 / (np.sqrt(v1) + 0.01)
        np.testing.assert_allclose(first, x1, rtol=1e-6)

        second = rounds.step(_vector(-0.5, 0.125))
        m2 = 0.9 * m1 + 0.1 * np.array([-0.5, 0.125])
        v2 = 0.99 * v1 + 0.01 * np.array([0.25, 0.015625])
        x2 = first.astype(np.float64) + 0.1 * m2 / (np.sqrt(v2) + 0.01)
        np.testing.assert_allclose(second, x2, rtol=1e-6)
        assert optimizer.rounds == 2

    def test_fedyogi_second_moment_moves_additively(self) -> None:
        """FedYogi raises v by (1 - beta_2) g² when g² > v and lowers it when g² < v."""
        optimizer = FedYogi(eta=0.5, beta_1=0.5, beta_2=0.5, tau=0.5)
        rounds = OneClientRounds(optimizer)
        first = rounds.step(_vector(1.5, 0.0))
        # v0 = 0.25 < g² = 2.25, so v1 = 0.25 + 0.5 * 2.25; m1 = 0.5 * 1.5.
        np.testing.assert_allclose(optimizer.state_dict()["v"]["w"], [1.375, 0.25], rtol=1e-15)
        np.testing.assert_allclose(first, [1.0 + 0.5 * 0.75 / (math.sqrt(1.375) + 0.5), -1.0])

        rounds.step(_vector(0.5, 0.0))
        # g² = 0.25 < v1 = 1.375, so v2 = 1.375 - 0.5 * 0.25. Coordinate 1 stays at 0.25,
        # because sign(0.25 - 0) = 1 and g² = 0 there.
        np.testing.assert_allclose(optimizer.state_dict()["v"]["w"], [1.25, 0.25], rtol=1e-15)

    def test_fedadam_differs_from_fedyogi(self) -> None:
        """On the same rounds FedAdam and FedYogi keep different second moments."""
        adam = FedAdam(eta=0.5, beta_1=0.5, beta_2=0.5, tau=0.5)
        yogi = FedYogi(eta=0.5, beta_1=0.5, beta_2=0.5, tau=0.5)
        for optimizer in (adam, yogi):
            OneClientRounds(optimizer).step(_vector(1.5, 0.0))
        # Adam: 0.5 * 0.25 + 0.5 * 2.25 = 1.25; Yogi: 1.375 as above.
        np.testing.assert_allclose(adam.state_dict()["v"]["w"][0], 1.25, rtol=1e-15)
        np.testing.assert_allclose(yogi.state_dict()["v"]["w"][0], 1.375, rtol=1e-15)

    def test_optimizer_over_median(self) -> None:
        """The pseudo-gradient comes from the inner strategy, here the coordinate median."""
        optimizer = FedAdagrad(CoordinateMedian(), eta=0.9, beta_1=0.0, tau=0.5)
        optimizer.begin_round(START)
        for value in (1.2, 50.0, -3.0):
            optimizer.fold(_vector(value, 0.0), 1.0)
        np.testing.assert_allclose(optimizer.finish_round()["w"], [1.6, -1.0], rtol=1e-6)

    def test_restored_optimizer_continues(self, through_msgpack: StateRoundTrip) -> None:
        """Moments saved after a round and restored give the uninterrupted third round exactly."""
        deltas = [_vector(0.5, -0.25), _vector(-0.5, 0.125), _vector(0.25, 0.25)]
        uninterrupted = OneClientRounds(FedYogi(eta=0.1, tau=0.01))
        for delta in deltas:
            expected = uninterrupted.step(delta)

        first = OneClientRounds(FedYogi(eta=0.1, tau=0.01))
        first.step(deltas[0])
        restored = OneClientRounds(FedYogi(eta=0.1, tau=0.01))
        restored.optimizer.load_state_dict(through_msgpack(first.optimizer.state_dict()))
        restored.weights = first.weights
        for delta in deltas[1:]:
            result = restored.step(delta)
        assert restored.optimizer.rounds == 3
        np.testing.assert_array_equal(result, expected)

    def test_eta_l_sent_to_clients(self) -> None:
        """The client learning rate travels through configure_clients when set."""
        assert FedAdam(eta_l=0.05).configure_clients() == {"learning_rate": 0.05}
        assert FedAdam().configure_clients() == {}

    @pytest.mark.parametrize(
        ("kwargs", "name"),
        [
            ({"eta": 0.0}, "eta"),
            ({"eta_l": -1.0}, "eta_l"),
            ({"beta_1": 1.0}, "beta_1"),
            ({"beta_2": -0.1}, "beta_2"),
            ({"tau": 0.0}, "tau"),
            ({"tau": math.nan}, "tau"),
        ],
    )
    def test_invalid_hyperparameter_rejected(self, kwargs: dict[str, Any], name: str) -> None:
        """Each hyperparameter outside its range raises ValueError naming it."""
        with pytest.raises(ValueError, match=name):
            FedAdam(**kwargs)
