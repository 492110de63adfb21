"""``edge.scaler_warmup_rows``: a new source's first rows only fit its scaler."""

from __future__ import annotations

import numpy as np

from fanomad_stream.config import AppConfig, parse_config
from fanomad_stream.detect.scaling import StreamingScaler
from fanomad_stream.edge.pipeline import EdgePipeline

N_FEATURES = 4


def _config(warmup: int) -> AppConfig:
    return parse_config(
        {
            "model": {"n_features": N_FEATURES, "hidden": [3], "seed": 1},
            "edge": {
                "scoring": "baseline",
                "scaler_warmup_rows": warmup,
                "hst_window": 10,
                "threshold": {"warmup_events": 10},
            },
        }
    )


def _rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1000.0 + 50.0 * rng.normal(size=(n, N_FEATURES))).astype(np.float32)


def _pipeline(warmup: int) -> EdgePipeline:
    config = _config(warmup)
    return EdgePipeline(N_FEATURES, config.edge, config.model)


def test_warmup_rows_get_no_score() -> None:
    pipeline = _pipeline(5)
    result = pipeline.process("pod", _rows(8))
    assert result.score[:5].tolist() == [0.0] * 5
    assert (result.score[5:] > 0).all()
    assert np.isinf(result.threshold[:5]).all()
    assert not result.alert.any()
    assert result.hst[:5].tolist() == [0.0] * 5
    assert result.l2[:5].tolist() == [0.0] * 5
    assert result.top_features.shape == (8, 3)


def test_warmup_rows_train_only_the_scaler() -> None:
    pipeline = _pipeline(5)
    pipeline.process("pod", _rows(8))
    state = pipeline.sources["pod"]
    assert state.scaler.count == 8
    assert state.threshold.seen == 3
    assert len(pipeline.window) == 3


def test_rows_after_warmup_use_its_statistics() -> None:
    """The scored rows of the batch are standardized with the warm-up rows' statistics."""
    rows = _rows(8)
    pipeline = _pipeline(5)
    pipeline.process("pod", rows)
    scaler = StreamingScaler(N_FEATURES)
    scaler.learn(rows[:5])
    assert np.allclose(np.stack(list(pipeline.window)), scaler.transform(rows[5:]), atol=1e-5)


def test_short_batches_span_the_warmup() -> None:
    pipeline = _pipeline(5)
    first = pipeline.process("pod", _rows(3))
    second = pipeline.process("pod", _rows(3, seed=1))
    assert first.score.tolist() == [0.0] * 3
    assert second.score[:2].tolist() == [0.0] * 2
    assert second.score[2] > 0
    assert pipeline.sources["pod"].threshold.seen == 1


def test_zero_warmup_scores_first_row() -> None:
    result = _pipeline(0).process("pod", _rows(2))
    assert (result.score > 0).all()
    assert len(result.score) == 2
