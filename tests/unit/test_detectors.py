"""Scaler, threshold and detectors of the edge pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.config import AppConfig
from fanomad_stream.detect.autoencoder import AutoencoderDetector
from fanomad_stream.detect.hst import HalfSpaceTreesDetector
from fanomad_stream.detect.scaling import StreamingScaler
from fanomad_stream.detect.threshold import QuantileThreshold
from fanomad_stream.edge.pipeline import EdgePipeline


def test_scaler_merge_matches_pooled() -> None:
    """A learns X, B learns Y, C learns both: A + B has C's mean and std, and numpy's."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(3, 2, (50, 4)), rng.normal(-1, 5, (70, 4))
    a, b, c = StreamingScaler(4), StreamingScaler(4), StreamingScaler(4)
    a.learn(x)
    b.learn(y)
    c.learn(np.vstack([x, y]))
    a += b
    np.testing.assert_allclose(a.mean, c.mean)
    np.testing.assert_allclose(a.std, c.std)
    np.testing.assert_allclose(a.std, np.vstack([x, y]).std(axis=0, ddof=1))


def test_scaler_uses_only_past_rows() -> None:
    """transform() of a batch depends on earlier rows only, not on the batch itself."""
    scaler = StreamingScaler(1, scale_floor=1e-6)
    scaler.learn(np.array([[0.0], [2.0]]))
    z = scaler.transform(np.array([[100.0]]))
    assert z[0, 0] == pytest.approx((100.0 - 1.0) / math.sqrt(2.0))


def test_scaler_floor_limits_constant_columns() -> None:
    """A column constant so far divides by the floor, not by zero."""
    scaler = StreamingScaler(1, scale_floor=0.5)
    scaler.learn(np.ones((10, 1)))
    assert scaler.transform(np.array([[2.0]]))[0, 0] == pytest.approx(2.0)


def test_scaler_clips_first_rows_in_raw_units() -> None:
    """The first two rows, without a standard deviation yet, stay within the clip."""
    scaler = StreamingScaler(2, clip=100.0)
    row = np.array([[2.5e6, 50.0]])
    np.testing.assert_allclose(scaler.transform(row), [[100.0, 50.0]])
    scaler.learn(row)
    np.testing.assert_allclose(scaler.transform(row * 2), [[100.0, 50.0]])


def test_scaler_clips_standardized_values() -> None:
    """A jump in a column that was constant is clipped, both ways."""
    scaler = StreamingScaler(1, scale_floor=0.01, clip=100.0)
    scaler.learn(np.zeros((20, 1)))
    z = scaler.transform(np.array([[3600.0], [-3600.0], [0.5]]))
    np.testing.assert_allclose(z[:, 0], [100.0, -100.0, 50.0])


def test_scaler_rejects_nonpositive_clip() -> None:
    with pytest.raises(ValueError, match="clip"):
        StreamingScaler(1, clip=0.0)


def test_threshold_warmup_then_past_quantile() -> None:
    """No alert threshold during warm-up; afterwards the quantile of past scores only."""
    rule = QuantileThreshold(quantile=0.9, warmup_events=10, history=100)
    first = rule.thresholds_for(np.arange(10, dtype=float))
    assert np.isinf(first).all()
    second = rule.thresholds_for(np.array([1000.0, 1000.0]))
    assert second[0] == pytest.approx(np.quantile(np.arange(10), 0.9))
    assert rule.seen == 12


def test_threshold_history_wraps() -> None:
    """Only the last ``history`` scores count once the buffer wraps."""
    rule = QuantileThreshold(quantile=0.6, warmup_events=10, history=10)
    rule.learn(np.zeros(15))
    rule.learn(np.full(10, 5.0))
    assert rule.current == pytest.approx(5.0)


