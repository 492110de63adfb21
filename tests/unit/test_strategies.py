"""Strategies: exact results on hand-computed rounds, delegation, validation and state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from fanomad_stream.errors import RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.robust import CoordinateMedian, NormBounding, TrimmedMean
from fanomad_stream.federate.server_optimizers import FedAdam
from fanomad_stream.federate.strategies import FedAvg, FedProx, Strategy, StrategyWrapper
from fanomad_stream.transport.codec import encode

StateRoundTrip = Callable[[dict[str, Any]], dict[str, Any]]


def _vector(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def _round(strategy: Strategy, start: Weights, updates: list[tuple[Weights, float]]) -> Weights:
    strategy.begin_round(start)
    for delta, n_samples in updates:
        strategy.fold(delta, n_samples)
    return strategy.finish_round()


class TestFedAvg:
    def test_fedavg_weights_by_samples(self) -> None:
        """The new model is the start plus the sample-weighted mean of the deltas."""
        updates = [(_vector(2.0, 4.0), 1.0), (_vector(-1.0, 0.0), 3.0)]
        result = _round(FedAvg(), _vector(1.0, 2.0), updates)
        # Mean delta: ((2 - 3) / 4, (4 + 0) / 4) = (-0.25, 1.0).
        np.testing.assert_array_equal(result["w"], np.array([0.75, 3.0], dtype=np.float32))

    def test_fedavg_matches_numpy_average(self) -> None:
        """FedAvg equals an independent np.average with sample weights, per parameter."""
        rng = np.random.default_rng(7)
        start = {
            "layer.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "layer.bias": rng.normal(size=4).astype(np.float32),
        }
        deltas = [
            {name: rng.normal(size=a.shape).astype(np.float32) for name, a in start.items()}
            for _ in range(7)
        ]
        samples = [float(n) for n in rng.integers(1, 500, size=7)]
        result = _round(FedAvg(), start, list(zip(deltas, samples, strict=True)))
        for name in start:
            stacked = np.stack([delta[name] for delta in deltas]).astype(np.float64)
            mean = np.average(stacked, axis=0, weights=samples)
            expected = start[name] + mean.astype(np.float32)
            np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)

    def test_server_learning_rate_scales_step(self) -> None:
        """With eta_g = 0.5 the start moves by half of the mean delta."""
        updates = [(_vector(2.0, 4.0), 1.0), (_vector(-1.0, 0.0), 3.0)]
        result = _round(FedAvg(server_learning_rate=0.5), _vector(1.0, 2.0), updates)
        np.testing.assert_array_equal(result["w"], np.array([0.875, 2.5], dtype=np.float32))

    def test_zero_weight_round_stays_open(self) -> None:
        """A round whose total weight is 0 raises RoundError and can still take updates."""
        strategy = FedAvg()
        strategy.begin_round(_vector(1.0))
        strategy.fold(_vector(5.0), 0.0)
        with pytest.raises(RoundError, match="total weight"):
            strategy.finish_round()
        strategy.fold(_vector(2.0), 2.0)
        np.testing.assert_array_equal(strategy.finish_round()["w"], np.array([3.0], np.float32))

    def test_rejected_update_leaves_round(self) -> None:
        """A malformed update raises with its reason and changes nothing in the round."""
        strategy = FedAvg()
        strategy.begin_round(_vector(0.0, 0.0))
        strategy.fold(_vector(1.0, 1.0), 1.0)
        with pytest.raises(UpdateRejectedError) as caught:
            strategy.fold(_vector(9.0, 9.0, 9.0), 1.0)
        assert caught.value.reason == "shape_mismatch"
        assert strategy.folded == 1
        np.testing.assert_array_equal(strategy.finish_round()["w"], np.ones(2, np.float32))

    def test_fold_without_round_raises(self) -> None:
        """Folding or finishing before begin_round raises RoundError."""
        strategy = FedAvg()
        with pytest.raises(RoundError, match="begin_round"):
            strategy.fold(_vector(1.0), 1.0)
        with pytest.raises(RoundError, match="begin_round"):
            strategy.finish_round()

    def test_finish_twice_raises(self) -> None:
        """A round closes once; a second finish needs a new begin_round."""
        strategy = FedAvg()
        _round(strategy, _vector(0.0), [(_vector(1.0), 1.0)])
        with pytest.raises(RoundError, match="no round is open"):
            strategy.finish_round()

    def test_memory_independent_of_clients(self) -> None:
        """The saved round of FedAvg has the same size after 1 and after 50 updates."""
        sizes = []
        for clients in (1, 50):
            strategy = FedAvg()
            strategy.begin_round(_vector(0.0, 0.0, 0.0))
            for i in range(clients):
                strategy.fold(_vector(float(i), 1.0, 2.0), 1.0)
            sizes.append(len(encode("ledger", strategy.state_dict(), src="t", ts=0.0)))
        assert strategy.streaming
        assert sizes[0] == sizes[1]

    def test_state_round_trip_mid_round(self, through_msgpack: StateRoundTrip) -> None:
        """A round saved after one update and restored elsewhere ends as the uninterrupted one."""
        start = _vector(1.0, -1.0)
        updates = [(_vector(0.5, 0.25), 3.0), (_vector(-2.0, 1.0), 1.0)]
        uninterrupted = _round(FedAvg(), start, updates)

        first = FedAvg()
        first.begin_round(start)
        first.fold(*updates[0])
        restored = FedAvg()
        restored.load_state_dict(through_msgpack(first.state_dict()))
        restored.fold(*updates[1])
        assert restored.folded == 2
        np.testing.assert_array_equal(restored.finish_round()["w"], uninterrupted["w"])


class TestFedProx:
    def test_fedprox_server_equals_fedavg(self) -> None:
        """On the server FedProx gives exactly the FedAvg result."""
        updates = [(_vector(0.1, 0.7), 5.0), (_vector(-0.3, 0.2), 2.0), (_vector(1.5, 0.0), 1.0)]
        fedavg = _round(FedAvg(), _vector(0.2, 0.4), updates)
        fedprox = _round(FedProx(proximal_mu=0.3), _vector(0.2, 0.4), updates)
        np.testing.assert_array_equal(fedprox["w"], fedavg["w"])

    def test_fedprox_configures_mu(self) -> None:
        """Clients receive the proximal weight through configure_clients."""
        assert FedProx(proximal_mu=0.3).configure_clients() == {"proximal_mu": 0.3}
        assert FedAvg().configure_clients() == {}

    @pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf")])
    def test_fedprox_rejects_bad_mu(self, mu: float) -> None:
        """mu must be a finite number >= 0."""
        with pytest.raises(ValueError, match="proximal_mu"):
            FedProx(proximal_mu=mu)


class TestRobust:
    def test_median_round(self) -> None:
        """The median strategy adds the coordinate-wise median, ignoring sample counts."""
        updates = [
            (_vector(1.0, 10.0), 1.0),
            (_vector(2.0, 20.0), 100.0),
            (_vector(9.0, -5.0), 1.0),
        ]
        result = _round(CoordinateMedian(), _vector(1.0, 1.0), updates)
        np.testing.assert_array_equal(result["w"], np.array([3.0, 11.0], dtype=np.float32))

    def test_median_skips_empty_updates(self) -> None:
        """An update with zero samples is counted but takes no part in the median."""
        strategy = CoordinateMedian()
        strategy.begin_round(_vector(0.0))
        for value, n_samples in ((1.0, 1.0), (2.0, 1.0), (50.0, 0.0)):
            strategy.fold(_vector(value), n_samples)
        assert strategy.folded == 3
        np.testing.assert_array_equal(strategy.finish_round()["w"], np.array([1.5], np.float32))

    def test_trimmed_mean_round(self) -> None:
        """With beta = 0.25 and four updates, one value per end and coordinate is dropped."""
        updates = [(_vector(v), 1.0) for v in (-40.0, 1.0, 3.0, 70.0)]
        result = _round(TrimmedMean(trim_fraction=0.25), _vector(10.0), updates)
        np.testing.assert_array_equal(result["w"], np.array([12.0], dtype=np.float32))

    def test_buffered_memory_grows(self) -> None:
        """Median and trimmed mean keep each delta and report ``streaming`` as False."""
        strategy = CoordinateMedian()
        strategy.begin_round(_vector(0.0))
        for i in range(5):
            strategy.fold(_vector(float(i)), 1.0)
        assert not strategy.streaming
        assert len(strategy.state_dict()["accumulator"]["deltas"]) == 5

    def test_trimmed_mean_state_round_trip(self, through_msgpack: StateRoundTrip) -> None:
        """A buffered round restored from its state ends as the uninterrupted one."""
        updates = [(_vector(v), 1.0) for v in (5.0, -3.0, 8.0, 0.5, 2.0)]
        uninterrupted = _round(TrimmedMean(trim_fraction=0.2), _vector(0.0), updates)
        first = TrimmedMean(trim_fraction=0.2)
        first.begin_round(_vector(0.0))
        for delta, n_samples in updates[:3]:
            first.fold(delta, n_samples)
        restored = TrimmedMean(trim_fraction=0.2)
        restored.load_state_dict(through_msgpack(first.state_dict()))
        for delta, n_samples in updates[3:]:
            restored.fold(delta, n_samples)
        np.testing.assert_array_equal(restored.finish_round()["w"], uninterrupted["w"])
        # (2 + 0.5 + 5) / 3 after dropping -3 and 8.
        np.testing.assert_array_equal(uninterrupted["w"], np.array([2.5], dtype=np.float32))

    def test_norm_bounding_clips_before_mean(self) -> None:
        """A delta of norm 5 is scaled to norm 1 before FedAvg averages it."""
        strategy = NormBounding(FedAvg(), max_norm=1.0)
        updates = [(_vector(3.0, 4.0), 1.0), (_vector(0.3, 0.4), 1.0)]
        result = _round(strategy, _vector(0.0, 0.0), updates)
        # ((0.6 + 0.3) / 2, (0.8 + 0.4) / 2)
        np.testing.assert_allclose(result["w"], [0.45, 0.6], rtol=1e-6)
        assert strategy.clipped == 1

    def test_norm_bounding_client_side(self) -> None:
        """Client-side bounding leaves deltas alone and sends the bound to the clients."""
        strategy = NormBounding(FedProx(proximal_mu=0.1), max_norm=2.0, client_side=True)
        result = _round(strategy, _vector(0.0, 0.0), [(_vector(3.0, 4.0), 1.0)])
        np.testing.assert_array_equal(result["w"], np.array([3.0, 4.0], dtype=np.float32))
        assert strategy.configure_clients() == {"proximal_mu": 0.1, "max_update_norm": 2.0}
        assert strategy.supports_secure_aggregation

    def test_norm_bounding_validates_first(self) -> None:
        """A malformed delta is rejected with its reason before its norm is taken."""
        strategy = NormBounding(FedAvg(), max_norm=1.0)
        strategy.begin_round(_vector(0.0, 0.0))
        with pytest.raises(UpdateRejectedError) as caught:
            strategy.fold({"other": np.ones(2, np.float32)}, 1.0)
        assert caught.value.reason == "missing_parameter"

    def test_secure_aggregation_flags(self) -> None:
        """Only strategies that need the weighted sum alone report secure aggregation."""
        assert FedAvg().supports_secure_aggregation
        assert FedAdam().supports_secure_aggregation
        assert not CoordinateMedian().supports_secure_aggregation
        assert not TrimmedMean(trim_fraction=0.1).supports_secure_aggregation
        assert not NormBounding(FedAvg(), max_norm=1.0).supports_secure_aggregation
        assert not FedAdam(CoordinateMedian()).supports_secure_aggregation


class RecordingStrategy(Strategy):
    """Records every call and returns fixed values, to check what a wrapper delegates."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.result = _vector(42.0)

    @property
    def global_weights(self) -> Weights:
        self.calls.append(("global_weights", None))
        return _vector(0.0, 0.0)

    @property
    def folded(self) -> int:
        self.calls.append(("folded", None))
        return 7

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self.calls.append(("begin_round", dict(global_weights)))

    def fold(self, delta: Mapping[str, np.ndarray], n_samples: float) -> None:
        self.calls.append(("fold", (dict(delta), n_samples)))

    def aggregate_deltas(self) -> Weights:
        self.calls.append(("aggregate_deltas", None))
        return self.result

    def finish_round(self) -> Weights:
        self.calls.append(("finish_round", None))
        return self.result

    def configure_clients(self) -> dict[str, float]:
        self.calls.append(("configure_clients", None))
        return {"inner_setting": 1.0}

    def state_dict(self) -> dict[str, Any]:
        self.calls.append(("state_dict", None))
        return {"marker": 1}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls.append(("load_state_dict", dict(state)))


