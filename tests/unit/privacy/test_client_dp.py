"""Clipping, noise and adaptive clipping for client-level DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fanomad_stream.privacy.dp import (
    AdaptiveClipping,
    SecureGaussian,
    adaptive_update_noise_multiplier,
    add_sum_noise,
    clip_update,
    noise_share_std,
    privatize_client_update,
    update_norm,
)


def _update(scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": (rng.standard_normal((4, 3)) * scale).astype(np.float32),
        "b": (rng.standard_normal(3) * scale).astype(np.float32),
    }


class TestClipping:
    def test_large_update_clipped_to_norm(self) -> None:
        """An update above C comes out with flat norm C and the same direction."""
        update = _update(10.0)
        result = clip_update(update, clipping_norm=1.5)
        assert result.clipped
        assert update_norm(result.update) == pytest.approx(1.5, rel=1e-5)
        np.testing.assert_allclose(result.update["w"] / result.scale, update["w"], rtol=1e-5)

    def test_small_update_unchanged(self) -> None:
        """An update below C is returned unchanged with scale 1."""
        update = _update(0.01)
        result = clip_update(update, clipping_norm=10.0)
        assert not result.clipped
        np.testing.assert_array_equal(result.update["b"], update["b"])

    def test_all_zero_update_handled(self) -> None:
        """An all-zero update stays zero and causes no division by zero."""
        zero = {"w": np.zeros((2, 2), np.float32)}
        result = clip_update(zero, clipping_norm=1.0)
        assert result.norm == 0.0
        assert result.scale == 1.0
        assert not np.any(result.update["w"])

    def test_non_finite_update_rejected(self) -> None:
        """NaN in an update raises ValueError before clipping."""
        with pytest.raises(ValueError, match="NaN"):
            clip_update({"w": np.array([np.nan], np.float32)}, clipping_norm=1.0)

    @pytest.mark.parametrize("norm", [0.0, -1.0, math.inf, math.nan])
    def test_invalid_clipping_norm_rejected(self, norm: float) -> None:
        """C must be finite and > 0."""
        with pytest.raises(ValueError, match="clipping_norm"):
            clip_update(_update(1.0), clipping_norm=norm)


class TestSecureGaussian:
    def test_draws_are_standard_normal(self) -> None:
        """200k draws pass a Kolmogorov–Smirnov test against N(0, 1)."""
        draws = SecureGaussian(test_seed=1).standard_normal(200_001)
        assert draws.shape == (200_001,)
        assert stats.kstest(draws, "norm").pvalue > 1e-3

    def test_unseeded_generators_differ(self) -> None:
        """Two generators keyed from os.urandom give different noise."""
        first = SecureGaussian().standard_normal(8)
        second = SecureGaussian().standard_normal(8)
        assert not np.array_equal(first, second)

    def test_test_seed_reproducible(self) -> None:
        """The same test seed gives the same draws and is flagged as deterministic."""
        first = SecureGaussian(test_seed=7)
        second = SecureGaussian(test_seed=7)
        assert first.deterministic
        np.testing.assert_array_equal(first.standard_normal(5), second.standard_normal(5))

    def test_stream_continues_between_calls(self) -> None:
        """Consecutive calls draw fresh values, never the same block twice."""
        noise = SecureGaussian(test_seed=3)
        assert not np.array_equal(noise.standard_normal(4), noise.standard_normal(4))


class TestNoise:
    def test_shares_sum_to_target_std(self) -> None:
        """min_cohort noise shares of std zC/sqrt(m) sum to noise with std zC."""
        clipping_norm, z, m = 2.0, 1.5, 5
        zero = {"w": np.zeros(40_000, np.float32)}
        noise = SecureGaussian(test_seed=11)
        total = np.zeros(40_000)
        for _ in range(m):
            share = privatize_client_update(
                zero, clipping_norm=clipping_norm, noise_multiplier=z, min_cohort=m, noise=noise
            )
            assert share.noise_std == pytest.approx(z * clipping_norm / math.sqrt(m))
            total += share.update["w"]
        assert float(np.std(total)) == pytest.approx(z * clipping_norm, rel=0.02)

    def test_server_noise_std(self) -> None:
        """add_sum_noise adds noise with std z·C."""
        zero = {"w": np.zeros(40_000, np.float32)}
        noised = add_sum_noise(
            zero, clipping_norm=0.5, noise_multiplier=2.0, noise=SecureGaussian(test_seed=2)
        )
        assert float(np.std(noised["w"])) == pytest.approx(1.0, rel=0.02)

    def test_zero_multiplier_adds_nothing(self) -> None:
        """z = 0 leaves the clipped update exactly as it was."""
        update = _update(0.1)
        out = privatize_client_update(
            update, clipping_norm=10.0, noise_multiplier=0.0, min_cohort=3, noise=SecureGaussian()
        )
        np.testing.assert_array_equal(out.update["w"], update["w"])

    def test_invalid_min_cohort_rejected(self) -> None:
        """min_cohort below 1 raises ValueError."""
        with pytest.raises(ValueError, match="min_cohort"):
            noise_share_std(clipping_norm=1.0, noise_multiplier=1.0, min_cohort=0)


class TestAdaptiveClipping:
    def test_noise_correction_formula(self) -> None:
        """z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) and exceeds z."""
        z_delta = adaptive_update_noise_multiplier(noise_multiplier=1.0, count_stddev=1.0)
        assert z_delta == pytest.approx((1 - 0.25) ** -0.5)
        assert z_delta > 1.0

    def test_too_small_count_noise_rejected(self) -> None:
        """σ_b <= z/2 makes the correction undefined and raises ValueError."""
        with pytest.raises(ValueError, match="count_stddev"):
            adaptive_update_noise_multiplier(noise_multiplier=2.0, count_stddev=1.0)

    def test_norm_converges_to_quantile(self) -> None:
        """With norms uniform in [0, 10] and γ = 0.5, C moves toward the median 5."""
        clipping = AdaptiveClipping(
            clipping_norm=0.1, target_quantile=0.5, learning_rate=0.2, count_stddev=0.5
        )
        noise = SecureGaussian(test_seed=5)
        norms = np.linspace(0, 10, 50)
        for _ in range(300):
            bits = [clipping.client_bit(float(n)) for n in norms]
            clipping.update(
                noisy_bit_sum=clipping.noisy_bit_sum(bits, noise), cohort_size=len(bits)
            )
        assert clipping.clipping_norm == pytest.approx(5.0, rel=0.15)

    def test_invalid_quantile_rejected(self) -> None:
        """target_quantile outside (0, 1) raises ValueError."""
        with pytest.raises(ValueError, match="target_quantile"):
            AdaptiveClipping(clipping_norm=1.0, target_quantile=1.0)