@pytest.mark.parametrize("sizes", [[1] * 90, [3, 7, 1, 30, 2, 45, 9], [150, 1, 4], [0, 64, 64]])
def test_threshold_growing_buffer_matches_history(sizes: list[int]) -> None:
    """The buffer grows in steps, and the threshold is the quantile of the last scores."""
    rng = np.random.default_rng(4)
    rule = QuantileThreshold(quantile=0.9, warmup_events=10, history=64)
    seen: list[float] = []
    for size in sizes:
        batch = rng.exponential(size=size)
        past = np.array(seen[-64:])
        expected = np.quantile(past, 0.9) if len(seen) >= 10 else np.inf
        np.testing.assert_array_equal(rule.thresholds_for(batch), np.full(size, expected))
        seen += batch.tolist()
        assert rule._buffer.shape[0] <= 64
        assert rule._buffer.shape[0] >= min(len(seen), 64)
    assert rule.current == np.quantile(np.array(seen[-64:]), 0.9)


def test_threshold_buffer_small_for_few_scores() -> None:
    rule = QuantileThreshold(quantile=0.9, warmup_events=10, history=5000)
    rule.learn(np.ones(3))
    assert rule._buffer.nbytes <= 3 * 8


def test_autoencoder_training_lowers_error() -> None:
    """Training on normal rows lowers their reconstruction error and returns a delta."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(512, 1)) @ rng.normal(size=(1, 8))).astype(np.float32)
    detector = AutoencoderDetector(8, hidden=[4, 2], local_epochs=20, learning_rate=0.01, seed=3)
    before = detector.score_batch(x).mean()
    delta = detector.train(x)
    assert detector.score_batch(x).mean() < before * 0.5
    assert set(delta) == set(detector.weights())
    assert any(np.abs(d).sum() > 0 for d in delta.values())


def test_autoencoder_seed_determinism() -> None:
    """Two detectors with one seed start equal and train to identical deltas."""
    x = np.random.default_rng(2).normal(size=(128, 6)).astype(np.float32)
    a = AutoencoderDetector(6, hidden=[3], seed=5)
    b = AutoencoderDetector(6, hidden=[3], seed=5)
    np.testing.assert_array_equal(a.score_batch(x), b.score_batch(x))
    delta_a, delta_b = a.train(x), b.train(x)
    for name, value in delta_a.items():
        np.testing.assert_array_equal(value, delta_b[name])
    other = AutoencoderDetector(6, hidden=[3], seed=6)
    assert not np.array_equal(
        other.score_batch(x), AutoencoderDetector(6, hidden=[3], seed=5).score_batch(x)
    )


def test_autoencoder_rejects_wrong_width() -> None:
    """A batch of the wrong width raises ValueError naming the shapes."""
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 6\), got \(2, 5\)"):
        AutoencoderDetector(6, hidden=[3]).score_batch(np.zeros((2, 5), np.float32))


def test_hst_ranks_outliers_higher() -> None:
    """After warm-up, HalfSpaceTrees scores far outliers above typical rows."""
    rng = np.random.default_rng(4)
    hst = HalfSpaceTreesDetector(4, n_trees=10, height=8, window_size=50, seed=1)
    hst.score_and_learn(rng.normal(0, 0.3, (300, 4)).astype(np.float32))
    normal = hst.score_batch(rng.normal(0, 0.3, (50, 4)).astype(np.float32))
    outliers = hst.score_batch(np.full((5, 4), 3.9, np.float32))
    assert outliers.mean() > normal.mean()


def test_pipeline_flags_injected_spike() -> None:
    """The edge pipeline alerts on a spike after warm-up and not on the first batch."""
    config = AppConfig.model_validate(
        {
            "edge": {"scoring": "baseline", "threshold": {"warmup_events": 100}},
            "model": {"n_features": 5},
        }
    )
    pipeline = EdgePipeline(5, config.edge, config.model)
    rng = np.random.default_rng(0)
    first = pipeline.process("m", rng.normal(size=(300, 5)).astype(np.float32))
    assert not first.alert.any()
    spike = rng.normal(size=(50, 5)).astype(np.float32)
    spike[25] = 40.0
    result = pipeline.process("m", spike)
    assert result.alert[25]
    assert result.score[25] == result.score.max()
