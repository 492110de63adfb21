"""Buffered asynchronous aggregation: staleness weights, buffers, duplicates and state."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fanomad_stream.federate.buffered import (
    BufferedAsyncAggregator,
    StalenessFunction,
    staleness_weight,
)
from fanomad_stream.federate.robust import CoordinateMedian, NormBounding
from fanomad_stream.federate.server_optimizers import FedAdam
from fanomad_stream.federate.strategies import FedAvg, Strategy

StateRoundTrip = Callable[[dict[str, Any]], dict[str, Any]]


def _vector(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def _aggregator(
    strategy: Strategy | None = None,
    *,
    buffer_size: int = 2,
    max_staleness: int = 3,
    staleness: StalenessFunction | None = None,
    weight_by_samples: bool = True,
) -> BufferedAsyncAggregator:
    return BufferedAsyncAggregator(
        FedAvg() if strategy is None else strategy,
        _vector(0.0, 0.0),
        buffer_size=buffer_size,
        max_staleness=max_staleness,
        staleness=StalenessFunction("constant") if staleness is None else staleness,
        weight_by_samples=weight_by_samples,
    )


class TestStalenessWeight:
    @pytest.mark.parametrize(
        ("kind", "staleness", "a", "b", "expected"),
        [
            ("constant", 0, 0.5, 4, 1.0),
            ("constant", 9, 0.5, 4, 1.0),
            ("polynomial", 0, 0.5, 4, 1.0),
            ("polynomial", 3, 0.5, 4, 0.5),  # (1 + 3) ** -0.5
            ("polynomial", 1, 2.0, 4, 0.25),  # (1 + 1) ** -2
            ("hinge", 2, 0.5, 2, 1.0),  # at b the weight is still 1
            ("hinge", 4, 0.5, 2, 0.5),  # 1 / (0.5 * (4 - 2) + 1)
            ("hinge", 12, 0.25, 4, 1.0 / 3.0),  # 1 / (0.25 * 8 + 1)
        ],
    )
    def test_staleness_weight_values(
        self, kind: Any, staleness: int, a: float, b: int, expected: float
    ) -> None:
        """Each staleness function gives its hand-computed weight."""
        assert math.isclose(staleness_weight(kind, staleness, a=a, b=b), expected, rel_tol=1e-15)

    @pytest.mark.parametrize("kind", ["constant", "polynomial", "hinge"])
    def test_weights_never_increase(self, kind: Any) -> None:
        """Every function is 1 when fresh and does not increase with staleness."""
        function = StalenessFunction(kind, a=0.7, b=2)
        weights = [function(staleness) for staleness in range(20)]
        assert weights[0] == 1.0
        assert all(later <= earlier for earlier, later in itertools.pairwise(weights))

    def test_invalid_function_rejected(self) -> None:
        """Unknown kinds, negative parameters and negative staleness raise ValueError."""
        with pytest.raises(ValueError, match="unknown staleness function"):
            StalenessFunction("cubic")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="a must be"):
            StalenessFunction("polynomial", a=-1.0)
        with pytest.raises(ValueError, match="staleness must be"):
            staleness_weight("constant", -1, a=0.5, b=4)


class TestBufferedAggregation:
    def test_buffer_applies_every_k(self) -> None:
        """The first update is buffered and the second applies the weighted mean as version 1."""
        aggregator = _aggregator(buffer_size=2)
        first = aggregator.submit("a", 0, _vector(2.0, 4.0), 1.0)
        assert first.status == "buffered"
        assert first.version == 0
        second = aggregator.submit("b", 0, _vector(4.0, 0.0), 3.0)
        assert second.status == "applied"
        assert second.version == 1
        assert second.clients == ("a", "b")
        # ((2 + 12) / 4, (4 + 0) / 4)
        np.testing.assert_array_equal(
            aggregator.global_weights["w"], np.array([3.5, 1.0], dtype=np.float32)
        )
        assert aggregator.buffered == 0

    def test_stale_update_discounted(self) -> None:
        """An update one version old weighs (1 + 1) ** -1 = 0.5 under the polynomial a = 1."""
        aggregator = _aggregator(buffer_size=1, staleness=StalenessFunction("polynomial", a=1.0))
        aggregator.submit("a", 0, _vector(1.0, 1.0), 1.0)
        result = aggregator.submit("b", 0, _vector(2.0, -2.0), 1.0)
        assert result.staleness == 1
        assert result.weight == 0.5
        # Version 1 is (1, 1); the stale delta adds 0.5 * (2, -2).
        np.testing.assert_array_equal(
            aggregator.global_weights["w"], np.array([2.0, 0.0], dtype=np.float32)
        )

    def test_fresh_and_stale_in_one_buffer(self) -> None:
        """A buffer mixing a fresh and a stale update is not renormalised by the staleness."""
        aggregator = _aggregator(buffer_size=1, staleness=StalenessFunction("polynomial", a=1.0))
        aggregator.submit("a", 0, _vector(0.0, 0.0), 1.0)
        aggregator.buffer_size = 2
        aggregator.submit("b", 1, _vector(4.0, 0.0), 1.0)
        aggregator.submit("c", 0, _vector(4.0, 0.0), 1.0)
        # (1 * 4 + 0.5 * 4) / (1 + 1) = 3.
        np.testing.assert_array_equal(
            aggregator.global_weights["w"], np.array([3.0, 0.0], dtype=np.float32)
        )

    def test_uniform_weighting_ignores_samples(self) -> None:
        """With weight_by_samples off, the buffer is a plain mean as in FedBuff."""
        aggregator = _aggregator(buffer_size=2, weight_by_samples=False)
        aggregator.submit("a", 0, _vector(2.0, 4.0), 1.0)
        aggregator.submit("b", 0, _vector(4.0, 0.0), 3.0)
        np.testing.assert_array_equal(
            aggregator.global_weights["w"], np.array([3.0, 2.0], dtype=np.float32)
        )

    def test_stale_beyond_max_rejected(self) -> None:
        """An update staler than max_staleness is rejected with a reason and not folded."""
        aggregator = _aggregator(buffer_size=1, max_staleness=1)
        aggregator.submit("a", 0, _vector(1.0, 1.0), 1.0)
        aggregator.submit("a", 1, _vector(1.0, 1.0), 1.0)
        result = aggregator.submit("b", 0, _vector(100.0, 100.0), 1.0)
        assert result.status == "rejected"
        assert result.reason == "too_stale"
        assert result.staleness == 2
        assert aggregator.version == 2
        assert aggregator.buffered == 0
        np.testing.assert_array_equal(aggregator.global_weights["w"], np.full(2, 2.0, np.float32))

    def test_update_at_max_staleness_accepted(self) -> None:
        """An update exactly max_staleness versions old is still folded."""
        aggregator = _aggregator(buffer_size=1, max_staleness=1)
        aggregator.submit("a", 0, _vector(1.0, 1.0), 1.0)
        assert aggregator.submit("b", 0, _vector(1.0, 1.0), 1.0).status == "applied"

    def test_future_version_rejected(self) -> None:
        """An update that claims a version the aggregator has not published is rejected."""
        result = _aggregator().submit("a", 5, _vector(1.0, 1.0), 1.0)
        assert result.status == "rejected"
        assert result.reason == "future_version"

    def test_malformed_update_rejected(self) -> None:
        """A delta that does not fit the model is rejected with the reason from check_update."""
        aggregator = _aggregator()
        result = aggregator.submit("a", 0, _vector(1.0, 1.0, 1.0), 1.0)
        assert result.status == "rejected"
        assert result.reason == "shape_mismatch"
        assert aggregator.buffered == 0

    def test_duplicate_folded_once(self) -> None:
        """A redelivered update is reported as a duplicate and counts once toward K."""
        aggregator = _aggregator(buffer_size=2)
        assert aggregator.submit("a", 0, _vector(2.0, 2.0), 1.0).status == "buffered"
        assert aggregator.submit("a", 0, _vector(2.0, 2.0), 1.0).status == "duplicate"
        assert aggregator.buffered == 1
        aggregator.submit("b", 0, _vector(0.0, 0.0), 1.0)
        np.testing.assert_array_equal(aggregator.global_weights["w"], np.ones(2, np.float32))

    def test_duplicate_after_apply_detected(self) -> None:
        """A redelivery after its buffer was applied is still a duplicate, not a new fold."""
        aggregator = _aggregator(buffer_size=1)
        aggregator.submit("a", 0, _vector(2.0, 2.0), 1.0)
        result = aggregator.submit("a", 0, _vector(2.0, 2.0), 1.0)
        assert result.status == "duplicate"
        assert aggregator.version == 1

    def test_update_id_separates_windows(self) -> None:
        """Two windows from the same base version with their own update_id both count."""
        aggregator = _aggregator(buffer_size=2)
        aggregator.submit("a", 0, _vector(2.0, 2.0), 1.0, update_id=10)
        result = aggregator.submit("a", 0, _vector(4.0, 4.0), 1.0, update_id=11)
        assert result.status == "applied"
        np.testing.assert_array_equal(aggregator.global_weights["w"], np.full(2, 3.0, np.float32))

    def test_expired_keys_forgotten(self) -> None:
        """Keys too stale to be accepted again leave the seen map, and a late copy is rejected."""
        aggregator = _aggregator(buffer_size=1, max_staleness=1)
        for version in range(4):
            aggregator.submit("a", version, _vector(1.0, 1.0), 1.0)
        assert [key[2] for key in aggregator.state_dict()["seen"]] == [3]
        late = aggregator.submit("a", 0, _vector(1.0, 1.0), 1.0)
        assert late.status == "rejected"
        assert late.reason == "too_stale"

    def test_zero_weight_buffer_discarded(self) -> None:
        """A full buffer of zero-sample updates leaves the model and version unchanged."""
        aggregator = _aggregator(buffer_size=1)
        result = aggregator.submit("a", 0, _vector(9.0, 9.0), 0.0)
        assert result.status == "buffer_discarded"
        assert aggregator.version == 0
        assert aggregator.buffered == 0
        np.testing.assert_array_equal(aggregator.global_weights["w"], np.zeros(2, np.float32))

    def test_median_buffer(self) -> None:
        """A robust strategy combines the buffer: the median of three deltas is applied."""
        aggregator = _aggregator(CoordinateMedian(), buffer_size=3)
        for client, value in (("a", 1.0), ("b", 50.0), ("c", 2.0)):
            result = aggregator.submit(client, 0, _vector(value, -value), 1.0)
        assert result.status == "applied"
        np.testing.assert_array_equal(
            aggregator.global_weights["w"], np.array([2.0, -2.0], dtype=np.float32)
        )

    def test_norm_bound_applies_to_buffer(self) -> None:
        """Under a norm-bounding wrapper a long delta moves the model by at most the bound."""
        aggregator = _aggregator(NormBounding(FedAvg(), max_norm=1.0), buffer_size=1)
        aggregator.submit("a", 0, _vector(3.0, 4.0), 1.0)
        np.testing.assert_allclose(aggregator.global_weights["w"], [0.6, 0.8], rtol=1e-6)

    @pytest.mark.parametrize(
        ("kwargs", "name"),
        [({"buffer_size": 0}, "buffer_size"), ({"max_staleness": -1}, "max_staleness")],
    )
    def test_invalid_settings_rejected(self, kwargs: dict[str, int], name: str) -> None:
        """A buffer size below 1 or a negative maximum staleness raise ValueError."""
        with pytest.raises(ValueError, match=name):
            _aggregator(**kwargs)  # type: ignore[arg-type]


SUBMISSIONS = [
    ("a", 0, (1.0, 2.0), 5.0),
    ("b", 0, (-1.0, 0.5), 2.0),
    ("c", 0, (0.25, 0.25), 1.0),
    ("a", 1, (2.0, -2.0), 4.0),
    ("b", 1, (3.0, 3.0), 1.0),
    ("e", 0, (0.5, 1.5), 3.0),  # staleness 1 when it arrives
    ("d", 1, (1.0, 1.0), 2.0),  # staleness 1, left in the buffer of version 2
]


@pytest.mark.parametrize(
    "build",
    [FedAvg, lambda: FedAdam(eta=0.1, tau=0.01), CoordinateMedian],
    ids=["FedAvg", "FedAdam", "CoordinateMedian"],
)
def test_state_round_trip_resumes(build: Callable[[], Strategy], through_msgpack: Any) -> None:
    """Restored mid-buffer from its msgpack state, the aggregator ends bitwise as uninterrupted.

    The restored aggregator also recognises a redelivery of an update folded before the
    checkpoint as a duplicate.
    """

    def fresh() -> BufferedAsyncAggregator:
        return _aggregator(build(), buffer_size=3, staleness=StalenessFunction("polynomial", a=0.5))

    uninterrupted = fresh()
    for client, base, values, n_samples in SUBMISSIONS:
        uninterrupted.submit(client, base, _vector(*values), n_samples)

    first = fresh()
    for client, base, values, n_samples in SUBMISSIONS[:4]:
        first.submit(client, base, _vector(*values), n_samples)
    assert first.buffered == 1
    restored = fresh()
    restored.load_state_dict(through_msgpack(first.state_dict()))
    assert restored.version == first.version
    assert restored.buffered == 1

    redelivered = SUBMISSIONS[3]
    duplicate = restored.submit(redelivered[0], redelivered[1], _vector(*redelivered[2]), 4.0)
    assert duplicate.status == "duplicate"
    for client, base, values, n_samples in SUBMISSIONS[4:]:
        restored.submit(client, base, _vector(*values), n_samples)

    assert restored.version == uninterrupted.version == 2
    np.testing.assert_array_equal(restored.global_weights["w"], uninterrupted.global_weights["w"])


def test_restore_with_other_settings_rejected() -> None:
    """A checkpoint written with another buffer size cannot be loaded."""
    state = _aggregator(buffer_size=2).state_dict()
    with pytest.raises(ValueError, match="buffer_size"):
        _aggregator(buffer_size=3).load_state_dict(state)
