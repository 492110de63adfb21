"""Client-level differential privacy for model updates (DP-FedAvg, McMahan et al., ICLR 2018).

Each client clips its delta to L2 norm C over all parameters flattened together. Gaussian noise
with standard deviation z·C is then added to the *sum* of the clipped deltas, so one client's
presence or absence changes the sum by at most C and the release is a Gaussian mechanism with
noise multiplier z. The server divides the noised sum by the cohort size (a fixed denominator),
so every client must take part with weight 1: weighting by sample counts would raise the
sensitivity above C.

Without secure aggregation the server adds the noise to the sum (``add_sum_noise``). With
secure aggregation the server only ever sees the sum, so each client adds a share with standard
deviation z·C / sqrt(min_cohort) (``privatize_client_update``). When at least ``min_cohort``
clients survive, the shares add up to a variance of at least (z·C)²; the round must abort below
that size.

Noise is drawn from ``SecureGaussian``, a generator owned by the caller and fed by a ChaCha20
keystream keyed from ``os.urandom``, never from numpy's or torch's global state.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fanomad_stream.privacy.accountant import check_noise_multiplier

Weights = dict[str, np.ndarray]

_TWO_POW_53 = float(2**53)


class SecureGaussian:
    """Gaussian noise generator fed by a ChaCha20 keystream (a cryptographic PRG).

    The 256-bit key comes from ``os.urandom``, so the noise cannot be predicted or replayed
    from anything an observer sees. Uniform doubles with 53 random bits are turned into normal
    values by the Box–Muller transform in float64.

    Parameters
    ----------
    test_seed
        For tests only: derive the key from this integer so that draws are reproducible.
        Reproducible noise gives no privacy, so production code must leave it None.

    Notes
    -----
    Floating-point Gaussian samples leak a little through the low-order bits of their
    representation (Mironov, CCS 2012). NOTE: no snapping or discrete Gaussian is applied here.
    """

    def __init__(self, *, test_seed: int | None = None) -> None:
        if test_seed is None:
            key = os.urandom(32)
        else:
            key = hashlib.sha256(b"fanomad-stream test noise " + str(test_seed).encode()).digest()
        self.deterministic = test_seed is not None
        # The 16-byte ChaCha20 nonce holds the block counter, so one encryptor is one stream.
        cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
        self._stream = cipher.encryptor()

    def uniform(self, count: int) -> np.ndarray:
        """Return ``count`` uniform doubles in (0, 1], for example for Poisson sampling."""
        raw = np.frombuffer(self._stream.update(bytes(8 * count)), dtype=np.uint64)
        return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / _TWO_POW_53

    def standard_normal(self, count: int) -> np.ndarray:
        """Return ``count`` independent N(0, 1) values as float64."""
        pairs = (count + 1) // 2
        u1 = self.uniform(pairs)
        u2 = self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return values[:count]

    def normal_like(self, update: Mapping[str, np.ndarray], std: float) -> Weights:
        """Return N(0, std²) noise arrays (float64) with the shapes of ``update``."""
        sizes = [int(np.asarray(array).size) for array in update.values()]
        flat = self.standard_normal(sum(sizes)) * std
        noise: Weights = {}
        begin = 0
        for (name, array), size in zip(update.items(), sizes, strict=True):
            noise[name] = flat[begin : begin + size].reshape(np.shape(array))
            begin += size
        return noise


def check_clipping_norm(clipping_norm: float) -> None:
    """Raise ValueError unless ``clipping_norm`` is a finite number > 0."""
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        msg = (
            f"clipping_norm must be a finite number > 0, got {clipping_norm!r}; it is the "
            "largest L2 norm of one client's update, in parameter units"
        )
        raise ValueError(msg)


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of all parameters of ``update`` flattened together (in float64)."""
    total = 0.0
    for array in update.values():
        values = np.asarray(array, dtype=np.float64)
        total += float(np.dot(values.ravel(), values.ravel()))
    return math.sqrt(total)


