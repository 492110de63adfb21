"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 − 1).

The field is larger than any 256-bit secret, so a secret is one field element and a share is
one field element (66 bytes). Any ``threshold`` shares rebuild the secret by Lagrange
interpolation at 0; fewer reveal nothing about it, because the other polynomial coefficients
are uniform in the field (drawn with ``secrets``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

# 2^521 − 1 is a Mersenne prime, so the field has more elements than there are 256-bit secrets.
PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8
SECRET_BYTES = 32


def split_secret(secret: bytes, *, threshold: int, points: Iterable[int]) -> dict[int, bytes]:
    """Split a 32-byte ``secret`` into one share per x-coordinate in ``points``.

    Parameters
    ----------
    secret
        The secret, exactly 32 bytes.
    threshold
        Number of shares needed to rebuild the secret, >= 1 and <= the number of points.
    points
        Distinct x-coordinates in [1, PRIME), one per shareholder.
    """
    xs = list(points)
    if len(secret) != SECRET_BYTES:
        msg = f"secret must be {SECRET_BYTES} bytes, got {len(secret)}"
        raise ValueError(msg)
    if not 1 <= threshold <= len(xs):
        msg = f"threshold must be between 1 and the number of shares ({len(xs)}), got {threshold}"
        raise ValueError(msg)
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        msg = f"share x-coordinates must be distinct and in [1, PRIME), got {xs!r}"
        raise ValueError(msg)
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine_shares(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Rebuild the 32-byte secret from at least ``threshold`` shares keyed by x-coordinate.

    Raises ValueError with fewer shares, or when the interpolated value is not a 32-byte
    secret (the shares are inconsistent or come from different secrets).
    """
    if len(shares) < threshold:
        msg = f"need {threshold} shares to rebuild the secret, got {len(shares)}"
        raise ValueError(msg)
    chosen = sorted(shares.items())[:threshold]
    points = [(x, int.from_bytes(y, "big")) for x, y in chosen]
    value = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        value = (value + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if value >= 2 ** (8 * SECRET_BYTES):
        msg = "shares are inconsistent: the rebuilt value is not a 32-byte secret"
        raise ValueError(msg)
    return value.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    """Evaluate the polynomial with ``coefficients`` (constant term first) at ``x`` by Horner."""
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result
