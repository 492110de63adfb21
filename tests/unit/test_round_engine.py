"""RoundEngine: the aggregator's fold path through strategies, buffering, DP and the ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.config import AppConfig, parse_config
from fanomad_stream.errors import ConfigError, RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import WeightedSum, Weights, apply_delta
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.federate.global_model import GlobalModel
from fanomad_stream.federate.rounds import RoundEngine
from fanomad_stream.privacy.accountant import compute_epsilon
from fanomad_stream.privacy.dp import SecureGaussian, clip_update
from fanomad_stream.transport import codec

CLIENTS = ["a", "b", "c"]


def _weights(seed: int, scale: float = 1.0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": (rng.standard_normal((4, 3)) * scale).astype(np.float32),
        "layer.bias": (rng.standard_normal(4) * scale).astype(np.float32),
    }


def _config(**sections: object) -> AppConfig:
    raw: dict[str, object] = {"aggregator": {"quorum": 3, "clients": CLIENTS}}
    raw.update(sections)
    return parse_config(raw)


def _old_fedavg(start: Weights, updates: list[tuple[Weights, int]]) -> Weights:
    """The aggregator's fold before strategies were wired in: WeightedSum, then apply_delta."""
    total = WeightedSum(start)
    for delta, n_samples in updates:
        total.add(delta, float(n_samples))
    return apply_delta(start, total.mean())


class TestDefaultStrategy:
    def test_fedavg_engine_equals_the_old_weighted_sum_bitwise(self) -> None:
        start = _weights(0)
        updates = [(_weights(1, 0.1), 1200), (_weights(2, 0.1), 800), (_weights(3, 0.1), 2000)]
        engine = RoundEngine(_config(), start, version=5)
        for client, (delta, n_samples) in zip(CLIENTS, updates, strict=True):
            assert engine.fold(client, 5, delta, n_samples) is None
        closed = engine.close()

        expected = _old_fedavg(start, updates)
        assert (closed.round, closed.version, closed.clients) == (5, 6, CLIENTS)
        assert closed.ledger is None
        for name in start:
            np.testing.assert_array_equal(closed.weights[name], expected[name])
        assert engine.version == 6

    def test_fedavg_engine_hand_computed(self) -> None:
        start = {"w": np.array([1.0, 2.0], dtype=np.float32)}
        engine = RoundEngine(_config(), start, version=0)
        engine.fold("a", 0, {"w": np.array([2.0, 4.0], dtype=np.float32)}, 1)
        engine.fold("b", 0, {"w": np.array([-1.0, 0.0], dtype=np.float32)}, 3)
        # Mean delta: ((2 - 3) / 4, 4 / 4) = (-0.25, 1.0).
        np.testing.assert_array_equal(engine.close().weights["w"], [0.75, 3.0])

    def test_secure_sum_matches_single_folds(self) -> None:
        start = _weights(0)
        updates = [(_weights(1, 0.1), 1000), (_weights(2, 0.1), 2000)]
        # Under secure aggregation each client sends n / window_events times its delta.
        window = 2000
        total = {
            name: sum(
                np.float64(n / window) * delta[name].astype(np.float64) for delta, n in updates
            )
            for name in start
        }
        engine = RoundEngine(_config(), start, version=0)
        engine.fold_secure_sum(total, clients=["a", "b"], total_weight=1000 / window + 1.0)
        closed = engine.close()
        expected = _old_fedavg(start, updates)
        for name in start:
            np.testing.assert_allclose(closed.weights[name], expected[name], rtol=1e-6)

    def test_fedadam_moves_differently_from_fedavg(self) -> None:
        start, delta = _weights(0), _weights(1, 0.1)
        plain = RoundEngine(_config(), start, version=0)
        adam = RoundEngine(
            _config(aggregator={"quorum": 1, "strategy": {"name": "fedadam", "eta": 0.05}}),
            start,
            version=0,
        )
        plain.fold("a", 0, delta, 10)
        adam.fold("a", 0, delta, 10)
        assert not np.allclose(
            plain.close().weights["layer.bias"], adam.close().weights["layer.bias"]
        )


