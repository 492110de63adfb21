"""Adaptive server optimizers FedAdagrad, FedAdam and FedYogi.

These are the server optimizers of Reddi et al., "Adaptive Federated Optimization" (ICLR
2021). The server treats the round's combined client delta as a pseudo-gradient ``g``. It
points the way the clients moved, so the step is added. Per-coordinate moments carry over
from round to round:

    m_t = beta_1 * m_{t-1} + (1 - beta_1) * g
    v_t = v_{t-1} + g²                                        (FedAdagrad)
    v_t = beta_2 * v_{t-1} + (1 - beta_2) * g²                (FedAdam)
    v_t = v_{t-1} - (1 - beta_2) * g² * sign(v_{t-1} - g²)    (FedYogi)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

The moments start at ``m = 0`` and ``v = tau²``, and no bias correction is applied, so the
first rounds differ from an implementation that starts ``v`` at 0 or corrects the bias. The
optimizers wrap the strategy that combines the deltas (FedAvg by default), so they need only
the weighted sum of the deltas and run under secure aggregation whenever the inner strategy
does. Moments are kept in float64 and are part of ``state_dict``, so a restored aggregator
continues with the same moments.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from fanomad_stream.errors import RoundError
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.strategies import FedAvg, Strategy, StrategyWrapper


def first_moment(m: np.ndarray, g: np.ndarray, beta_1: float) -> np.ndarray:
    """Return ``beta_1 * m + (1 - beta_1) * g``."""
    result: np.ndarray = beta_1 * m + (1.0 - beta_1) * g
    return result


def adagrad_second_moment(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Return ``v + g²``."""
    result: np.ndarray = v + np.square(g)
    return result


def adam_second_moment(v: np.ndarray, g: np.ndarray, beta_2: float) -> np.ndarray:
    """Return ``beta_2 * v + (1 - beta_2) * g²``."""
    result: np.ndarray = beta_2 * v + (1.0 - beta_2) * np.square(g)
    return result


def yogi_second_moment(v: np.ndarray, g: np.ndarray, beta_2: float) -> np.ndarray:
    """Return ``v - (1 - beta_2) * g² * sign(v - g²)``."""
    squared = np.square(g)
    result: np.ndarray = v - (1.0 - beta_2) * squared * np.sign(v - squared)
    return result


def adaptive_step(m: np.ndarray, v: np.ndarray, eta: float, tau: float) -> np.ndarray:
    """Return the server step ``eta * m / (sqrt(v) + tau)``."""
    result: np.ndarray = eta * m / (np.sqrt(v) + tau)
    return result


def _check_range(name: str, value: float, low: float, high: float, *, closed_low: bool) -> None:
    inside = (value >= low if closed_low else value > low) and value < high
    if not inside or not math.isfinite(value):
        bracket = "[" if closed_low else "("
        msg = f"{name} must be in {bracket}{low}, {high}), got {value!r}"
        raise ValueError(msg)


