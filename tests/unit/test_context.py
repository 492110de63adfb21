from __future__ import annotations

import numpy as np
import pytest

from fanomad_stream.detect.context import ContextFeatures, EmaSmoother


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3))


def test_features_use_state_before_batch() -> None:
    history, batch = _rows(200), _rows(50, seed=1)
    features = ContextFeatures(3, scale_floor=1e-3)
    features.learn(history)
    out = features.transform_and_learn(batch)
    levels = (batch - history.mean(axis=0)) / history.std(axis=0, ddof=1)
    assert np.allclose(out[:, :3], levels, atol=1e-5)
    assert features.levels.count == 250


def test_first_difference_crosses_batches() -> None:
    rows = _rows(300)
    whole = ContextFeatures(3)
    whole.learn(rows[:200])
    split = ContextFeatures(3)
    split.learn(rows[:200])
    one = whole.transform(rows[200:])
    two = np.concatenate(
        [
            split.transform_and_learn(rows[200:250], learn_statistics=False),
            split.transform(rows[250:]),
        ]
    )
    assert np.allclose(one, two, atol=1e-6)


def test_difference_of_first_row_is_zero() -> None:
    features = ContextFeatures(3)
    out = features.fit_transform(_rows(100))
    assert np.allclose(
        out[0, 3:],
        -features.differences.mean / np.maximum(features.differences.std, 0.01),
        atol=1e-5,
    )


def test_fit_transform_is_in_sample() -> None:
    rows = _rows(400)
    features = ContextFeatures(3)
    out = features.fit_transform(rows)
    levels = (rows - rows.mean(axis=0)) / rows.std(axis=0, ddof=1)
    assert np.allclose(out[:, :3], levels, atol=1e-5)
    # The next batch differences against the block's last row: repeating it gives a zero step.
    repeat = features.transform(rows[-1:])[0, 3:]
    zero_step = -features.differences.mean / np.maximum(features.differences.std, 0.01)
    assert np.allclose(repeat, zero_step, atol=1e-5)


def test_constant_column_is_floored_and_clipped() -> None:
    train = np.zeros((100, 2))
    train[:, 1] = np.random.default_rng(0).normal(size=100)
    features = ContextFeatures(2, scale_floor=0.01, clip=20.0)
    features.learn(train)
    out = features.transform(np.array([[0.1, 0.0], [1.0, 0.0]]))
    assert out[0, 0] == pytest.approx(10.0)
    assert out[1, 0] == pytest.approx(20.0)
    assert np.abs(out).max() <= 20.0


def test_features_reject_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        ContextFeatures(3).transform(np.zeros((4, 2)))


def test_ema_matches_recursion_across_batches() -> None:
    scores = np.random.default_rng(2).exponential(size=50)
    expected = np.empty(50)
    mean = scores[0]
    for i, score in enumerate(scores):
        mean = 0.2 * score + 0.8 * mean
        expected[i] = mean
    smoother = EmaSmoother(0.2)
    got = np.concatenate([smoother.smooth(scores[:17]), smoother.smooth(scores[17:])])
    assert np.allclose(got, expected)


def test_ema_alpha_one_is_identity() -> None:
    scores = np.arange(5.0)
    assert np.array_equal(EmaSmoother(1.0).smooth(scores), scores)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_ema_rejects_invalid_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        EmaSmoother(alpha)
