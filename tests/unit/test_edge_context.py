"""``edge.scoring: context``: the edge pipeline delegates to ``ContextPipeline``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from fanomad_stream.config import AppConfig, parse_config
from fanomad_stream.detect.autoencoder import build_model, get_weights
from fanomad_stream.detect.pipeline import ContextPipeline
from fanomad_stream.edge.pipeline import BatchResult, EdgePipeline
from fanomad_stream.edge.privacy import EdgePrivacy
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.run import local_only_run

N_FEATURES = 6
WARMUP = 600
SPOT_WARMUP = 500
BATCH = 100
ROWS = 1400
SHIFT = 1100  # the level shift after the warm-up


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(
    *, window_events: int = 100_000, privacy: dict[str, Any] | None = None, **context: Any
) -> AppConfig:
    return parse_config(
        {
            "model": {"n_features": N_FEATURES, "hidden": [4], "local_epochs": 1, "seed": 3},
            "edge": {
                "window_events": window_events,
                "scoring": "context",
                "context": {"warmup_rows": WARMUP, "spot_warmup": SPOT_WARMUP, **context},
            },
            "privacy": privacy or {},
        }
    )


def _rows(n: int = ROWS, seed: int = 0) -> np.ndarray:
    """Sine cycles with noise; rows 50–69 and 1100–1119 carry a level shift on 3 columns."""
    rng = np.random.default_rng(seed)
    cycle = 0.1 * np.sin(np.arange(n)[:, None] / 25 + rng.uniform(0, 6, size=N_FEATURES))
    values = 0.5 + cycle + rng.normal(scale=0.02, size=cycle.shape)
    values[50:70, :3] += 0.4
    values[SHIFT : SHIFT + 20, :3] += 0.4
    return values.astype(np.float32)


def _stream(pipeline: EdgePipeline, rows: np.ndarray, source: str = "m") -> list[BatchResult]:
    return [pipeline.process(source, rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]


@pytest.mark.parametrize("normalize", [False, True])
def test_context_scores_match_context_pipeline(normalize: bool) -> None:
    """Fed the same rows, a ContextPipeline driven by hand gives the same scores and thresholds.

    The hand-driven protocol: score the warm-up without deciding (error scales fitted once on
    the first batch), calibrate on the last ``spot_warmup`` warm-up rows, then process.
    """
    config = _config(normalize_errors=normalize)
    edge = EdgePipeline(N_FEATURES, config.edge, config.model)
    rows = _rows()
    results = _stream(edge, rows)

    reference = ContextPipeline(N_FEATURES, edge.context_config(), seed=config.model.seed)
    assert reference.detector.n_features == 2 * N_FEATURES
    seen: list[np.ndarray] = []
    scores, thresholds = [], []
    for begin in range(0, len(rows), BATCH):
        if begin == BATCH and normalize:
            reference.fit_error_scales(np.concatenate(seen))
        warmed_up = begin >= WARMUP
        if begin == WARMUP:
            reference.calibrate(np.concatenate(seen)[-SPOT_WARMUP:])
        batch = reference.process(rows[begin : begin + BATCH], decide=warmed_up)
        seen.append(batch.features)
        scores.append(batch.scores)
        thresholds.append(batch.thresholds)

    assert np.allclose(np.concatenate([r.score for r in results]), np.concatenate(scores))
    assert np.array_equal(
        np.concatenate([r.threshold for r in results]), np.concatenate(thresholds)
    )


def test_context_alerts_only_after_warmup() -> None:
    config = _config(window_events=300)
    edge = EdgePipeline(N_FEATURES, config.edge, config.model)
    results = []
    for begin in range(0, ROWS, BATCH):
        results.append(edge.process("m", _rows()[begin : begin + BATCH]))
        if edge.window_ready():
            edge.train_window()
    threshold = np.concatenate([r.threshold for r in results])
    alert = np.concatenate([r.alert for r in results])

    assert np.all(np.isinf(threshold[:WARMUP]))
    assert not alert[:WARMUP].any()  # the shift at rows 50–69 falls in the warm-up
    assert np.all(np.isfinite(threshold[WARMUP:]))
    assert alert[SHIFT : SHIFT + 25].mean() > 0.5
    assert alert[WARMUP : SHIFT - 20].mean() < 0.05
    top = np.concatenate([r.top_features for r in results])
    assert top.shape == (ROWS, 3)
    # The step's first row: the shifted columns (raw indices) carry the difference errors.
    assert set(top[SHIFT].tolist()) == {0, 1, 2}


def test_context_baseline_columns_do_not_depend_on_the_mode() -> None:
    context = _config()
    baseline = parse_config(
        {"model": context.model.model_dump(mode="json"), "edge": {"scoring": "baseline"}}
    )
    rows = _rows(600)
    a = _stream(EdgePipeline(N_FEATURES, context.edge, context.model), rows)
    b = _stream(EdgePipeline(N_FEATURES, baseline.edge, baseline.model), rows)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.hst, y.hst)
        assert np.array_equal(x.l2, y.l2)
    assert not np.allclose(
        np.concatenate([r.score for r in a]), np.concatenate([r.score for r in b])
    )


def test_context_error_scales_follow_new_weights() -> None:
    """After the warm-up, new weights refit the error scales on the calibration rows."""
    config = _config(normalize_errors=True)
    edge = EdgePipeline(N_FEATURES, config.edge, config.model)
    _stream(edge, _rows()[:800])
    state = edge.sources["m"].context
    assert state is not None
    before = state.pipeline.error_scale.copy()
    reference = state.reference
    assert reference is not None
    assert reference.shape == (SPOT_WARMUP, 2 * N_FEATURES)

    other = get_weights(build_model(config.model_inputs, config.model.hidden, seed=11))
    edge.detector.load_weights(other)
    edge.process("m", _rows()[800:900])
    expected = np.maximum(
        state.pipeline.feature_errors(reference).mean(axis=0),
        state.pipeline.config.error_scale_floor,
    )
    assert np.allclose(state.pipeline.error_scale, expected)
    assert not np.allclose(state.pipeline.error_scale, before)


def test_context_training_window_feeds_the_federation() -> None:
    config = _config(window_events=500)
    assert config.model_inputs == 2 * N_FEATURES
    edge = EdgePipeline(N_FEATURES, config.edge, config.model)
    # The aggregator's initial model has the width the edge's detector takes.
    initial = get_weights(build_model(config.model_inputs, config.model.hidden, config.model.seed))
    edge.detector.load_weights(initial)
    _stream(edge, _rows()[:500])
    assert edge.window_ready()
    delta, n_samples = edge.train_window()
    assert n_samples == 500
    assert {name: a.shape for name, a in delta.items()} == {
        name: a.shape for name, a in initial.items()
    }
    assert any(np.abs(d).max() > 0 for d in delta.values())


def test_context_window_trains_under_dp_sgd() -> None:
    config = _config(
        window_events=200, privacy={"dp_sgd": {"enabled": True, "noise_multiplier": 1.1}}
    )
    edge = EdgePipeline(N_FEATURES, config.edge, config.model)
    _stream(edge, _rows()[:200])
    before = edge.detector.weights()
    trained = EdgePrivacy(config, "site").train(edge, round_id=0)
    assert trained is not None
    assert trained.n_samples == 200
    assert trained.privacy["dp_sgd"]["epsilon"] > 0
    after = edge.detector.weights()
    for name in before:
        assert np.allclose(before[name] + trained.delta[name], after[name], atol=1e-6)


def test_local_baseline_uses_the_edge_mode() -> None:
    config = _config(window_events=300)
    scores, alerts = local_only_run(_rows(), config)
    edge = EdgePipeline(N_FEATURES, config.edge, config.model, with_hst=False)
    expected = []
    for begin in range(0, ROWS, config.edge.max_batch_records):
        expected.append(edge.process("local", _rows()[begin : begin + 500]).score)
        if edge.window_ready():
            edge.train_window()
    assert np.allclose(scores, np.concatenate(expected))
    assert not alerts[:WARMUP].any()
    assert alerts[SHIFT : SHIFT + 25].mean() > 0.5


def test_scoring_mode_is_validated() -> None:
    assert AppConfig().edge.scoring == "context"
    assert AppConfig().model_inputs == 2 * AppConfig().model.n_features
    baseline = parse_config({"edge": {"scoring": "baseline"}})
    assert baseline.model_inputs == baseline.model.n_features
    with pytest.raises(ConfigError, match=r"edge\.scoring"):
        parse_config({"edge": {"scoring": "fancy"}})
    with pytest.raises(ConfigError, match=r"edge\.context\.ema_alpha"):
        parse_config({"edge": {"context": {"ema_alpha": 0}}})
