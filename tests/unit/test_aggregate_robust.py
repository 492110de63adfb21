"""Pure aggregation functions: median, trimmed mean, norm clipping and update checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.errors import RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import (
    check_update,
    clip_by_norm,
    coordinate_median,
    l2_norm,
    trimmed_mean,
)


def _vector(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


class TestCoordinateMedian:
    def test_median_odd_count(self) -> None:
        """Each coordinate takes the middle value of three updates, outliers ignored."""
        deltas = [_vector(1.0, 10.0), _vector(2.0, 20.0), _vector(100.0, -5.0)]
        result = coordinate_median(deltas)
        np.testing.assert_array_equal(result["w"], np.array([2.0, 10.0], dtype=np.float32))

    def test_median_even_count(self) -> None:
        """With four updates each coordinate is the mean of its two middle values."""
        deltas = [_vector(1.0), _vector(2.0), _vector(3.0), _vector(10.0)]
        result = coordinate_median(deltas)
        np.testing.assert_array_equal(result["w"], np.array([2.5], dtype=np.float32))

    def test_median_keeps_shapes(self) -> None:
        """Parameters of any shape come back with their shape and dtype float32."""
        deltas = [{"m": np.full((2, 3), float(i), dtype=np.float32)} for i in range(3)]
        result = coordinate_median(deltas)
        assert result["m"].shape == (2, 3)
        assert result["m"].dtype == np.float32
        np.testing.assert_array_equal(result["m"], np.ones((2, 3), dtype=np.float32))

    def test_median_of_nothing_raises(self) -> None:
        """A round without updates has no median."""
        with pytest.raises(RoundError, match="zero updates"):
            coordinate_median([])


class TestTrimmedMean:
    @pytest.mark.parametrize(
        ("trim_fraction", "expected"),
        [
            (0.0, 22.0),  # floor(0 * 5) = 0 dropped: (1 + 2 + 3 + 4 + 100) / 5
            (0.19, 22.0),  # floor(0.95) = 0 dropped
            (0.2, 3.0),  # floor(1.0) = 1 dropped at each end: (2 + 3 + 4) / 3
            (0.4, 3.0),  # floor(2.0) = 2 dropped at each end: 3
        ],
    )
    def test_trimmed_mean_drops_ends(self, trim_fraction: float, expected: float) -> None:
        """floor(beta * n) values are dropped at each end before averaging."""
        deltas = [_vector(v) for v in (4.0, 100.0, 1.0, 3.0, 2.0)]
        result = trimmed_mean(deltas, trim_fraction)
        np.testing.assert_array_equal(result["w"], np.array([expected], dtype=np.float32))

    def test_trimmed_mean_per_coordinate(self) -> None:
        """Each coordinate is sorted on its own, so outliers of different clients both go."""
        deltas = [_vector(-50.0, 1.0), _vector(1.0, 2.0), _vector(2.0, 90.0), _vector(3.0, 3.0)]
        result = trimmed_mean(deltas, 0.25)
        # Coordinate 0 keeps {1, 2}; coordinate 1 keeps {2, 3}.
        np.testing.assert_array_equal(result["w"], np.array([1.5, 2.5], dtype=np.float32))

    @pytest.mark.parametrize("trim_fraction", [-0.1, 0.5, 0.7])
    def test_trim_fraction_out_of_range(self, trim_fraction: float) -> None:
        """beta outside [0, 0.5) would drop every value, so it is rejected."""
        with pytest.raises(ValueError, match="trim_fraction"):
            trimmed_mean([_vector(1.0)], trim_fraction)


class TestClipByNorm:
    def test_norm_over_all_parameters(self) -> None:
        """The norm is taken over all parameters flattened together."""
        delta = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([4.0], np.float32)}
        assert l2_norm(delta) == 5.0

    def test_long_delta_scaled_to_bound(self) -> None:
        """A delta of norm 5 bounded to 1 is scaled by 1/5 and keeps its direction."""
        delta = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([4.0], np.float32)}
        clipped, norm = clip_by_norm(delta, 1.0)
        assert norm == 5.0
        np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-7)
        np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-7)
        assert math.isclose(l2_norm(clipped), 1.0, rel_tol=1e-6)

    def test_short_delta_unchanged(self) -> None:
        """A delta within the bound comes back with the same values."""
        delta = _vector(0.3, 0.4)
        clipped, norm = clip_by_norm(delta, 1.0)
        assert math.isclose(norm, 0.5, rel_tol=1e-6)
        np.testing.assert_array_equal(clipped["w"], delta["w"])

    def test_zero_delta_unchanged(self) -> None:
        """An all-zero delta has norm 0 and is returned without a division by zero."""
        clipped, norm = clip_by_norm(_vector(0.0, 0.0), 1.0)
        assert norm == 0.0
        np.testing.assert_array_equal(clipped["w"], np.zeros(2, dtype=np.float32))

    @pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan])
    def test_invalid_bound_rejected(self, max_norm: float) -> None:
        """The bound must be a finite positive number."""
        with pytest.raises(ValueError, match="max_norm"):
            clip_by_norm(_vector(1.0), max_norm)


TEMPLATE = {"w": np.zeros(2, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}


class TestCheckUpdate:
    @pytest.mark.parametrize(
        ("delta", "n_samples", "reason"),
        [
            ({"w": np.zeros(2), "b": np.zeros(1)}, -1.0, "invalid_weight"),
            ({"w": np.zeros(2), "b": np.zeros(1)}, math.nan, "invalid_weight"),
            ({"w": np.zeros(2), "b": np.zeros(1)}, True, "invalid_weight"),
            ({"w": np.zeros(2)}, 1.0, "missing_parameter"),
            ({"w": np.zeros(2), "b": np.zeros(1), "x": np.zeros(1)}, 1.0, "unknown_parameter"),
            ({"w": np.zeros(3), "b": np.zeros(1)}, 1.0, "shape_mismatch"),
            ({"w": np.array([0.0, np.inf]), "b": np.zeros(1)}, 1.0, "non_finite"),
            ({"w": np.array([np.nan, 0.0]), "b": np.zeros(1)}, 1.0, "non_finite"),
        ],
    )
    def test_bad_update_reason(
        self, delta: dict[str, np.ndarray], n_samples: float, reason: str
    ) -> None:
        """Each kind of malformed update is rejected with its own reason."""
        with pytest.raises(UpdateRejectedError) as caught:
            check_update(delta, n_samples, TEMPLATE)
        assert caught.value.reason == reason

    def test_good_update_passes(self) -> None:
        """A delta with every parameter in shape and a weight >= 0 passes."""
        check_update({"w": np.ones(2), "b": np.ones(1)}, 0.0, TEMPLATE)
