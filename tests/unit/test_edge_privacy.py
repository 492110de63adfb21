"""EdgePrivacy: what leaves an edge site with DP-SGD, clipping and noise shares switched on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.config import AppConfig, parse_config
from fanomad_stream.edge.pipeline import EdgePipeline
from fanomad_stream.edge.privacy import EdgePrivacy
from fanomad_stream.privacy.accountant import compute_epsilon
from fanomad_stream.privacy.dp import SecureGaussian, noise_share_std, update_norm

CLIENTS = ["a", "b", "c"]


def _config(privacy: dict[str, object]) -> AppConfig:
    return parse_config(
        {
            "model": {"n_features": 5, "hidden": [3], "local_epochs": 1, "batch_size": 16},
            "edge": {"window_events": 64},
            "aggregator": {"quorum": 3, "clients": CLIENTS},
            "privacy": privacy,
        }
    )


def _delta(scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": (rng.standard_normal(50) * scale).astype(np.float32)}


def _filled_pipeline(config: AppConfig) -> EdgePipeline:
    pipeline = EdgePipeline(config.model.n_features, config.edge, config.model)
    rows = np.random.default_rng(1).standard_normal((64, 5)).astype(np.float32)
    pipeline.process("a", rows)
    assert pipeline.window_ready()
    return pipeline


def test_without_privacy_the_delta_leaves_unchanged() -> None:
    privacy = EdgePrivacy(_config({}), "a")
    delta = _delta(3.0)
    protected, info = privacy.protect(delta)
    assert protected is delta
    assert info == {"mechanism": "none"}
    assert privacy.secure_weight(32) == pytest.approx(0.5)


def test_client_dp_without_secure_aggregation_only_clips() -> None:
    config = _config({"client_dp": {"enabled": True, "clipping_norm": 0.5}})
    protected, info = EdgePrivacy(config, "a").protect(_delta(3.0))
    assert update_norm(protected) == pytest.approx(0.5, rel=1e-5)
    assert info["clipped"] is True
    assert info["noise_added_by"] == "server"
    assert info["noise_share_std"] == 0.0


def test_secure_client_dp_adds_noise_share() -> None:
    config = _config(
        {
            "client_dp": {"enabled": True, "clipping_norm": 0.5, "noise_multiplier": 1.2},
            "secure_aggregation": {"enabled": True, "threshold": 2},
        }
    )
    privacy = EdgePrivacy(config, "a", noise=SecureGaussian(test_seed=4))
    delta = _delta(0.001)  # far below the norm, so what is added is the noise share
    protected, info = privacy.protect(delta)
    expected_std = noise_share_std(clipping_norm=0.5, noise_multiplier=1.2, min_cohort=2)
    assert info["noise_share_std"] == pytest.approx(expected_std)
    assert info["noise_added_by"] == "client_shares"
    added = protected["w"].astype(np.float64) - delta["w"]
    assert np.std(added) == pytest.approx(expected_std, rel=0.3)
    assert privacy.secure_weight(32) == 1.0


def test_dp_sgd_window_recorded_in_ledger() -> None:
    config = _config({"dp_sgd": {"enabled": True, "clipping_norm": 1.0, "noise_multiplier": 1.1}})
    privacy = EdgePrivacy(config, "a", noise=SecureGaussian(test_seed=5))
    pipeline = _filled_pipeline(config)
    trained = privacy.train(pipeline, round_id=0)

    assert trained is not None and trained.ledger is not None
    assert trained.n_samples == 64
    steps, rate = 1 * math.ceil(64 / 16), 16 / 64
    expected = compute_epsilon(noise_multiplier=1.1, sampling_rate=rate, steps=steps, delta=1e-5)
    assert trained.privacy["dp_sgd"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert trained.ledger["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert trained.ledger["params"]["subject"] == "client:a"
    assert trained.ledger["params"]["level"] == "sample"
    assert not pipeline.window_ready()
    assert any(np.any(array != 0) for array in trained.delta.values())


def test_dp_sgd_budget_stops_training() -> None:
    config = _config(
        {
            "dp_sgd": {
                "enabled": True,
                "noise_multiplier": 1.1,
                "epsilon_budget": 0.01,
            }
        }
    )
    privacy = EdgePrivacy(config, "a", noise=SecureGaussian(test_seed=6))
    pipeline = _filled_pipeline(config)
    start = pipeline.detector.weights()
    assert privacy.train(pipeline, round_id=0) is None
    assert privacy.training_stopped is not None and "epsilon_budget" in privacy.training_stopped
    for name, array in pipeline.detector.weights().items():
        np.testing.assert_array_equal(array, start[name])


def test_model_epsilon_follows_the_versions() -> None:
    config = _config({"client_dp": {"enabled": True, "noise_multiplier": 1.5}})
    privacy = EdgePrivacy(config, "a")
    assert privacy.model_epsilon(0) is None
    expected = compute_epsilon(noise_multiplier=1.5, sampling_rate=1.0, steps=3, delta=1e-5)
    assert privacy.model_epsilon(3) == pytest.approx(expected)


def test_edge_ledger_survives_restart() -> None:
    config = _config({"dp_sgd": {"enabled": True, "noise_multiplier": 1.1}})
    privacy = EdgePrivacy(config, "a", noise=SecureGaussian(test_seed=7))
    pipeline = _filled_pipeline(config)
    first = privacy.train(pipeline, round_id=0)
    pipeline.process("a", np.random.default_rng(2).standard_normal((64, 5)).astype(np.float32))
    second = privacy.train(pipeline, round_id=0)  # a second window on the same version
    assert first is not None and first.ledger is not None
    assert second is not None and second.ledger is not None

    restarted = EdgePrivacy(config, "a")
    restarted.restore_ledger([first.ledger, second.ledger])
    assert restarted.ledger is not None and privacy.ledger is not None
    assert restarted.ledger.rounds == 2
    assert restarted.ledger.spent_epsilon() == pytest.approx(privacy.ledger.spent_epsilon())