class TestBuffered:
    def test_buffer_of_two_releases_a_version(self) -> None:
        config = _config(
            aggregator={
                "quorum": 1,
                "buffered_async": {"buffer_size": 2, "staleness": "constant"},
            }
        )
        start = _weights(0)
        engine = RoundEngine(config, start, version=3)
        assert engine.fold("a", 3, _weights(1, 0.1), 10) is None
        closed = engine.fold("b", 3, _weights(2, 0.1), 30)
        assert closed is not None and (closed.round, closed.version) == (3, 4)
        expected = _old_fedavg(start, [(_weights(1, 0.1), 10), (_weights(2, 0.1), 30)])
        for name in start:
            np.testing.assert_allclose(closed.weights[name], expected[name], rtol=1e-6)

    def test_duplicate_and_stale_updates_are_refused(self) -> None:
        config = _config(
            aggregator={"quorum": 1, "buffered_async": {"buffer_size": 3, "max_staleness": 1}}
        )
        engine = RoundEngine(config, _weights(0), version=4)
        engine.fold("a", 4, _weights(1, 0.1), 10)
        with pytest.raises(UpdateRejectedError) as duplicate:
            engine.fold("a", 4, _weights(1, 0.1), 10)
        with pytest.raises(UpdateRejectedError) as stale:
            engine.fold("b", 2, _weights(2, 0.1), 10)
        assert (duplicate.value.reason, stale.value.reason) == ("duplicate", "too_stale")


def _dp_config(**client_dp: object) -> AppConfig:
    settings: dict[str, object] = {
        "enabled": True,
        "clipping_norm": 0.5,
        "noise_multiplier": 1.1,
        "delta": 1e-5,
    }
    settings.update(client_dp)
    return _config(privacy={"client_dp": settings})


class TestClientLevelDP:
    def test_dp_round_clips_noises_and_divides(self) -> None:
        start = _weights(0)
        deltas = [_weights(1, 1.0), _weights(2, 0.01), _weights(3, 1.0)]
        engine = RoundEngine(_dp_config(), start, version=0, noise=SecureGaussian(test_seed=9))
        for client, delta in zip(CLIENTS, deltas, strict=True):
            engine.fold(client, 0, delta, 100)
        closed = engine.close()

        clipped = [clip_update(delta, clipping_norm=0.5).update for delta in deltas]
        noise = SecureGaussian(test_seed=9).normal_like(start, 1.1 * 0.5)
        for name in start:
            noised = sum(c[name].astype(np.float64) for c in clipped) + noise[name]
            expected = start[name] + (noised / 3).astype(np.float32)
            np.testing.assert_allclose(closed.weights[name], expected, rtol=1e-6, atol=1e-7)

    def test_ledger_reports_the_accountant_epsilon(self) -> None:
        engine = RoundEngine(
            _dp_config(), _weights(0), version=0, noise=SecureGaussian(test_seed=1)
        )
        for round_id in range(2):
            for client in CLIENTS:
                engine.fold(client, round_id, _weights(round_id + 10, 0.1), 100)
            closed = engine.close()
        assert closed.ledger is not None
        expected = compute_epsilon(noise_multiplier=1.1, sampling_rate=1.0, steps=2, delta=1e-5)
        assert closed.ledger["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert closed.ledger["round"] == 1
        assert closed.ledger["status"] == "round"
        assert closed.ledger["params"]["cohort"] == 3

    def test_budget_stops_training_before_it_is_exceeded(self) -> None:
        one_round = compute_epsilon(noise_multiplier=1.1, sampling_rate=1.0, steps=1, delta=1e-5)
        two_rounds = compute_epsilon(noise_multiplier=1.1, sampling_rate=1.0, steps=2, delta=1e-5)
        budget = (one_round + two_rounds) / 2
        engine = RoundEngine(
            _dp_config(epsilon_budget=budget),
            _weights(0),
            version=0,
            noise=SecureGaussian(test_seed=2),
        )
        assert engine.training_stopped is None
        for client in CLIENTS:
            engine.fold(client, 0, _weights(5, 0.1), 100)
        engine.close()
        assert engine.training_stopped is not None
        assert "epsilon_budget" in engine.training_stopped
        with pytest.raises(UpdateRejectedError) as refused:
            engine.fold("a", 1, _weights(6, 0.1), 100)
        assert refused.value.reason == "training_stopped"
        record = engine.ledger_record("training_stopped")
        assert record["epsilon"] == pytest.approx(one_round, rel=1e-9)
        assert record["reason"] == engine.training_stopped

    def test_round_below_min_cohort_is_not_released(self) -> None:
        start = _weights(0)
        engine = RoundEngine(_dp_config(), start, version=0, noise=SecureGaussian(test_seed=3))
        engine.fold("a", 0, _weights(1, 0.1), 100)
        assert engine.min_to_close == 3
        with pytest.raises(RoundError, match="min_cohort"):
            engine.close()
        assert engine.version == 0
        assert engine.ledger is not None and engine.ledger.rounds == 0
        for name in start:
            np.testing.assert_array_equal(engine.weights[name], start[name])


class TestPrivacyConfig:
    def _secure(self, **extra: object) -> dict[str, object]:
        return {"secure_aggregation": {"enabled": True, "threshold": 2, **extra}}

    def test_robust_strategy_under_secure_aggregation_names_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"aggregator\.strategy: strategy 'trimmed_mean'"):
            _config(
                aggregator={"quorum": 3, "clients": CLIENTS, "strategy": {"name": "trimmed_mean"}},
                privacy=self._secure(),
            )

    def test_overflowing_ring_is_rejected_at_load(self) -> None:
        clients = [f"c{i}" for i in range(100)]
        with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation: .*could overflow"):
            parse_config(
                {
                    "aggregator": {"quorum": 100, "clients": clients},
                    "privacy": {
                        "secure_aggregation": {
                            "enabled": True,
                            "threshold": 51,
                            "clip_range": 100.0,
                            "scale_bits": 20,
                        }
                    },
                }
            )

    def test_threshold_must_exceed_half_the_clients(self) -> None:
        with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.threshold"):
            parse_config(
                {
                    "aggregator": {"quorum": 4, "clients": ["a", "b", "c", "d"]},
                    "privacy": self._secure(),
                }
            )

    def test_min_cohort_above_threshold_is_rejected(self) -> None:
        with pytest.raises(ConfigError, match=r"privacy\.client_dp\.min_cohort"):
            _config(privacy={**self._secure(), "client_dp": {"enabled": True, "min_cohort": 3}})

    def test_buffered_async_with_secure_aggregation_is_rejected(self) -> None:
        with pytest.raises(ConfigError, match=r"aggregator\.buffered_async"):
            _config(
                aggregator={"quorum": 3, "clients": CLIENTS, "buffered_async": {"buffer_size": 2}},
                privacy=self._secure(),
            )

    def test_dp_with_sample_weighted_buffer_is_rejected(self) -> None:
        with pytest.raises(ConfigError, match=r"weight_by_samples"):
            _config(
                aggregator={"quorum": 3, "clients": CLIENTS, "buffered_async": {"buffer_size": 2}},
                privacy={"client_dp": {"enabled": True}},
            )

    def test_consistent_private_config_loads(self) -> None:
        config = _config(privacy={**self._secure(), "client_dp": {"enabled": True}})
        assert config.privacy.secure_aggregation.threshold == 2
        assert math.isclose(config.privacy.client_dp.clipping_norm, 0.1)


