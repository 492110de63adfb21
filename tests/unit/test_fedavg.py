"""FedAvg folding and update validation in the aggregator."""

from __future__ import annotations

import numpy as np
import pytest

from fanomad_stream.errors import RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import WeightedSum, apply_delta, fedavg
from fanomad_stream.federate.aggregator import validate_update

TEMPLATE = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


def _update(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "round": 3,
        "client_id": "a",
        "n_samples": 10,
        "base_version": 3,
        "delta": {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)},
    }
    body.update(changes)
    return body


def test_fedavg_exact_weighted_mean() -> None:
    """Known deltas with weights 1, 3 and 4 give the hand-computed weighted mean."""
    deltas = [
        ({"w": np.full((2, 2), 8.0, np.float32), "b": np.array([1, 0], np.float32)}, 1.0),
        ({"w": np.full((2, 2), 0.0, np.float32), "b": np.array([0, 4], np.float32)}, 3.0),
        ({"w": np.full((2, 2), 2.0, np.float32), "b": np.array([2, 2], np.float32)}, 4.0),
    ]
    mean = fedavg(deltas, TEMPLATE)
    # w: (8*1 + 0*3 + 2*4) / 8 = 2.0; b: ((1+0+8)/8, (0+12+8)/8) = (1.125, 2.5)
    np.testing.assert_array_equal(mean["w"], np.full((2, 2), 2.0, np.float32))
    np.testing.assert_array_equal(mean["b"], np.array([1.125, 2.5], np.float32))
    new = apply_delta({"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}, mean)
    np.testing.assert_array_equal(new["w"], np.full((2, 2), 3.0, np.float32))


def test_zero_total_weight_raises() -> None:
    """A round whose total weight is zero raises RoundError instead of dividing by zero."""
    total = WeightedSum(TEMPLATE)
    total.add({"w": np.ones((2, 2)), "b": np.ones(2)}, 0.0)
    with pytest.raises(RoundError, match=r"total weight 0\.0"):
        total.mean()


@pytest.mark.parametrize(
    ("changes", "allowed", "seen", "reason"),
    [
        ({"client_id": "mallory"}, {"a", "b"}, set(), "unknown_client"),
        ({"round": 2}, None, set(), "stale_round"),
        ({"round": 4}, None, set(), "future_round"),
        ({}, None, {"a"}, "duplicate"),
        ({"n_samples": 0}, None, set(), "no_samples"),
        ({"delta": {"w": np.ones((2, 2), np.float32)}}, None, set(), "parameters"),
        (
            {"delta": {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}},
            None,
            set(),
            "shape",
        ),
        (
            {"delta": {"w": np.full((2, 2), np.nan, np.float32), "b": np.ones(2, np.float32)}},
            None,
            set(),
            "not_finite",
        ),
    ],
)
def test_invalid_update_rejected(
    changes: dict[str, object], allowed: set[str] | None, seen: set[str], reason: str
) -> None:
    """Each invalid update is rejected with its reason code before any arithmetic."""
    with pytest.raises(UpdateRejectedError) as caught:
        validate_update(
            _update(**changes), current_round=3, template=TEMPLATE, allowed=allowed, seen=seen
        )
    assert caught.value.reason == reason


def test_valid_update_accepted() -> None:
    """A well-formed update for the open round passes validation."""
    validate_update(_update(), current_round=3, template=TEMPLATE, allowed={"a"}, seen=set())
