"""Shape contract, seeding and learning of the LSTM and Transformer sequence autoencoders."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fanomad_stream.detect.sequence import (
    LSTMAutoencoderDetector,
    SequenceAutoencoderDetector,
    StreamContext,
    TransformerAutoencoderDetector,
    sliding_windows,
)
from fanomad_stream.federate.aggregate import apply_delta, fedavg

F = 6
WINDOW = 8

Factory = Callable[..., SequenceAutoencoderDetector]
MODELS: dict[str, Factory] = {
    "lstm": lambda **kw: LSTMAutoencoderDetector(F, hidden=16, latent=4, window=WINDOW, **kw),
    "transformer": lambda **kw: TransformerAutoencoderDetector(
        F, d_model=16, n_heads=2, latent=4, window=WINDOW, **kw
    ),
}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


def normal_rows(n: int, seed: int = 0) -> np.ndarray:
    """Rows of a noisy periodic signal: each feature is a phase-shifted sine."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    phases = np.linspace(0, np.pi, F)[None, :]
    return (np.sin(2 * np.pi * t / 10 + phases) + 0.05 * rng.standard_normal((n, F))).astype(
        np.float32
    )


@pytest.mark.parametrize("kind", sorted(MODELS))
class TestSequenceContract:
    def test_scores_single_first_event(self, kind: str) -> None:
        """A (B=1, T=1) window and the very first streamed row both get one finite score."""
        detector = MODELS[kind]()
        one = normal_rows(1)
        assert detector.score_windows(one[None]).shape == (1,)
        scores = detector.score_batch(one)
        assert scores.shape == (1,)
        assert np.isfinite(scores).all()

    def test_full_window_shapes(self, kind: str) -> None:
        """Windows (B, window, F) give (B,) window scores and (B, window) step errors."""
        detector = MODELS[kind]()
        windows = sliding_windows(normal_rows(20), WINDOW)
        assert windows.shape == (13, WINDOW, F)
        assert detector.score_windows(windows).shape == (13,)
        assert detector.step_errors(windows).shape == (13, WINDOW)

    @pytest.mark.parametrize("shape", [(WINDOW, F), (1, WINDOW, F + 1), (1, 0, F), (1, 1, 1, F)])
    def test_rejects_wrong_shape(self, kind: str, shape: tuple[int, ...]) -> None:
        """Windows that are not (B, T>=1, F) raise ValueError naming the shape."""
        detector = MODELS[kind]()
        with pytest.raises(ValueError, match="expected windows of shape"):
            detector.score_windows(np.zeros(shape, dtype=np.float32))

    def test_stream_scores_match_windows(self, kind: str) -> None:
        """score_batch over split batches equals the last-step error of each row's own window."""
        detector = MODELS[kind]()
        rows = normal_rows(20)
        streamed = np.concatenate([detector.score_batch(rows[:3]), detector.score_batch(rows[3:])])
        expected = [
            detector.step_errors(rows[None, max(0, i + 1 - WINDOW) : i + 1])[0, -1]
            for i in range(20)
        ]
        np.testing.assert_allclose(streamed, expected, rtol=1e-5)

    def test_sources_keep_separate_contexts(self, kind: str) -> None:
        """Interleaved sources scored with their own contexts match scoring each alone."""
        detector = MODELS[kind]()
        a, b = normal_rows(12, seed=1), normal_rows(12, seed=2)
        context_a, context_b = detector.new_context(), detector.new_context()
        mixed_a, mixed_b = [], []
        for i in range(0, 12, 4):
            mixed_a.append(detector.score_rows(a[i : i + 4], context_a))
            mixed_b.append(detector.score_rows(b[i : i + 4], context_b))
        alone = detector.score_rows(a, detector.new_context())
        np.testing.assert_allclose(np.concatenate(mixed_a), alone, rtol=1e-5)
        assert not np.allclose(np.concatenate(mixed_b), alone)
        with pytest.raises(ValueError, match="does not fit"):
            detector.score_rows(a, StreamContext(WINDOW + 1, F))

    def test_seed_fixes_weights_and_training(self, kind: str) -> None:
        """Detectors with one seed build and train to equal weights; another seed differs."""
        rows = normal_rows(40)
        first, second, other = MODELS[kind](seed=3), MODELS[kind](seed=3), MODELS[kind](seed=4)
        delta_first, delta_second = first.train(rows), second.train(rows)
        for name, value in first.weights().items():
            np.testing.assert_array_equal(value, second.weights()[name])
            np.testing.assert_array_equal(delta_first[name], delta_second[name])
        assert any(
            not np.array_equal(value, other.weights()[name])
            for name, value in MODELS[kind](seed=3).weights().items()
        )

    def test_training_lowers_error(self, kind: str) -> None:
        """Training on normal windows halves the error on held-out normal windows, not on noise."""
        detector = MODELS[kind](learning_rate=1e-2, local_epochs=30, train_stride=2)
        held_out = sliding_windows(normal_rows(60, seed=1), WINDOW)
        before = detector.score_windows(held_out).mean()
        detector.train(normal_rows(200))
        after = detector.score_windows(held_out).mean()
        assert after < 0.5 * before
        noise = np.random.default_rng(2).standard_normal(held_out.shape).astype(np.float32)
        assert detector.score_windows(noise).mean() > 2 * after

    def test_prefix_training_lowers_warm_up_error(self, kind: str) -> None:
        """Training on prefixes lowers the error of the short warm-up windows."""
        streams = [normal_rows(40, seed=s) for s in range(4)]
        probe = normal_rows(WINDOW - 1, seed=9)
        errors = {}
        for prefixes in (False, True):
            detector = MODELS[kind](learning_rate=1e-2, local_epochs=8, train_prefixes=prefixes)
            detector.train(streams)
            errors[prefixes] = detector.score_rows(probe, detector.new_context()).mean()
        assert errors[True] < 0.5 * errors[False]

    def test_streams_never_share_a_window(self, kind: str) -> None:
        """A list of streams trains on windows within each stream, grouped by length."""
        detector = MODELS[kind](local_epochs=1)
        detector.train([normal_rows(10), normal_rows(3), np.zeros((0, F), dtype=np.float32)])
        assert detector.last_n_windows == (10 - WINDOW + 1) + 1
        with_prefixes = MODELS[kind](local_epochs=1, train_prefixes=True)
        with_prefixes.train([normal_rows(10), normal_rows(3)])
        assert with_prefixes.last_n_windows == (10 - WINDOW + 1) + 1 + (WINDOW - 1) + 2

    def test_delta_travels_through_fedavg(self, kind: str) -> None:
        """The delta from train() is float32 per parameter and reproduces the trained weights."""
        detector = MODELS[kind]()
        start = detector.weights()
        delta = detector.train(normal_rows(30))
        assert detector.last_n_windows == 30 - WINDOW + 1
        assert all(value.dtype == np.float32 for value in delta.values())
        merged = apply_delta(start, fedavg([(delta, 1.0)], start))
        fresh = MODELS[kind]()
        fresh.load_weights(merged)
        for name, value in detector.weights().items():
            np.testing.assert_allclose(fresh.weights()[name], value, atol=1e-6)

    def test_load_weights_rejects_other_shape(self, kind: str) -> None:
        """Weights of a model with another width raise ValueError naming the parameter."""
        detector = MODELS[kind]()
        weights = detector.weights()
        name = next(iter(weights))
        weights[name] = np.zeros((1, 1), dtype=np.float32)
        with pytest.raises(ValueError, match=name):
            detector.load_weights(weights)


def test_sliding_windows_cover_last_row() -> None:
    """With a stride that does not divide N - window, the last window still ends at the last row."""
    rows = np.arange(10, dtype=np.float32)[:, None]
    windows = sliding_windows(rows, 4, stride=4)
    assert windows[:, 0, 0].tolist() == [0.0, 4.0, 6.0]
    assert sliding_windows(rows[:2], 4).shape == (1, 2, 1)


def test_stream_context_warm_up() -> None:
    """Only the first window - 1 rows of a stream get windows shorter than the window."""
    context = StreamContext(3, 1)
    first = list(context.push(np.array([[0.0], [1.0]])))
    assert [w.shape[1] for _, w in first] == [1, 2]
    second = list(context.push(np.array([[2.0], [3.0]])))
    assert len(second) == 1
    indices, windows = second[0]
    assert indices.tolist() == [0, 1]
    assert windows[:, :, 0].tolist() == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]
    assert context.seen == 4


def test_transformer_rejects_bad_heads() -> None:
    """A d_model that n_heads does not divide raises ValueError with both values."""
    with pytest.raises(ValueError, match="d_model=10, n_heads=4"):
        TransformerAutoencoderDetector(F, d_model=10, n_heads=4)
