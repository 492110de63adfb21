"""Federated strategies: what the server does with the updates of one round.

A strategy runs in three phases per round, as Flower's strategies do: ``begin_round`` with the
global weights the clients trained on, ``fold`` once per accepted client delta, and
``finish_round`` to get the next global weights. The arithmetic lives in pure functions in
``aggregate.py``; the classes here only keep the round's state.

Streaming strategies (FedAvg, FedProx, and the server optimizers over them) fold each delta into
a running weighted sum, so their memory is one model whatever the client count. The robust
statistics (coordinate-wise median, trimmed mean) need every value of a coordinate at once, so
they buffer the round's deltas: their memory grows with the number of clients in a round.

Only strategies that need nothing but the weighted sum of the deltas can run under secure
aggregation, because the aggregator then learns the sum and nothing else. See
``strategy_settings.SECURE_AGGREGATION`` for the table and the check.

Wrappers (``StrategyWrapper``) take a strategy and delegate every phase they do not change, so
robustness and privacy steps compose: ``NormBounding(FedAvg(), max_norm=1.0)``. The robust
strategies and wrappers are in ``robust.py``, the server optimizers in ``server_optimizers.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from fanomad_stream.errors import RoundError
from fanomad_stream.federate.aggregate import (
    WeightedSum,
    Weights,
    apply_delta,
    check_update,
)


class Strategy(ABC):
    """One round of server-side aggregation: begin, fold each update, finish.

    Call ``begin_round`` before the first ``fold`` of a round and ``finish_round`` exactly once
    to close it. A strategy with server state, such as the moments of FedAdam, advances that
    state in ``finish_round``. ``fold`` validates the update first. When the update does not
    fit the model it raises UpdateRejectedError with a reason and leaves the round untouched.
    """

    name: str = "strategy"

    @property
    def streaming(self) -> bool:
        """True when memory stays one model whatever the number of updates in a round."""
        return True

    @property
    def supports_secure_aggregation(self) -> bool:
        """True when the strategy needs only the weighted sum of the round's deltas."""
        return True

    @abstractmethod
    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Open a round whose clients trained from ``global_weights``; drop any open round."""

    @abstractmethod
    def fold(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        """Validate one client delta and add it, weighted by ``n_samples``, to the round."""

    @abstractmethod
    def aggregate_deltas(self) -> Weights:
        """Return the combined client delta of the open round, before any server optimizer."""

    @abstractmethod
    def finish_round(self) -> Weights:
        """Close the round and return the new global weights (float32)."""

    @property
    @abstractmethod
    def global_weights(self) -> Weights:
        """The global weights the open round started from."""

    @property
    @abstractmethod
    def folded(self) -> int:
        """Number of updates folded into the open round."""

    def configure_clients(self) -> dict[str, float]:
        """Return settings the clients must train with this round (such as ``proximal_mu``)."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Return the whole state as a msgpack-friendly map, for a checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by ``state_dict`` of a strategy built the same way."""


