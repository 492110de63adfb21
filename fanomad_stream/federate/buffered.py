"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., 2022), as pure logic.

Clients train on whatever global version they hold and send their delta with that
``base_version``. The aggregator folds each accepted delta at once into the strategy's open
round, scaled by a staleness weight ``s(version - base_version)``. After ``buffer_size``
accepted updates it closes the round, which moves the global model to the next version.
An update staler than ``max_staleness`` versions is rejected with a reason. No round waits for
the slowest site.

Each update is identified by ``(client_id, update_id)``, where ``update_id`` defaults to the
base version. A redelivered update with a key already folded is reported as a duplicate and
folded once. With the default key a client must send at most one update per global version it
trained on. A client that sends several windows from the same version passes its own
increasing ``update_id``.

The state (version, the strategy's open round, seen keys) is a msgpack-friendly map, so a
restarted aggregator resumes from its checkpoint and folds a redelivered update once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fanomad_stream.errors import RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import Weights, check_update
from fanomad_stream.federate.strategies import Strategy

StalenessKind = Literal["constant", "polynomial", "hinge"]
SubmitStatus = Literal["buffered", "applied", "duplicate", "rejected", "buffer_discarded"]


def staleness_weight(kind: StalenessKind, staleness: int, *, a: float, b: int) -> float:
    """Return the weight of an update that is ``staleness`` versions old.

    - ``constant``: 1;
    - ``polynomial``: ``(1 + staleness) ** -a``;
    - ``hinge``: 1 up to ``b`` versions, then ``1 / (a * (staleness - b) + 1)``.

    Every function is 1 at staleness 0 and never increases with staleness.
    """
    if staleness < 0:
        msg = f"staleness must be >= 0, got {staleness!r}"
        raise ValueError(msg)
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    msg = f"unknown staleness function {kind!r}; use constant, polynomial or hinge"
    raise ValueError(msg)


@dataclass(frozen=True)
class StalenessFunction:
    """A staleness function with its parameters; see ``staleness_weight``.

    Parameters
    ----------
    kind
        ``constant``, ``polynomial`` or ``hinge``.
    a
        Decay exponent (polynomial) or slope (hinge), >= 0. The polynomial with ``a = 0.5``
        is ``1 / sqrt(1 + staleness)``.
    b
        Staleness in versions up to which the hinge keeps weight 1, >= 0.
    """

    kind: StalenessKind = "polynomial"
    a: float = 0.5
    b: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "polynomial", "hinge"):
            msg = f"unknown staleness function {self.kind!r}; use constant, polynomial or hinge"
            raise ValueError(msg)
        if not self.a >= 0 or not math.isfinite(self.a):
            msg = f"staleness parameter a must be a finite number >= 0, got {self.a!r}"
            raise ValueError(msg)
        if self.b < 0:
            msg = f"staleness parameter b must be >= 0, got {self.b!r}"
            raise ValueError(msg)

    def __call__(self, staleness: int) -> float:
        return staleness_weight(self.kind, staleness, a=self.a, b=self.b)


@dataclass(frozen=True)
class SubmitResult:
    """Outcome of ``BufferedAsyncAggregator.submit`` for one update.

    ``status`` is one of:

    - ``buffered``: folded, and the buffer is not full yet;
    - ``applied``: folded, and the full buffer moved the global model to ``version``;
    - ``duplicate``: an update with this key was folded before, so this one was not;
    - ``rejected``: not folded, and ``reason`` gives the cause;
    - ``buffer_discarded``: folded, but the full buffer had zero total weight, so the global
      model stayed as it was and the buffer was emptied.

    ``version`` is the global version after the call. ``clients`` lists the clients of an
    applied buffer.
    """

    status: SubmitStatus
    version: int
    staleness: int
    weight: float = 0.0
    reason: str | None = None
    clients: tuple[str, ...] = ()