class TestWrapperDelegation:
    @pytest.mark.parametrize(
        "wrap",
        [
            StrategyWrapper,
            lambda inner: NormBounding(inner, max_norm=1.0, client_side=True),
            lambda inner: NormBounding(inner, max_norm=1.0),
        ],
        ids=["StrategyWrapper", "NormBounding:client", "NormBounding:server"],
    )
    def test_wrapper_delegates_unchanged_phases(self, wrap: Any) -> None:
        """begin, aggregate, finish, configure, folded and state reach the inner strategy."""
        inner = RecordingStrategy()
        wrapper = wrap(inner)
        start = _vector(1.0, 2.0)

        wrapper.begin_round(start)
        assert inner.calls[-1][0] == "begin_round"
        np.testing.assert_array_equal(inner.calls[-1][1]["w"], start["w"])
        assert wrapper.aggregate_deltas() is inner.result
        assert wrapper.finish_round() is inner.result
        assert wrapper.folded == 7
        assert wrapper.configure_clients()["inner_setting"] == 1.0
        assert wrapper.state_dict()["inner"] == {"marker": 1}
        wrapper.load_state_dict(wrapper.state_dict())
        assert inner.calls[-1] == ("load_state_dict", {"marker": 1})
        assert wrapper.name == "recording"

    def test_client_side_fold_passes_delta_unchanged(self) -> None:
        """Client-side bounding hands the delta and weight to the inner fold as they came."""
        inner = RecordingStrategy()
        NormBounding(inner, max_norm=1.0, client_side=True).fold(_vector(3.0, 4.0), 2.0)
        name, (delta, n_samples) = inner.calls[-1]
        assert name == "fold"
        np.testing.assert_array_equal(delta["w"], np.array([3.0, 4.0], dtype=np.float32))
        assert n_samples == 2.0

    def test_server_side_fold_passes_clipped_delta(self) -> None:
        """Server-side bounding hands the clipped delta with the same weight to the inner fold."""
        inner = RecordingStrategy()
        NormBounding(inner, max_norm=1.0).fold(_vector(3.0, 4.0), 2.0)
        name, (delta, n_samples) = inner.calls[-1]
        assert name == "fold"
        np.testing.assert_allclose(delta["w"], [0.6, 0.8], rtol=1e-6)
        assert n_samples == 2.0

    def test_optimizer_delegates_collection(self) -> None:
        """A server optimizer passes begin, fold and aggregate through to its inner strategy."""
        inner = RecordingStrategy()
        optimizer = FedAdam(inner, eta=0.1)
        optimizer.begin_round(_vector(1.0, 2.0))
        optimizer.fold(_vector(0.5, 0.5), 3.0)
        assert optimizer.aggregate_deltas() is inner.result
        assert [name for name, _ in inner.calls] == ["begin_round", "fold", "aggregate_deltas"]
        assert optimizer.configure_clients() == {"inner_setting": 1.0}
