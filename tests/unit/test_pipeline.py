from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from fanomad_stream.detect.pipeline import ContextPipeline, PipelineConfig
from fanomad_stream.evaluate.smd import MachineSeries
from fanomad_stream.evaluate.system import SHIPPED, make_system_scorer


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _series(rows: int = 800, seed: int = 0) -> MachineSeries:
    rng = np.random.default_rng(seed)
    cycle = 0.1 * np.sin(np.arange(2 * rows)[:, None] / 25 + rng.uniform(0, 6, size=6))
    values = 0.5 + cycle + rng.normal(scale=0.02, size=cycle.shape)
    values[rows + 500 : rows + 520, :3] += 0.4
    return MachineSeries("machine-1-2", values[:rows], values[rows:])


@pytest.mark.parametrize(("normalize", "level_weight"), [(True, 1.0), (False, 0.0), (False, 0.5)])
def test_pipeline_matches_harness_local_row(normalize: bool, level_weight: float) -> None:
    series = _series()
    config = replace(
        SHIPPED,
        federated=False,
        rounds=2,
        local_epochs=1,
        spot_warmup=500,
        normalize_errors=normalize,
        level_weight=level_weight,
    )
    expected = make_system_scorer(config)({"machine-1-2": series}, 3)["machine-1-2"]

    settings = PipelineConfig(
        local_epochs=1,
        spot_warmup=500,
        warmup_rows=500,
        normalize_errors=normalize,
        level_weight=level_weight,
    )
    pipeline = ContextPipeline(6, settings, seed=3)
    train_x = pipeline.features.fit_transform(series.train)
    for _ in range(2):
        pipeline.train(train_x)
    assert np.allclose(pipeline.calibrate(train_x), expected.train_scores)
    batches = [pipeline.process(series.test[i : i + 100]) for i in range(0, len(series.test), 100)]
    assert np.allclose(np.concatenate([b.scores for b in batches]), expected.test_scores)
    assert np.allclose(np.concatenate([b.thresholds for b in batches]), expected.test_thresholds)


def test_pipeline_alerts_on_injected_segment() -> None:
    series = _series()
    pipeline = ContextPipeline(6, PipelineConfig(local_epochs=3, spot_warmup=500), seed=0)
    train_x = pipeline.features.fit_transform(series.train)
    pipeline.train(train_x)
    pipeline.calibrate(train_x)
    alerts = np.concatenate(
        [pipeline.process(series.test[i : i + 50]).alerts for i in range(0, len(series.test), 50)]
    )
    assert alerts[500:530].mean() > 0.5
    assert alerts[:480].mean() < 0.05


def test_pipeline_train_returns_delta() -> None:
    series = _series()
    pipeline = ContextPipeline(6, seed=1)
    before = pipeline.detector.weights()
    delta = pipeline.train(pipeline.features.fit_transform(series.train))
    after = pipeline.detector.weights()
    assert set(delta) == set(before)
    for name in before:
        assert np.allclose(before[name] + delta[name], after[name], atol=1e-6)
    assert any(np.abs(d).max() > 0 for d in delta.values())


def test_pipeline_threshold_waits_for_warmup() -> None:
    pipeline = ContextPipeline(6, PipelineConfig(spot_warmup=500))
    batch = pipeline.process(_series().train[:100])
    assert np.all(np.isinf(batch.thresholds))
    assert not batch.alerts.any()


def test_pipeline_scalers_freeze_after_warmup() -> None:
    rows = _series().train
    pipeline = ContextPipeline(6, PipelineConfig(warmup_rows=300))
    for begin in range(0, 600, 100):
        pipeline.process(rows[begin : begin + 100])
    assert pipeline.features.levels.count == 300
    streaming = ContextPipeline(6, PipelineConfig(warmup_rows=300, learn_during_stream=True))
    for begin in range(0, 600, 100):
        streaming.process(rows[begin : begin + 100])
    assert streaming.features.levels.count == 600


def test_error_scales_equalize_features() -> None:
    series = _series()
    pipeline = ContextPipeline(6, PipelineConfig(normalize_errors=True), seed=0)
    train_x = pipeline.features.fit_transform(series.train)
    pipeline.train(train_x)
    pipeline.calibrate(train_x)
    normalized = pipeline.feature_errors(train_x) / pipeline.error_scale
    assert np.allclose(normalized.mean(axis=0), 1.0, atol=1e-6)


def test_default_score_is_the_mean_difference_error() -> None:
    series = _series()
    pipeline = ContextPipeline(6, seed=0)
    train_x = pipeline.features.fit_transform(series.train)
    pipeline.train(train_x)
    errors = pipeline.feature_errors(train_x)
    assert np.allclose(pipeline.raw_scores(train_x), errors[:, 6:].mean(axis=1))
    equal = ContextPipeline(6, PipelineConfig(level_weight=1.0), detector=pipeline.detector)
    assert np.allclose(equal.raw_scores(train_x), errors.mean(axis=1))


def test_level_weight_moves_the_score_towards_level_errors() -> None:
    rows = _series().train
    pipeline = ContextPipeline(6, PipelineConfig(warmup_rows=400), seed=0)
    features = pipeline.features.fit_transform(rows)
    errors = pipeline.feature_errors(features)
    levels, differences = errors[:, :6].mean(axis=1), errors[:, 6:].mean(axis=1)
    half = ContextPipeline(6, PipelineConfig(level_weight=0.5), detector=pipeline.detector)
    assert np.allclose(half.raw_scores(features), (0.5 * levels + differences) / 1.5)


@pytest.mark.parametrize("level_weight", [-0.1, float("nan"), float("inf")])
def test_level_weight_is_validated(level_weight: float) -> None:
    with pytest.raises(ValueError, match="level_weight"):
        PipelineConfig(level_weight=level_weight)