@dataclass(frozen=True)
class ClippedUpdate:
    """A clipped update with its norm before clipping and the scale factor applied."""

    update: Weights
    norm: float
    scale: float

    @property
    def clipped(self) -> bool:
        """True when the update was scaled down."""
        return self.scale < 1.0


def clip_update(update: Mapping[str, np.ndarray], *, clipping_norm: float) -> ClippedUpdate:
    """Scale ``update`` down to L2 norm ``clipping_norm`` when its flat norm exceeds it.

    An all-zero (norm 0) update is returned unchanged with scale 1. A non-finite value raises
    ValueError, because its norm is undefined and clipping would not bound it.

    Parameters
    ----------
    update
        Parameter name to float array, the client's delta against the global model.
    clipping_norm
        Largest L2 norm of the update over all parameters flattened together, in parameter
        units. Must be > 0. Smaller values bound each client's influence more tightly.
    """
    check_clipping_norm(clipping_norm)
    norm = update_norm(update)
    if not math.isfinite(norm):
        msg = "update contains NaN or infinite values; train again or drop this update"
        raise ValueError(msg)
    scale = 1.0 if norm <= clipping_norm else clipping_norm / norm
    clipped = {
        name: (np.asarray(array) * scale).astype(np.float32) for name, array in update.items()
    }
    return ClippedUpdate(clipped, norm, scale)


def noise_share_std(*, clipping_norm: float, noise_multiplier: float, min_cohort: int) -> float:
    """Return the per-client noise std z·C / sqrt(min_cohort) used with secure aggregation.

    ``min_cohort`` is the smallest number of surviving clients a round accepts. With at least
    that many shares in the sum, the summed noise has std >= z·C.
    """
    check_clipping_norm(clipping_norm)
    check_noise_multiplier(noise_multiplier)
    if min_cohort < 1:
        msg = f"min_cohort must be >= 1 client, got {min_cohort!r}"
        raise ValueError(msg)
    return noise_multiplier * clipping_norm / math.sqrt(min_cohort)


@dataclass(frozen=True)
class PrivatizedUpdate:
    """A clipped update plus this client's noise share, ready for secure aggregation."""

    update: Weights
    norm: float
    clipped: bool
    noise_std: float


def privatize_client_update(
    update: Mapping[str, np.ndarray],
    *,
    clipping_norm: float,
    noise_multiplier: float,
    min_cohort: int,
    noise: SecureGaussian,
) -> PrivatizedUpdate:
    """Clip ``update`` and add this client's share of the DP noise (secure aggregation on).

    Parameters
    ----------
    update
        The client's delta, parameter name to float array.
    clipping_norm
        Largest flat L2 norm of one client's update, in parameter units, > 0.
    noise_multiplier
        Ratio z of the noise std on the *sum* to ``clipping_norm``, dimensionless, >= 0; 0
        disables noise and privacy. Larger is more private and less accurate.
    min_cohort
        Smallest number of clients whose updates a round sums, >= 1. The share's std is
        z·C / sqrt(min_cohort), so a round with fewer survivors carries less noise than
        promised and must be aborted.
    noise
        The privacy component's noise generator.
    """
    clipped = clip_update(update, clipping_norm=clipping_norm)
    std = noise_share_std(
        clipping_norm=clipping_norm, noise_multiplier=noise_multiplier, min_cohort=min_cohort
    )
    noised = _add_noise(clipped.update, std, noise)
    return PrivatizedUpdate(noised, clipped.norm, clipped.clipped, std)


def add_sum_noise(
    total: Mapping[str, np.ndarray],
    *,
    clipping_norm: float,
    noise_multiplier: float,
    noise: SecureGaussian,
) -> Weights:
    """Add N(0, (z·C)²) noise to the sum of clipped updates (server side, no secure aggregation).

    Divide the result by the number of sampled clients to get the DP-FedAvg mean.
    """
    check_clipping_norm(clipping_norm)
    check_noise_multiplier(noise_multiplier)
    return _add_noise(total, noise_multiplier * clipping_norm, noise)


