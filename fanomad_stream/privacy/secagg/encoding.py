"""Fixed-point encoding of float vectors into the ring Z_(2^bits) used by secure aggregation.

A client clips each value to [-clip_range, clip_range], multiplies it by its weight in
[0, max_weight], scales by ``2^scale_bits`` and rounds stochastically (up with probability
equal to the fractional part), so the rounding is unbiased. Adding ``offset`` makes every
encoded value non-negative. The sum of ``n`` encoded vectors is then below
n · 2 · offset + 1, which fixes the ring size: ``bits`` is the smallest width holding that
bound. A codec whose bound does not fit ``max_bits`` is rejected at construction, so the sum
can never wrap. Values outside the range are clipped and counted, never wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fanomad_stream.errors import ConfigError

# The server subtracts n · offset in int64 after summing, so 62 bits leaves room for the sign.
MAX_RING_BITS = 62


@dataclass(frozen=True)
class EncodedVector:
    """A vector encoded in Z_(2^bits), with how many of its values had to be clipped."""

    values: np.ndarray
    clipped_values: int


@dataclass(frozen=True)
class FixedPointCodec:
    """Encoder and decoder between float vectors and Z_(2^bits) for a cohort of clients.

    Parameters
    ----------
    clip_range
        Largest absolute value of one coordinate before weighting, in parameter units, > 0.
        Larger coordinates are clipped to it and counted. After L2 clipping to C no
        coordinate exceeds C, but a client's DP noise share comes on top. Clipping a noised
        value is not post-processing of the noised sum, so a round with a non-zero clipped
        count has no DP guarantee: size the range as C plus several noise-share stds.
    scale_bits
        Fixed-point precision: one unit is 2^scale_bits steps, so the rounding step is
        2^-scale_bits, >= 0.
    max_clients
        Largest number of encoded vectors that will be summed, >= 1 (the cohort size).
    max_weight
        Largest weight a client may multiply its vector by, > 0. Use 1 with DP-FedAvg.
    max_bits
        Largest ring width the deployment accepts, in bits, 1 to 62. Values up to 32 bits
        travel as uint32, larger ones as uint64.
    """

    clip_range: float
    scale_bits: int
    max_clients: int
    max_weight: float = 1.0
    max_bits: int = 32
    offset: int = field(init=False)
    bits: int = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(f"clip_range must be a finite number > 0, got {self.clip_range!r}")
        if self.scale_bits < 0:
            raise ConfigError(f"scale_bits must be >= 0, got {self.scale_bits!r}")
        if self.max_clients < 1:
            raise ConfigError(f"max_clients must be >= 1, got {self.max_clients!r}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"max_weight must be a finite number > 0, got {self.max_weight!r}")
        if not 1 <= self.max_bits <= MAX_RING_BITS:
            raise ConfigError(f"max_bits must be in [1, {MAX_RING_BITS}], got {self.max_bits!r}")
        offset = math.ceil(self.max_weight * self.clip_range * 2**self.scale_bits)
        bits = (self.max_clients * 2 * offset).bit_length()
        if bits > self.max_bits:
            msg = (
                f"a sum of {self.max_clients} clients with clip_range={self.clip_range}, "
                f"max_weight={self.max_weight} and scale_bits={self.scale_bits} needs a "
                f"{bits}-bit ring, above max_bits={self.max_bits}; it could overflow. Lower "
                "scale_bits, clip_range or max_clients, or raise max_bits"
            )
            raise ConfigError(msg)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "bits", bits)

    @property
    def wire_dtype(self) -> np.dtype[np.unsignedinteger]:
        """The smallest unsigned dtype that holds ring elements on the wire."""
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    def encode(
        self, vector: np.ndarray, *, weight: float = 1.0, rng: np.random.Generator
    ) -> EncodedVector:
        """Encode ``weight · clip(vector)`` as uint64 ring elements with stochastic rounding.

        ``rng`` provides the rounding randomness. Raises ValueError on NaN or infinite values
        and on a weight outside [0, max_weight].
        """
        values = np.asarray(vector, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise ValueError("vector contains NaN or infinite values; they cannot be encoded")
        if not 0 <= weight <= self.max_weight:
            msg = f"weight must be in [0, max_weight={self.max_weight}], got {weight!r}"
            raise ValueError(msg)
        outside = int(np.count_nonzero(np.abs(values) > self.clip_range))
        clipped = np.clip(values, -self.clip_range, self.clip_range)
        scaled = clipped * weight * 2.0**self.scale_bits
        floor = np.floor(scaled)
        rounded = floor + (rng.random(scaled.shape) < scaled - floor)
        # Rounding up can reach ceil(max_weight · clip_range · 2^scale_bits) = offset at most.
        encoded = (np.clip(rounded, -self.offset, self.offset) + self.offset).astype(np.uint64)
        return EncodedVector(encoded, outside)

    def decode_sum(self, total: np.ndarray, *, count: int) -> np.ndarray:
        """Decode the ring sum of ``count`` encoded vectors into the float64 sum of inputs."""
        if not 0 <= count <= self.max_clients:
            msg = f"count must be in [0, max_clients={self.max_clients}], got {count!r}"
            raise ValueError(msg)
        ring = np.asarray(total, dtype=np.uint64) & np.uint64((1 << self.bits) - 1)
        signed = ring.astype(np.int64) - np.int64(count * self.offset)
        return signed.astype(np.float64) / 2.0**self.scale_bits


Layout = list[tuple[str, tuple[int, ...]]]


def flatten_update(update: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Return all parameters of ``update`` as one float64 vector, plus the layout to undo it.

    Parameters are taken in sorted name order, so every client of a model gets the same order.
    """
    layout: Layout = [(name, tuple(np.shape(update[name]))) for name in sorted(update)]
    parts = [np.asarray(update[name], dtype=np.float64).ravel() for name, _ in layout]
    vector = np.concatenate(parts) if parts else np.zeros(0)
    return vector, layout


def unflatten_update(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Split ``vector`` back into float32 arrays named and shaped by ``layout``."""
    expected = sum(int(np.prod(shape)) for _, shape in layout)
    if vector.size != expected:
        msg = f"vector has {vector.size} values, the layout needs {expected}"
        raise ValueError(msg)
    arrays: dict[str, np.ndarray] = {}
    begin = 0
    for name, shape in layout:
        size = int(np.prod(shape))
        arrays[name] = vector[begin : begin + size].reshape(shape).astype(np.float32)
        begin += size
    return arrays