class TestLedgerRestore:
    def _two_rounds(self, config: AppConfig) -> list[dict[str, object]]:
        engine = RoundEngine(config, _weights(0), version=0, noise=SecureGaussian(test_seed=4))
        bodies = []
        for round_id in range(2):
            for client in CLIENTS:
                engine.fold(client, round_id, _weights(round_id + 20, 0.1), 100)
            closed = engine.close()
            assert closed.ledger is not None
            bodies.append(closed.ledger)
        return bodies

    def test_restart_keeps_the_spent_epsilon(self) -> None:
        config = _dp_config()
        bodies = self._two_rounds(config)
        # The second record read twice, as a redelivered record would be.
        restarted = RoundEngine(config, _weights(0), version=2)
        restarted.restore_ledger([*bodies, bodies[-1]])
        assert restarted.ledger is not None
        assert restarted.ledger.rounds == 2
        expected = compute_epsilon(noise_multiplier=1.1, sampling_rate=1.0, steps=2, delta=1e-5)
        assert restarted.ledger.spent_epsilon() == pytest.approx(expected, rel=1e-9)

    def test_restart_stops_training_when_the_budget_is_spent(self) -> None:
        bodies = self._two_rounds(_dp_config())
        two_rounds = compute_epsilon(noise_multiplier=1.1, sampling_rate=1.0, steps=2, delta=1e-5)
        tight = RoundEngine(_dp_config(epsilon_budget=two_rounds + 0.01), _weights(0), version=2)
        assert tight.training_stopped is None
        tight.restore_ledger(bodies)
        assert tight.training_stopped is not None
        loose = RoundEngine(_dp_config(epsilon_budget=100.0), _weights(0), version=2)
        loose.restore_ledger(bodies)
        assert loose.training_stopped is None