class BufferedAsyncAggregator:
    """Apply the combined update of every ``buffer_size`` accepted deltas to the global model.

    The ``strategy`` combines the buffer: any ``Strategy`` works, so a server optimizer or a
    privacy wrapper composes. With FedAvg the buffer is one running sum, so memory does not
    grow with ``buffer_size``. Each delta enters the strategy multiplied by its staleness
    weight, and with ``weight_by_samples`` its fold weight is ``n_samples``, so a buffer of
    stale updates moves the model less than a buffer of fresh ones. With ``weight_by_samples``
    off every update has fold weight 1, which is FedBuff's mean over the buffer. A wrapper
    that bounds norms receives the scaled delta, so every update still moves the model by at
    most the bound.

    Parameters
    ----------
    strategy
        Combines the buffered deltas. Its current round is replaced by one starting at
        ``global_weights``.
    global_weights
        The global model at ``version``.
    buffer_size
        Number K of accepted updates that close a buffer and advance the version, >= 1.
    max_staleness
        Largest accepted ``version - base_version``, >= 0. Staler updates are rejected.
    staleness
        Weight of an update as a function of its staleness.
    weight_by_samples
        True to weight updates by their sample count, False to weight each update as one.
    version
        Version number of ``global_weights``, >= 0.
    """

    def __init__(
        self,
        strategy: Strategy,
        global_weights: Mapping[str, np.ndarray],
        *,
        buffer_size: int,
        max_staleness: int,
        staleness: StalenessFunction | None = None,
        weight_by_samples: bool = True,
        version: int = 0,
    ) -> None:
        if buffer_size < 1:
            msg = f"buffer_size must be >= 1, got {buffer_size!r}"
            raise ValueError(msg)
        if max_staleness < 0:
            msg = f"max_staleness must be >= 0, got {max_staleness!r}"
            raise ValueError(msg)
        if version < 0:
            msg = f"version must be >= 0, got {version!r}"
            raise ValueError(msg)
        self.strategy = strategy
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.staleness = StalenessFunction() if staleness is None else staleness
        self.weight_by_samples = weight_by_samples
        self.version = version
        # Key (client_id, update_id) -> base_version of every update folded and not yet too
        # stale to arrive again.
        self._seen: dict[tuple[str, int], int] = {}
        self._buffer_clients: list[str] = []
        self.strategy.begin_round(global_weights)

    @property
    def global_weights(self) -> Weights:
        """The current global model, at ``version``."""
        return self.strategy.global_weights

    @property
    def buffered(self) -> int:
        """Number of updates folded into the open buffer."""
        return len(self._buffer_clients)

    def submit(
        self,
        client_id: str,
        base_version: int,
        delta: Mapping[str, np.ndarray],
        n_samples: float,
        *,
        update_id: int | None = None,
    ) -> SubmitResult:
        """Fold one client delta trained on ``base_version``; apply the buffer when it is full.

        Returns a SubmitResult and raises nothing for a bad update: rejected updates carry
        ``reason`` ``future_version``, ``too_stale`` or a reason from ``check_update``.
        """
        key = (client_id, base_version if update_id is None else update_id)
        staleness = self.version - base_version
        if key in self._seen:
            return SubmitResult("duplicate", self.version, staleness)
        rejection = self._check(staleness, delta, n_samples)
        if rejection is not None:
            return SubmitResult("rejected", self.version, staleness, reason=rejection)

        weight = self.staleness(staleness)
        scaled = {
            name: np.asarray(array, dtype=np.float64) * weight for name, array in delta.items()
        }
        self.strategy.fold(scaled, float(n_samples) if self.weight_by_samples else 1.0)
        self._seen[key] = base_version
        self._buffer_clients.append(client_id)

        if self.buffered < self.buffer_size:
            return SubmitResult("buffered", self.version, staleness, weight)
        return self._apply_buffer(staleness, weight)

    def _check(
        self, staleness: int, delta: Mapping[str, np.ndarray], n_samples: float
    ) -> str | None:
        if staleness < 0:
            return "future_version"
        if staleness > self.max_staleness:
            return "too_stale"
        try:
            check_update(delta, n_samples, self.strategy.global_weights)
        except UpdateRejectedError as err:
            return err.reason
        return None

    def _apply_buffer(self, staleness: int, weight: float) -> SubmitResult:
        clients = tuple(self._buffer_clients)
        start = self.strategy.global_weights
        self._buffer_clients = []
        try:
            new_weights = self.strategy.finish_round()
        except RoundError as err:
            self.strategy.begin_round(start)
            return SubmitResult("buffer_discarded", self.version, staleness, weight, str(err))
        self.version += 1
        self.strategy.begin_round(new_weights)
        self._forget_expired_keys()
        return SubmitResult("applied", self.version, staleness, weight, clients=clients)

    def _forget_expired_keys(self) -> None:
        # A key whose base version is now staler than max_staleness is rejected as too stale
        # if it arrives again, so it can leave the seen map without risk of a double fold.
        oldest = self.version - self.max_staleness
        self._seen = {key: base for key, base in self._seen.items() if base >= oldest}

    def state_dict(self) -> dict[str, Any]:
        """Return the state as a msgpack-friendly map: version, open buffer, seen keys."""
        return {
            "version": self.version,
            "buffer_size": self.buffer_size,
            "max_staleness": self.max_staleness,
            "strategy": self.strategy.state_dict(),
            "seen": [
                [client, update, base] for (client, update), base in sorted(self._seen.items())
            ],
            "buffer_clients": list(self._buffer_clients),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict`` into an aggregator built with the same settings.

        Raises ValueError when the checkpoint was written with another buffer size or maximum
        staleness, because its buffer and seen keys would then mean something else.
        """
        for name in ("buffer_size", "max_staleness"):
            if state[name] != getattr(self, name):
                msg = (
                    f"checkpoint has {name}={state[name]!r}, this aggregator "
                    f"{getattr(self, name)!r}; restore with the settings the checkpoint was "
                    "written with"
                )
                raise ValueError(msg)
        self.strategy.load_state_dict(state["strategy"])
        self.version = int(state["version"])
        self._seen = {
            (str(client), int(update)): int(base) for client, update, base in state["seen"]
        }
        self._buffer_clients = [str(client) for client in state["buffer_clients"]]