def _add_noise(update: Mapping[str, np.ndarray], std: float, noise: SecureGaussian) -> Weights:
    if std == 0:
        return {name: np.asarray(array, dtype=np.float32).copy() for name, array in update.items()}
    draws = noise.normal_like(update, std)
    return {
        name: (np.asarray(array, dtype=np.float64) + draws[name]).astype(np.float32)
        for name, array in update.items()
    }


def adaptive_update_noise_multiplier(*, noise_multiplier: float, count_stddev: float) -> float:
    """Return z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), the update noise under adaptive clipping.

    Andrew et al. (NeurIPS 2021, arXiv:1905.03871) release the noised count of unclipped
    clients with std σ_b in every round too. Raising the update noise to z_Δ keeps the total
    privacy cost equal to a plain Gaussian mechanism with multiplier z. Requires 2σ_b > z.
    """
    check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_stddev > noise_multiplier:
        msg = (
            f"count_stddev must exceed noise_multiplier / 2 = {noise_multiplier / 2!r}, got "
            f"{count_stddev!r}; raise count_stddev (a common choice is cohort size / 20) or "
            "lower noise_multiplier"
        )
        raise ValueError(msg)
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


@dataclass
class AdaptiveClipping:
    """Quantile-based adaptive clipping norm (Andrew et al., NeurIPS 2021).

    Every client reports the bit ``norm <= clipping_norm``. The server adds N(0, σ_b²) to the
    sum of bits, divides by the cohort size to estimate the unclipped fraction b̄, and moves
    the norm geometrically: C ← C · exp(−learning_rate · (b̄ − target_quantile)).

    Parameters
    ----------
    clipping_norm
        Current clipping norm, in parameter units, > 0. Starts at the initial value.
    target_quantile
        Fraction of clients whose update norm should fall below the clipping norm, in (0, 1).
    learning_rate
        Step size η of the geometric update, dimensionless, > 0. Larger adapts faster.
    count_stddev
        Std σ_b of the Gaussian noise on the sum of bits, in clients, > 0. Larger is more
        private and makes the quantile estimate noisier.
    """

    clipping_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 1.0

    def __post_init__(self) -> None:
        check_clipping_norm(self.clipping_norm)
        if not 0 < self.target_quantile < 1:
            msg = f"target_quantile must be in (0, 1), got {self.target_quantile!r}"
            raise ValueError(msg)
        if not self.learning_rate > 0:
            msg = f"learning_rate must be > 0, got {self.learning_rate!r}"
            raise ValueError(msg)
        if not self.count_stddev > 0:
            msg = f"count_stddev must be > 0 clients, got {self.count_stddev!r}"
            raise ValueError(msg)

    def client_bit(self, norm: float) -> int:
        """Return 1 when an update of this norm passes unclipped, else 0."""
        return 1 if norm <= self.clipping_norm else 0

    def bit_noise_share_std(self, *, min_cohort: int) -> float:
        """Return the std of one client's noise share on its bit under secure aggregation."""
        return self.count_stddev / math.sqrt(min_cohort)

    def noisy_bit_sum(self, bits: list[int], noise: SecureGaussian) -> float:
        """Return the sum of bits plus N(0, σ_b²) (server side, no secure aggregation)."""
        return float(sum(bits) + noise.standard_normal(1)[0] * self.count_stddev)

    def update(self, *, noisy_bit_sum: float, cohort_size: int) -> float:
        """Move the clipping norm toward the target quantile and return the new value."""
        if cohort_size < 1:
            msg = f"cohort_size must be >= 1 client, got {cohort_size!r}"
            raise ValueError(msg)
        unclipped_fraction = noisy_bit_sum / cohort_size
        step = -self.learning_rate * (unclipped_fraction - self.target_quantile)
        self.clipping_norm *= math.exp(step)
        return self.clipping_norm