def _through_codec(state: dict[str, object]) -> dict[str, object]:
    """Send a fold state through the ``global`` record it travels in, as a restart reads it."""
    body = {
        "round": 0,
        "version": 1,
        "weights": _weights(0),
        "clients": [],
        "aggregator_state": state,
    }
    decoded = codec.decode(codec.encode("global", body, src="agg", ts=0.0))
    restored: dict[str, object] = decoded.body["aggregator_state"]
    return restored


ADAM = {"quorum": 3, "clients": CLIENTS, "strategy": {"name": "fedadam", "eta": 0.05}}


class TestFoldState:
    """The state published with each version lets a restarted engine fold like the first."""

    def _sync_rounds(self, engine: RoundEngine, rounds: range) -> None:
        for round_id in rounds:
            for i, client in enumerate(CLIENTS):
                engine.fold(client, round_id, _weights(10 * round_id + i, 0.1), 100 * (i + 1))
            engine.close()

    def _restart_after_two_rounds(self, *, with_state: bool) -> tuple[RoundEngine, RoundEngine]:
        """Return an engine run for 4 rounds and one restarted after round 2, then run to 4."""
        config = _config(aggregator=ADAM)
        uninterrupted = RoundEngine(config, _weights(0), version=0)
        self._sync_rounds(uninterrupted, range(4))

        first = RoundEngine(config, _weights(0), version=0)
        self._sync_rounds(first, range(2))
        restarted = RoundEngine(config, first.weights, version=first.version)
        if with_state:
            restarted.load_state_dict(_through_codec(first.state_dict()))
        self._sync_rounds(restarted, range(2, 4))
        return uninterrupted, restarted

    def test_fedadam_restart_matches_bitwise(self) -> None:
        uninterrupted, restarted = self._restart_after_two_rounds(with_state=True)
        for name, array in uninterrupted.weights.items():
            np.testing.assert_array_equal(restarted.weights[name], array)

    def test_fedadam_restart_without_state_drifts(self) -> None:
        # The moments are what the state carries: a restart from the weights alone differs.
        uninterrupted, restarted = self._restart_after_two_rounds(with_state=False)
        bias = "layer.bias"
        assert not np.array_equal(restarted.weights[bias], uninterrupted.weights[bias])

    def test_buffered_restart_rejects_redelivered_updates(self) -> None:
        config = _config(
            aggregator={
                "quorum": 1,
                "clients": CLIENTS,
                "buffered_async": {"buffer_size": 2, "max_staleness": 3},
            }
        )
        log = [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 2), ("c", 2)]

        def feed(engine: RoundEngine, records: list[tuple[str, int]]) -> list[str]:
            outcomes = []
            for client, base in records:
                delta = _weights(ord(client) * 7 + base, 0.1)
                try:
                    closed = engine.fold(client, base, delta, 10)
                except UpdateRejectedError as err:
                    outcomes.append(err.reason)
                else:
                    outcomes.append("applied" if closed else "buffered")
            return outcomes

        uninterrupted = RoundEngine(config, _weights(0), version=0)
        assert feed(uninterrupted, log) == ["buffered", "applied"] * 3

        # Killed after publishing version 1 and before committing: a and b come again.
        first = RoundEngine(config, _weights(0), version=0)
        feed(first, log[:2])
        restarted = RoundEngine(config, first.weights, version=first.version)
        restarted.load_state_dict(_through_codec(first.state_dict()))
        assert feed(restarted, log) == ["duplicate", "duplicate"] + ["buffered", "applied"] * 2
        assert restarted.version == uninterrupted.version == 3
        for name, array in uninterrupted.weights.items():
            np.testing.assert_array_equal(restarted.weights[name], array)

    def test_state_with_open_round_raises(self) -> None:
        engine = RoundEngine(_config(), _weights(0), version=0)
        engine.fold("a", 0, _weights(1, 0.1), 10)
        with pytest.raises(RoundError, match="1 updates in the open round of version 0"):
            engine.state_dict()

    def test_state_of_other_mode_raises(self) -> None:
        sync = RoundEngine(_config(), _weights(0), version=0)
        buffered_config = _config(
            aggregator={"quorum": 1, "clients": CLIENTS, "buffered_async": {"buffer_size": 2}}
        )
        buffered = RoundEngine(buffered_config, _weights(0), version=0)
        with pytest.raises(
            ValueError, match="synchronous rounds and this aggregator runs buffered"
        ):
            buffered.load_state_dict(sync.state_dict())
        with pytest.raises(ValueError, match="format 7 is not 1"):
            sync.load_state_dict({**sync.state_dict(), "format": 7})


