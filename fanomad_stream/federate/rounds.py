"""The aggregator's fold logic without Kafka: strategy, buffered rounds, client-level DP, ledger.

``RoundEngine`` stores the global model and folds validated updates into it:

- synchronous rounds: each update goes into the configured strategy; ``close`` finishes the
  round and returns the next version;
- buffered asynchronous rounds: each update goes to a ``BufferedAsyncAggregator``, which
  applies the buffer every ``buffer_size`` accepted updates;
- secure aggregation: ``fold_secure_sum`` takes the unmasked sum of a round instead of the
  single updates;
- client-level DP: the strategy is wrapped in ``ClientLevelDP`` and every released round is
  recorded in a ``PrivacyLedger``. When the next round would exceed the ε budget,
  ``training_stopped`` holds the reason and no further round may be opened.

Between two rounds, ``state_dict`` contains everything a fold after the next release depends on
beyond the global weights: a server optimizer's moments and, in buffered mode, the keys of the
updates already folded. The aggregator publishes it with each version, so a restarted
aggregator folds exactly as the one it replaces would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from fanomad_stream.config import AppConfig
from fanomad_stream.errors import RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.buffered import BufferedAsyncAggregator
from fanomad_stream.federate.strategies import Strategy
from fanomad_stream.privacy import settings as privacy_settings
from fanomad_stream.privacy.accountant import PrivacyLedger
from fanomad_stream.privacy.dp import SecureGaussian
from fanomad_stream.privacy.ledger_records import restore_ledger
from fanomad_stream.privacy.strategy import ClientLevelDP

log = structlog.get_logger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True)
class RoundClosed:
    """A released round: the round id it closed, the new version and its weights."""

    round: int
    version: int
    weights: Weights
    clients: list[str]
    ledger: dict[str, Any] | None


def build_strategy(config: AppConfig, *, noise: SecureGaussian | None) -> Strategy:
    """Return the configured strategy, wrapped in client-level DP when that is on."""
    strategy = config.aggregator.strategy.build()
    dp = config.privacy.client_dp
    if not dp.enabled:
        return strategy
    server_noise = not config.privacy.secure_aggregation.enabled
    return ClientLevelDP(
        strategy,
        clipping_norm=dp.clipping_norm,
        noise_multiplier=dp.noise_multiplier,
        denominator=privacy_settings.expected_cohort(config),
        min_cohort=privacy_settings.min_cohort(config),
        noise=(noise or SecureGaussian()) if server_noise else None,
    )


class RoundEngine:
    """Folds updates into the global model as configured; see the module docstring.

    Parameters
    ----------
    config
        The validated application config.
    weights, version
        The global model to start from.
    noise
        Generator of the server's DP noise; None draws a fresh key from the OS. Tests pass a
        seeded one.
    """

    def __init__(
        self,
        config: AppConfig,
        weights: Mapping[str, np.ndarray],
        version: int,
        *,
        noise: SecureGaussian | None = None,
    ) -> None:
        self.config = config
        self.strategy = build_strategy(config, noise=noise)
        self.version = version
        self.clients: list[str] = []
        self.training_stopped: str | None = None
        self._encoding_clipped = 0
        buffered = config.aggregator.buffered_async
        self.buffered: BufferedAsyncAggregator | None = None
        if buffered is not None:
            self.buffered = buffered.build(self.strategy, weights, version=version)
        else:
            self.strategy.begin_round(weights)
        dp = config.privacy.client_dp
        self.ledger: PrivacyLedger | None = None
        if dp.enabled:
            self.ledger = PrivacyLedger(
                delta=dp.delta,
                epsilon_budget=dp.epsilon_budget,
                subject=f"model:{config.aggregator.model_name}",
                level="client",
            )
            self._check_budget()

    @property
    def weights(self) -> Weights:
        """The current global model."""
        return self.strategy.global_weights

    @property
    def folded(self) -> int:
        """Updates folded into the open round or buffer."""
        return self.buffered.buffered if self.buffered is not None else len(self.clients)

    @property
    def min_to_close(self) -> int:
        """Fewest folded updates a synchronous round may close with at its deadline."""
        if self.config.privacy.client_dp.enabled:
            return privacy_settings.min_cohort(self.config)
        return 1

    def fold(
        self, client_id: str, base_version: int, delta: Mapping[str, np.ndarray], n_samples: int
    ) -> RoundClosed | None:
        """Fold one validated update; return the released round when a buffer was applied.

        Raises UpdateRejectedError (reason ``training_stopped``, ``too_stale``,
        ``future_version``, ``duplicate`` or a shape reason) when the update is not folded.
        """
        if self.training_stopped is not None:
            raise UpdateRejectedError("training_stopped", self.training_stopped)
        if self.buffered is None:
            self.strategy.fold(delta, float(n_samples))
            self.clients.append(client_id)
            return None
        result = self.buffered.submit(client_id, base_version, delta, float(n_samples))
        if result.status in ("rejected", "duplicate"):
            reason = result.reason or result.status
            msg = (
                f"update of {client_id!r} on version {base_version} was not folded at version "
                f"{self.version}: {reason}"
            )
            raise UpdateRejectedError(reason, msg)
        if result.status == "buffer_discarded":
            log.warning("buffer_discarded", version=self.version, reason=result.reason)
        if result.status != "applied":
            return None
        return self._released(list(result.clients))

    def fold_secure_sum(
        self,
        total: Mapping[str, np.ndarray],
        *,
        clients: list[str],
        total_weight: float,
        clipped_values: int = 0,
    ) -> None:
        """Fold the unmasked sum of a secure aggregation round into the open round.

        ``total`` is the sum of the clients' weighted (or, with DP, clipped and noised) deltas
        and ``total_weight`` the sum of their weights. ``clipped_values`` counts the values the
        clients' fixed-point encoding clipped; the ledger record reports it, because a
        non-zero count voids the DP guarantee of the round.
        """
        self._encoding_clipped = clipped_values
        if self.buffered is not None:
            raise RoundError("secure aggregation runs synchronous rounds only")
        if isinstance(self.strategy, ClientLevelDP):
            self.strategy.fold_noised_sum(total, clients=len(clients))
        else:
            mean = {
                name: np.asarray(array, dtype=np.float64) / total_weight
                for name, array in total.items()
            }
            self.strategy.fold(mean, total_weight)
        self.clients.extend(clients)

    def close(self) -> RoundClosed:
        """Finish the synchronous round; raises RoundError when it cannot be released."""
        if self.buffered is not None:
            raise RoundError("buffered rounds close by themselves when their buffer is full")
        round_id = self.version
        clients = sorted(self.clients)
        start = self.strategy.global_weights
        self.clients = []
        try:
            weights = self.strategy.finish_round()
        except RoundError:
            self.strategy.begin_round(start)
            raise
        self.strategy.begin_round(weights)
        self.version += 1
        return self._finish(round_id, clients, weights)

    def _released(self, clients: list[str]) -> RoundClosed:
        assert self.buffered is not None
        self.version = self.buffered.version
        return self._finish(self.version - 1, sorted(clients), self.buffered.global_weights)

    def _finish(self, round_id: int, clients: list[str], weights: Weights) -> RoundClosed:
        ledger = None
        if self.ledger is not None:
            dp = self.config.privacy.client_dp
            self.ledger.record_round(
                round_id=round_id,
                noise_multiplier=dp.noise_multiplier,
                sampling_rate=privacy_settings.client_sampling_rate(self.config),
            )
            ledger = self.ledger_record("round")
            self._check_budget()
        self._encoding_clipped = 0
        return RoundClosed(round_id, self.version, weights, clients, ledger)

    def state_dict(self) -> dict[str, Any]:
        """Return the fold state between two rounds as a msgpack-friendly map.

        Raises RoundError while updates are folded into the open round or buffer: their offsets
        are not committed yet, so a restart reads them again and the state must not hold them.
        """
        # NOTE: server optimizer moments are float64, so with FedAdam, FedYogi or FedAdagrad a
        # global record is about 5 times the size of its float32 weights; 1M parameters need
        # kafka.max_message_bytes of 24 MiB or more.
        if self.folded:
            msg = (
                f"cannot save the fold state with {self.folded} updates in the open round of "
                f"version {self.version}; save it right after a release"
            )
            raise RoundError(msg)
        if self.buffered is not None:
            state = {"format": STATE_FORMAT, "buffered": self.buffered.state_dict()}
        else:
            state = {"format": STATE_FORMAT, "strategy": self.strategy.state_dict()}
        # The record that carries the state carries the weights too, and the accumulators are
        # empty between rounds, so both are saved as markers.
        compacted: dict[str, Any] = _compact(state, self.weights)
        compacted["weights_sha256"] = _weights_digest(self.weights)
        return compacted

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict`` of an engine built with the same settings.

        Raises ValueError when the state is of another format, of another mode (buffered or
        synchronous) or strategy than this engine's config, contains NaN or infinite values, or
        belongs to another model or version.
        """
        if state.get("format") != STATE_FORMAT:
            msg = (
                f"aggregator state format {state.get('format')!r} is not {STATE_FORMAT}; it was "
                "written by another release of fanomad-stream"
            )
            raise ValueError(msg)
        saved_mode = "buffered" if "buffered" in state else "synchronous"
        mode = "buffered" if self.buffered is not None else "synchronous"
        if saved_mode != mode:
            msg = (
                f"the saved aggregator state is of {saved_mode} rounds and this aggregator runs "
                f"{mode} rounds; start it with the mode the state was written in, or on a new "
                "model name"
            )
            raise ValueError(msg)
        start = {name: array.copy() for name, array in self.weights.items()}
        if state.get("weights_sha256") != _weights_digest(start):
            msg = (
                "the saved aggregator state was written for other global weights than the "
                f"model version {self.version} it was published with; the state belongs to "
                "another model or version"
            )
            raise ValueError(msg)
        state = _expand(state, start)
        _check_finite(state, "aggregator state")
        try:
            if self.buffered is not None:
                self.buffered.load_state_dict(state["buffered"])
            else:
                self.strategy.load_state_dict(state["strategy"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            msg = (
                f"the saved aggregator state does not fit the configured strategy "
                f"{self.strategy.name!r} ({type(err).__name__}: {err}); start the aggregator "
                "with the strategy settings the state was written with, or on a new model name"
            )
            raise ValueError(msg) from err
        restored = self.weights
        if set(restored) != set(start) or any(
            not np.array_equal(restored[name], array) for name, array in start.items()
        ):
            shapes = {name: array.shape for name, array in restored.items()}
            msg = (
                f"the saved aggregator state holds other global weights (shapes {shapes}) than "
                "the model version it was published with; the state belongs to another model "
                "or version"
            )
            raise ValueError(msg)
        if self.buffered is not None and self.buffered.version != self.version:
            msg = (
                f"the saved aggregator state is at version {self.buffered.version}, the "
                f"published model at version {self.version}; the state belongs to another version"
            )
            raise ValueError(msg)
        self.clients = []

    def restore_ledger(self, bodies: list[dict[str, Any]]) -> None:
        """Rebuild the ledger from the model's ``privacy.ledger`` records, then check the budget."""
        if self.ledger is None:
            return
        restored = restore_ledger(self.ledger, bodies)
        self._check_budget()
        log.info(
            "privacy_ledger_restored",
            rounds=restored,
            epsilon=self.ledger.spent_epsilon(),
            training_stopped=self.training_stopped,
        )

    def _check_budget(self) -> None:
        assert self.ledger is not None
        dp = self.config.privacy.client_dp
        check = self.ledger.check_next_round(
            noise_multiplier=dp.noise_multiplier,
            sampling_rate=privacy_settings.client_sampling_rate(self.config),
        )
        if not check.allowed:
            self.training_stopped = check.reason

    def ledger_record(self, status: str) -> dict[str, Any]:
        """Return a ``privacy.ledger`` body for the model: the spend so far and ``status``."""
        assert self.ledger is not None
        body = self.ledger.ledger_body()
        body["status"] = status
        body["version"] = self.version
        if status == "training_stopped":
            body["reason"] = self.training_stopped
        release = getattr(self.strategy, "last_release", None)
        if release is not None:
            body["params"]["cohort"] = release.clients
            body["params"]["clipped_clients"] = release.clipped
            body["params"]["noise_added_by"] = release.noised_by
            body["params"]["encoding_clipped_values"] = self._encoding_clipped
        return body


def _check_finite(value: object, where: str) -> None:
    """Raise ValueError when a float array or number anywhere in ``value`` is NaN or infinite."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fc":
        if not np.isfinite(value).all():
            raise ValueError(f"{where} has NaN or infinite values; the state is corrupt")
    elif isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"{where} is {value}; the state is corrupt")


_SAME_AS_WEIGHTS = "=weights"
_ZEROS = "=zeros"


def _weights_digest(weights: Weights) -> str:
    """Return a SHA-256 of the weights' names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _compact(value: Any, weights: Weights) -> Any:
    """Replace copies of ``weights`` and all-zero sums of their shape by short markers."""
    if isinstance(value, Mapping):
        out = {key: _compact(item, weights) for key, item in value.items()}
        for key, item in value.items():
            if not isinstance(item, Mapping) or set(item) != set(weights) or not item:
                continue
            if all(np.array_equal(item[name], weights[name]) for name in weights):
                out[key] = _SAME_AS_WEIGHTS
            elif all(not np.any(item[name]) for name in weights):
                out[key] = _ZEROS
        return out
    if isinstance(value, list):
        return [_compact(item, weights) for item in value]
    return value


def _expand(value: Any, weights: Weights) -> Any:
    """Undo ``_compact``: markers become copies of ``weights`` or float64 zeros of their shape."""
    if isinstance(value, str) and value == _SAME_AS_WEIGHTS:
        return {name: array.copy() for name, array in weights.items()}
    if isinstance(value, str) and value == _ZEROS:
        return {name: np.zeros(array.shape, dtype=np.float64) for name, array in weights.items()}
    if isinstance(value, Mapping):
        return {key: _expand(item, weights) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, weights) for item in value]
    return value