class RoundStrategy(Strategy):
    """Round bookkeeping shared by the strategies that combine deltas themselves.

    Subclasses implement ``_reset``, ``_accumulate``, ``aggregate_deltas`` and the state of
    their accumulator. The new global model is ``global + server_learning_rate * aggregate``.
    """

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        if not server_learning_rate > 0 or not math.isfinite(server_learning_rate):
            msg = f"server_learning_rate must be a finite number > 0, got {server_learning_rate!r}"
            raise ValueError(msg)
        self.server_learning_rate = server_learning_rate
        self._global: Weights | None = None
        self._open = False

    @property
    def global_weights(self) -> Weights:
        return self._require_open("read the global weights of")

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self._global = {
            name: np.array(array, dtype=np.float32) for name, array in global_weights.items()
        }
        self._reset(self._global)
        self._open = True

    def fold(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        template = self._require_open("fold an update into")
        check_update(delta, n_samples, template)
        self._accumulate(delta, float(n_samples))

    def finish_round(self) -> Weights:
        template = self._require_open("finish")
        step = self.aggregate_deltas()
        if self.server_learning_rate != 1.0:
            step = {
                name: (np.asarray(array, dtype=np.float64) * self.server_learning_rate).astype(
                    np.float32
                )
                for name, array in step.items()
            }
        self._open = False
        return apply_delta(template, step)

    def state_dict(self) -> dict[str, Any]:
        return {"global": self._global, "open": self._open, "accumulator": self._save()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["global"]
        if saved is None:
            self._global, self._open = None, False
            return
        self.begin_round(saved)
        self._load(state["accumulator"])
        self._open = bool(state["open"])

    def _require_open(self, action: str) -> Weights:
        if self._global is None or not self._open:
            msg = f"cannot {action} a round: no round is open; call begin_round first"
            raise RoundError(msg)
        return self._global

    @abstractmethod
    def _reset(self, template: Weights) -> None: ...

    @abstractmethod
    def _accumulate(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None: ...

    @abstractmethod
    def _save(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load(self, state: Mapping[str, Any]) -> None: ...


class FedAvg(RoundStrategy):
    """Weighted mean of the deltas by sample count (McMahan et al., 2017).

    Streams: each ``fold`` adds into one float64 running sum, so memory is one model.

    Parameters
    ----------
    server_learning_rate
        Factor eta_g on the averaged delta before it is added to the global weights, > 0.
        1 is plain FedAvg.
    """

    name = "fedavg"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self._sum: WeightedSum | None = None

    @property
    def folded(self) -> int:
        return 0 if self._sum is None or not self._open else self._sum.count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded into the open round."""
        return 0.0 if self._sum is None or not self._open else self._sum.total_weight

    def aggregate_deltas(self) -> Weights:
        self._require_open("aggregate")
        assert self._sum is not None
        return self._sum.mean()

    def _reset(self, template: Weights) -> None:
        self._sum = WeightedSum(template)

    def _accumulate(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        assert self._sum is not None
        self._sum.add(delta, n_samples)

    def _save(self) -> dict[str, Any]:
        return {} if self._sum is None else self._sum.state_dict()

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self._sum is not None
        self._sum.load_state_dict(state)


class FedProx(FedAvg):
    """FedAvg on the server, with the FedProx proximal term in every client's loss.

    The server side is FedAvg unchanged. Clients add ``mu / 2 * ||w - w_global||^2`` to their
    loss (``fedprox.proximal_term``) and read ``mu`` from ``configure_clients``.

    Parameters
    ----------
    proximal_mu
        Weight mu of the proximal term, >= 0. 0 trains exactly as FedAvg does; larger values
        keep local models closer to the global one.
    server_learning_rate
        As for FedAvg.
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float, server_learning_rate: float = 1.0) -> None:
        if not proximal_mu >= 0 or not math.isfinite(proximal_mu):
            msg = f"proximal_mu must be a finite number >= 0, got {proximal_mu!r}"
            raise ValueError(msg)
        super().__init__(server_learning_rate=server_learning_rate)
        self.proximal_mu = proximal_mu

    def configure_clients(self) -> dict[str, float]:
        return {"proximal_mu": self.proximal_mu}


class StrategyWrapper(Strategy):
    """A strategy around ``inner`` that delegates every phase it does not override."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def streaming(self) -> bool:
        return self.inner.streaming

    @property
    def supports_secure_aggregation(self) -> bool:
        return self.inner.supports_secure_aggregation

    @property
    def global_weights(self) -> Weights:
        return self.inner.global_weights

    @property
    def folded(self) -> int:
        return self.inner.folded

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self.inner.begin_round(global_weights)

    def fold(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        self.inner.fold(delta, n_samples)

    def aggregate_deltas(self) -> Weights:
        return self.inner.aggregate_deltas()

    def finish_round(self) -> Weights:
        return self.inner.finish_round()

    def configure_clients(self) -> dict[str, float]:
        return self.inner.configure_clients()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