def _adam_state_after_round() -> tuple[AppConfig, RoundEngine, dict[str, object]]:
    """Return the FedAdam config, an engine after one round and its state through the codec."""
    config = _config(aggregator=ADAM)
    engine = RoundEngine(config, _weights(0), version=0)
    for i, client in enumerate(CLIENTS):
        engine.fold(client, 0, _weights(i + 1, 0.1), 10)
    engine.close()
    return config, engine, _through_codec(engine.state_dict())


class TestHostileFoldState:
    """A state that does not belong to the published version is rejected with its reason."""

    def test_state_of_other_strategy_raises(self) -> None:
        config, engine, adam_state = _adam_state_after_round()
        fedavg = RoundEngine(_config(), engine.weights, version=engine.version)
        with pytest.raises(ValueError, match="does not fit the configured strategy 'fedavg'"):
            fedavg.load_state_dict(adam_state)
        adam = RoundEngine(config, engine.weights, version=engine.version)
        with pytest.raises(ValueError, match="does not fit the configured strategy 'fedadam'"):
            adam.load_state_dict(_through_codec(fedavg.state_dict()))

    def test_state_of_other_weights_raises(self) -> None:
        config, _, adam_state = _adam_state_after_round()
        engine = RoundEngine(config, _weights(5), version=1)
        with pytest.raises(ValueError, match="other global weights"):
            engine.load_state_dict(adam_state)

    def test_state_of_other_shape_raises(self) -> None:
        config, engine, adam_state = _adam_state_after_round()
        moments = adam_state["strategy"]
        assert isinstance(moments, dict)
        moments["m"] = {**moments["m"], "layer.bias": np.zeros(7)}
        restarted = RoundEngine(config, engine.weights, version=engine.version)
        with pytest.raises(ValueError, match=r"moment m has parameters .*\(7,\)"):
            restarted.load_state_dict(adam_state)

    def test_nan_moments_raise(self) -> None:
        config, engine, adam_state = _adam_state_after_round()
        moments = adam_state["strategy"]
        assert isinstance(moments, dict)
        moments["v"] = {**moments["v"], "layer.bias": np.full(4, np.nan)}
        restarted = RoundEngine(config, engine.weights, version=engine.version)
        with pytest.raises(ValueError, match=r"strategy\.v\.layer\.bias has NaN"):
            restarted.load_state_dict(adam_state)

    def test_buffered_state_of_other_version_raises(self) -> None:
        config = _config(
            aggregator={"quorum": 1, "clients": CLIENTS, "buffered_async": {"buffer_size": 2}}
        )
        state = _through_codec(RoundEngine(config, _weights(0), version=3).state_dict())
        engine = RoundEngine(config, _weights(0), version=2)
        with pytest.raises(ValueError, match="at version 3, the published model at version 2"):
            engine.load_state_dict(state)

    def test_aggregator_start_names_model_and_version(self) -> None:
        config, engine, adam_state = _adam_state_after_round()
        aggregator = Aggregator(config)
        aggregator.engine = RoundEngine(_config(), engine.weights, version=engine.version)
        model = GlobalModel(
            version=engine.version,
            round=0,
            weights=engine.weights,
            clients=list(CLIENTS),
            state=adam_state,
        )
        with pytest.raises(
            RoundError, match=r"cannot resume model .* from version 1 on fl\.global"
        ):
            aggregator._restore_state(model)


def test_fold_state_adds_little_to_the_record() -> None:
    """Between rounds the state saves the weights and empty sums as markers, not as copies."""
    engine = RoundEngine(_config(), _weights(0), version=0)
    for client in CLIENTS:
        engine.fold(client, 0, _weights(1, 0.1), 10)
    engine.close()
    body = {"round": 0, "version": 1, "weights": engine.weights, "clients": CLIENTS}
    plain = len(codec.encode("global", body, src="agg", ts=0.0))
    with_state = len(
        codec.encode("global", {**body, "aggregator_state": engine.state_dict()}, src="agg", ts=0.0)
    )
    assert with_state - plain < 400

    restarted = RoundEngine(_config(), engine.weights, version=1)
    restarted.load_state_dict(_through_codec(engine.state_dict()))
    restarted.fold("a", 1, _weights(2, 0.1), 10)
    engine.fold("a", 1, _weights(2, 0.1), 10)
    expected, resumed = engine.close().weights, restarted.close().weights
    for name, array in expected.items():
        np.testing.assert_array_equal(resumed[name], array)
