"""Client-level DP (DP-FedAvg) as a strategy wrapper around a sum-based strategy.

Each folded delta is clipped to L2 norm C and added with weight 1, whatever its sample count,
so one client changes the sum by at most C. At the end of a round the sum gets Gaussian noise
of std z·C (unless the clients already added their shares under secure aggregation) and is
divided by a fixed denominator, the expected cohort size, as McMahan et al. (ICLR 2018) do:
dividing by the actual count would make the denominator itself depend on one client. The
noised mean is then folded once, with weight 1, into the wrapped strategy, so FedAvg, FedProx
and the server optimizers all run on the private mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fanomad_stream.errors import RoundError
from fanomad_stream.federate.aggregate import Weights, check_update
from fanomad_stream.federate.strategies import Strategy, StrategyWrapper
from fanomad_stream.privacy.dp import SecureGaussian, add_sum_noise, clip_update


@dataclass(frozen=True)
class Release:
    """Summary of the last released round: client count, clipped count and the noise added."""

    clients: int
    clipped: int
    noise_std: float
    noised_by: str  # "server" or "clients"


class ClientLevelDP(StrategyWrapper):
    """Clip, sum with weight 1, add noise and divide by a fixed denominator, then delegate.

    Parameters
    ----------
    inner
        The strategy that turns the private mean into the next global model; it must need
        only a weighted sum (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad).
    clipping_norm
        Largest flat L2 norm C of one client's delta, in parameter units, > 0.
    noise_multiplier
        Noise std on the sum divided by C, >= 0. 0 releases the sum without privacy.
    denominator
        Expected cohort size the noised sum is divided by, >= 1.
    min_cohort
        Minimum number of clients a round may sum. ``finish_round`` raises RoundError below
        it, so a round never releases a sum of fewer clients than the noise was sized for.
    noise
        The generator of the server's noise; None when only clients add noise.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clipping_norm: float,
        noise_multiplier: float,
        denominator: int,
        min_cohort: int,
        noise: SecureGaussian | None,
    ) -> None:
        super().__init__(inner)
        if denominator < 1 or min_cohort < 1:
            msg = f"denominator and min_cohort must be >= 1, got {denominator} and {min_cohort}"
            raise ValueError(msg)
        self.clipping_norm = clipping_norm
        self.noise_multiplier = noise_multiplier
        self.denominator = denominator
        self.min_cohort = min_cohort
        self._noise = noise
        self._sum: dict[str, np.ndarray] = {}
        self._count = 0
        self._clipped = 0
        self._noised_by_clients = False
        self.last_release: Release | None = None

    @property
    def folded(self) -> int:
        return self._count

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self.inner.begin_round(global_weights)
        self._sum = {
            name: np.zeros(np.shape(array), dtype=np.float64)
            for name, array in global_weights.items()
        }
        self._count = 0
        self._clipped = 0
        self._noised_by_clients = False

    def fold(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        """Clip ``delta`` to C and add it with weight 1. ``n_samples`` is only validated."""
        check_update(delta, n_samples, self.inner.global_weights)
        clipped = clip_update(delta, clipping_norm=self.clipping_norm)
        for name, total in self._sum.items():
            total += np.asarray(clipped.update[name], dtype=np.float64)
        self._count += 1
        self._clipped += int(clipped.clipped)

    def fold_noised_sum(self, total: Mapping[str, np.ndarray], *, clients: int) -> None:
        """Set the round's sum to ``total``, the clipped and noised sum of ``clients`` clients.

        Under secure aggregation the clients clip and add their noise shares, and the
        aggregator learns only this sum, so no further clipping or noise is applied.
        """
        check_update(total, 1.0, self.inner.global_weights)
        self._sum = {name: np.asarray(total[name], dtype=np.float64).copy() for name in self._sum}
        self._count = clients
        self._clipped = 0
        self._noised_by_clients = True

    def aggregate_deltas(self) -> Weights:
        """Return the private mean: (sum + noise) / denominator. Draws fresh noise each call."""
        return self._private_mean()[0]

    def finish_round(self) -> Weights:
        mean, release = self._private_mean()
        self.inner.fold(mean, 1.0)
        weights = self.inner.finish_round()
        self.last_release = release
        return weights

    def _private_mean(self) -> tuple[Weights, Release]:
        if self._count < self.min_cohort:
            msg = (
                f"round has {self._count} clients, below min_cohort {self.min_cohort} that the "
                "DP noise is sized for; the global model stays as it was"
            )
            raise RoundError(msg)
        total: Mapping[str, np.ndarray] = self._sum
        std = 0.0
        if not self._noised_by_clients and self.noise_multiplier > 0:
            if self._noise is None:
                msg = "server-side DP noise needs a noise generator; pass noise="
                raise RoundError(msg)
            total = add_sum_noise(
                self._sum,
                clipping_norm=self.clipping_norm,
                noise_multiplier=self.noise_multiplier,
                noise=self._noise,
            )
            std = self.noise_multiplier * self.clipping_norm
        mean = {
            name: (np.asarray(array, dtype=np.float64) / self.denominator).astype(np.float32)
            for name, array in total.items()
        }
        by = "clients" if self._noised_by_clients else "server"
        return mean, Release(self._count, self._clipped, std, by)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "sum": dict(self._sum),
            "count": self._count,
            "clipped": self._clipped,
            "noised_by_clients": self._noised_by_clients,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._sum = {
            name: np.array(array, dtype=np.float64) for name, array in state["sum"].items()
        }
        self._count = int(state["count"])
        self._clipped = int(state["clipped"])
        self._noised_by_clients = bool(state["noised_by_clients"])