class ServerOptimizer(StrategyWrapper):
    """Adaptive server step on the pseudo-gradient that ``inner`` combines.

    ``finish_round`` advances the moments, so call it once per round. ``aggregate_deltas``
    returns the inner strategy's pseudo-gradient unchanged.

    Parameters
    ----------
    inner
        The strategy that combines the client deltas; FedAvg when omitted.
    eta
        Server learning rate, > 0. Scales the step added to the global weights.
    eta_l
        Client learning rate sent to the clients through ``configure_clients``, > 0, or None
        to leave the clients at their configured learning rate.
    beta_1
        Decay of the first moment (momentum), in [0, 1). 0 disables momentum.
    beta_2
        Decay of the second moment, in [0, 1). Unused by FedAdagrad.
    tau
        Adaptivity constant added to ``sqrt(v)``, > 0. Smaller values adapt more strongly
        to the per-coordinate scale; it also sets the initial second moment ``tau²``.
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        eta: float = 1e-2,
        eta_l: float | None = None,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(FedAvg() if inner is None else inner)
        _check_range("eta", eta, 0.0, math.inf, closed_low=False)
        if eta_l is not None:
            _check_range("eta_l", eta_l, 0.0, math.inf, closed_low=False)
        _check_range("beta_1", beta_1, 0.0, 1.0, closed_low=True)
        _check_range("beta_2", beta_2, 0.0, 1.0, closed_low=True)
        _check_range("tau", tau, 0.0, math.inf, closed_low=False)
        self.eta = eta
        self.eta_l = eta_l
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self.name = self.optimizer_name
        self._m: dict[str, np.ndarray] | None = None
        self._v: dict[str, np.ndarray] | None = None
        self.rounds = 0

    optimizer_name = "server_optimizer"

    @abstractmethod
    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray: ...

    def finish_round(self) -> Weights:
        start = self.inner.global_weights
        pseudo_gradient = self.inner.aggregate_deltas()
        if self._m is None or self._v is None:
            self._m = {name: np.zeros(a.shape, dtype=np.float64) for name, a in start.items()}
            self._v = {
                name: np.full(a.shape, self.tau**2, dtype=np.float64) for name, a in start.items()
            }
        if set(self._m) != set(pseudo_gradient):
            msg = (
                f"optimizer moments cover parameters {sorted(self._m)}, the round has "
                f"{sorted(pseudo_gradient)}; the model changed, so start a new optimizer"
            )
            raise RoundError(msg)
        # Compute into new maps and commit only at the end, so a failure leaves the moments
        # of the previous round in place.
        moments_m: dict[str, np.ndarray] = {}
        moments_v: dict[str, np.ndarray] = {}
        new_weights: Weights = {}
        for name, delta in pseudo_gradient.items():
            g = np.asarray(delta, dtype=np.float64)
            moments_m[name] = first_moment(self._m[name], g, self.beta_1)
            moments_v[name] = self._second_moment(self._v[name], g)
            step = adaptive_step(moments_m[name], moments_v[name], self.eta, self.tau)
            new_weights[name] = (start[name].astype(np.float64) + step).astype(np.float32)
        # Close the inner round as its own finish does, so its state records the round closed.
        self.inner.finish_round()
        self._m, self._v = moments_m, moments_v
        self.rounds += 1
        return new_weights

    def configure_clients(self) -> dict[str, float]:
        settings = self.inner.configure_clients()
        if self.eta_l is not None:
            settings["learning_rate"] = self.eta_l
        return settings

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "m": self._m, "v": self._v, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        moments_m = _copy_moments(state["m"])
        moments_v = _copy_moments(state["v"])
        if (moments_m is None) != (moments_v is None):
            raise ValueError("saved optimizer state is missing one of its two moments m and v")
        if moments_m is not None and moments_v is not None:
            try:
                template = self.inner.global_weights
            except RoundError:  # saved between two rounds: the next begin_round sets the model
                template = moments_m
            expected = {name: array.shape for name, array in template.items()}
            for label, moments in (("m", moments_m), ("v", moments_v)):
                shapes = {name: array.shape for name, array in moments.items()}
                if shapes != expected:
                    msg = (
                        f"saved optimizer moment {label} has parameters {shapes}, the model "
                        f"{expected}; the state belongs to another model"
                    )
                    raise ValueError(msg)
        self._m, self._v = moments_m, moments_v
        self.rounds = int(state["rounds"])


def _copy_moments(saved: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    if saved is None:
        return None
    return {name: np.array(array, dtype=np.float64) for name, array in saved.items()}


class FedAdagrad(ServerOptimizer):
    """Server Adagrad: the second moment sums the squared pseudo-gradients.

    ``beta_1`` defaults to 0 here, which is plain Adagrad without momentum.
    """

    optimizer_name = "fedadagrad"

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        eta: float = 1e-2,
        eta_l: float | None = None,
        beta_1: float = 0.0,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(inner, eta=eta, eta_l=eta_l, beta_1=beta_1, tau=tau)

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return adagrad_second_moment(v, g)


class FedAdam(ServerOptimizer):
    """Server Adam: the second moment is an exponential average of squared pseudo-gradients."""

    optimizer_name = "fedadam"

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return adam_second_moment(v, g, self.beta_2)


class FedYogi(ServerOptimizer):
    """Server Yogi: the second moment moves additively, so one large round cannot swamp it."""

    optimizer_name = "fedyogi"

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return yogi_second_moment(v, g, self.beta_2)
