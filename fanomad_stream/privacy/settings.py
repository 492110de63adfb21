"""Cross-section checks and derived values of the privacy configuration.

The pydantic sections in ``config.py`` check each key on its own; the rules here tie the
privacy settings to the federation (strategy, client list, quorum, buffered mode). Every
violation names the key path to change, so ``load_config`` fails at start-up with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fanomad_stream.errors import ConfigError
from fanomad_stream.federate.strategy_settings import SECURE_AGGREGATION
from fanomad_stream.privacy.dp import noise_share_std
from fanomad_stream.privacy.secagg.encoding import FixedPointCodec
from fanomad_stream.privacy.secagg.messages import check_threshold

if TYPE_CHECKING:
    from fanomad_stream.config import AppConfig

# With DP on, the encoding range is the clipping norm plus this many noise-share stds, so
# a coordinate of a clipped and noised update falls outside it with probability about 1e-15.
NOISE_STDS_IN_RANGE = 8.0


def check_privacy_settings(config: AppConfig) -> None:
    """Raise ValueError naming the key path of the first inconsistent privacy setting."""
    privacy = config.privacy
    if privacy.secure_aggregation.enabled:
        _check_secure_aggregation(config)
    if privacy.client_dp.enabled:
        _check_client_dp(config)


def _check_secure_aggregation(config: AppConfig) -> None:
    aggregator = config.aggregator
    settings = config.privacy.secure_aggregation
    if not aggregator.clients:
        msg = (
            "aggregator.clients: secure aggregation needs the list of client ids, because "
            "every round invites them by name"
        )
        raise ValueError(msg)
    if aggregator.buffered_async is not None:
        msg = (
            "aggregator.buffered_async: secure aggregation runs synchronous rounds only; "
            "remove buffered_async or turn privacy.secure_aggregation.enabled off"
        )
        raise ValueError(msg)
    try:
        aggregator.strategy.check_secure_aggregation(True)
    except ConfigError as err:
        raise ValueError(f"aggregator.strategy: {err}") from None
    try:
        check_threshold(settings.threshold, len(aggregator.clients))
    except ValueError as err:
        raise ValueError(f"privacy.secure_aggregation.threshold: {err}") from None
    if not settings.threshold <= aggregator.quorum <= len(aggregator.clients):
        msg = (
            f"aggregator.quorum: with secure aggregation it must lie between the threshold "
            f"{settings.threshold} and the number of clients {len(aggregator.clients)}, got "
            f"{aggregator.quorum}"
        )
        raise ValueError(msg)
    try:
        secure_aggregation_codec(config)
    except ConfigError as err:
        raise ValueError(f"privacy.secure_aggregation: {err}") from None


def _check_client_dp(config: AppConfig) -> None:
    aggregator = config.aggregator
    dp = config.privacy.client_dp
    name = aggregator.strategy.name
    if not SECURE_AGGREGATION[name]:
        msg = (
            f"aggregator.strategy.name: client-level DP bounds the sensitivity of a sum of "
            f"clipped deltas, and strategy {name!r} does not combine a sum; use one of "
            f"{sorted(n for n, ok in SECURE_AGGREGATION.items() if ok)}"
        )
        raise ValueError(msg)
    buffered = aggregator.buffered_async
    if buffered is not None and buffered.weight_by_samples:
        msg = (
            "aggregator.buffered_async.weight_by_samples: client-level DP gives every client "
            "weight 1 (sample counts would raise the sensitivity); set it to false"
        )
        raise ValueError(msg)
    if dp.population is None and not aggregator.clients:
        msg = "privacy.client_dp.population: set it, or list aggregator.clients"
        raise ValueError(msg)
    cohort = expected_cohort(config)
    if cohort > population(config):
        msg = (
            f"privacy.client_dp.population: {population(config)} clients cannot fill a cohort "
            f"of {cohort} (the quorum or buffer size)"
        )
        raise ValueError(msg)
    smallest = min_cohort(config)
    if smallest > cohort:
        msg = f"privacy.client_dp.min_cohort: {smallest} is above the expected cohort {cohort}"
        raise ValueError(msg)
    secure = config.privacy.secure_aggregation
    if secure.enabled and smallest > secure.threshold:
        msg = (
            f"privacy.client_dp.min_cohort: {smallest} is above the secure aggregation "
            f"threshold {secure.threshold}; a round of threshold survivors would then carry "
            "less noise than promised"
        )
        raise ValueError(msg)


def expected_cohort(config: AppConfig) -> int:
    """Return the number of clients one release sums: the buffer size or the quorum."""
    buffered = config.aggregator.buffered_async
    return buffered.buffer_size if buffered is not None else config.aggregator.quorum


def population(config: AppConfig) -> int:
    """Return the number of clients a cohort is drawn from."""
    dp = config.privacy.client_dp
    if dp.population is not None:
        return dp.population
    return len(config.aggregator.clients or []) or expected_cohort(config)


def min_cohort(config: AppConfig) -> int:
    """Return the smallest number of clients a noised release may sum."""
    dp = config.privacy.client_dp
    if dp.min_cohort is not None:
        return dp.min_cohort
    secure = config.privacy.secure_aggregation
    return secure.threshold if secure.enabled else expected_cohort(config)


def client_sampling_rate(config: AppConfig) -> float:
    """Return q = expected cohort / population, the client sampling rate the accountant uses.

    NOTE: a cohort is the first clients to send an update, not a Poisson sample. The figure
    assumes Poisson sampling at this rate, which is exact only for q = 1.
    """
    return min(1.0, expected_cohort(config) / population(config))


def secure_aggregation_codec(config: AppConfig) -> FixedPointCodec:
    """Return the fixed-point codec every party of a secure aggregation round uses.

    Raises ConfigError when the sum of the invited clients could overflow the ring.
    """
    secure = config.privacy.secure_aggregation
    dp = config.privacy.client_dp
    clip_range = secure.clip_range
    if clip_range is None:
        if dp.enabled:
            std = noise_share_std(
                clipping_norm=dp.clipping_norm,
                noise_multiplier=dp.noise_multiplier,
                min_cohort=min_cohort(config),
            )
            clip_range = dp.clipping_norm + NOISE_STDS_IN_RANGE * std
        else:
            clip_range = 1.0
    return FixedPointCodec(
        clip_range=clip_range,
        scale_bits=secure.scale_bits,
        max_clients=len(config.aggregator.clients or []) or 1,
        max_weight=1.0,
        max_bits=secure.max_bits,
    )


def share_std(config: AppConfig) -> float:
    """Return each client's noise-share std under secure aggregation (0 with DP off)."""
    dp = config.privacy.client_dp
    if not dp.enabled:
        return 0.0
    return noise_share_std(
        clipping_norm=dp.clipping_norm,
        noise_multiplier=dp.noise_multiplier,
        min_cohort=min_cohort(config),
    )
