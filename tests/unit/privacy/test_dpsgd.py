"""DP-SGD: per-sample gradients, per-sample clipping, noise and window training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fanomad_stream.detect.autoencoder import build_model
from fanomad_stream.privacy.dp import SecureGaussian
from fanomad_stream.privacy.dpsgd import (
    clip_per_sample,
    noisy_gradient,
    per_sample_gradients,
    reconstruction_loss,
    train_dp_sgd,
)


def _batch(rows: int = 16, features: int = 6, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, features, generator=generator) * scale


def test_per_sample_gradients_match_loop() -> None:
    """vmap per-sample gradients equal one backward pass per record."""
    model = build_model(6, [4, 2], seed=1)
    x = _batch(5)
    batched = per_sample_gradients(model, reconstruction_loss, x, x)
    for i in range(5):
        model.zero_grad()
        reconstruction_loss(model(x[i : i + 1]), x[i : i + 1]).backward()  # type: ignore[no-untyped-call]
        for name, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(batched[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_each_sample() -> None:
    """Every clipped per-sample gradient has norm <= C, and small ones are unchanged."""
    model = build_model(6, [4, 2], seed=2)
    x = torch.cat([_batch(8, scale=50.0), _batch(8, scale=1e-3)])
    gradients = per_sample_gradients(model, reconstruction_loss, x, x)
    clipped, norms = clip_per_sample(gradients, clipping_norm=0.5)
    after = torch.stack([g.flatten(1).pow(2).sum(1) for g in clipped.values()]).sum(0).sqrt()
    assert bool((norms[:8] > 0.5).all())
    assert bool((after <= 0.5 * (1 + 1e-5)).all())
    torch.testing.assert_close(after[norms <= 0.5], norms[norms <= 0.5])


def test_noise_std_matches() -> None:
    """With zero gradients the DP-SGD gradient is pure noise with std σC / batch."""
    model = nn.Linear(100, 100)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = torch.zeros(4, 100)
    gradient, stats = noisy_gradient(
        model,
        reconstruction_loss,
        x,
        x,
        clipping_norm=2.0,
        noise_multiplier=1.5,
        expected_batch_size=4.0,
        noise=SecureGaussian(test_seed=4),
    )
    values = torch.cat([g.flatten() for g in gradient.values()])
    assert stats.batch_size == 4
    assert float(values.std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.03)
    assert abs(float(values.mean())) < 0.02


def test_empty_batch_still_noised() -> None:
    """An empty Poisson batch yields noise only, never a skipped step."""
    model = nn.Linear(10, 10)
    empty = torch.zeros(0, 10)
    gradient, stats = noisy_gradient(
        model,
        reconstruction_loss,
        empty,
        empty,
        clipping_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=2.0,
        noise=SecureGaussian(test_seed=5),
    )
    assert stats.batch_size == 0
    assert float(gradient["weight"].abs().sum()) > 0


def test_train_window_autoencoder() -> None:
    """DP-SGD on an autoencoder window returns a finite delta and the accounting figures."""
    model = build_model(6, [4, 2], seed=3)
    x = _batch(128).numpy()
    result = train_dp_sgd(
        model,
        x,
        clipping_norm=1.0,
        noise_multiplier=1.1,
        noise=SecureGaussian(test_seed=6),
        local_epochs=2,
        batch_size=32,
    )
    assert set(result.delta) == set(model.state_dict())
    assert all(np.all(np.isfinite(d)) for d in result.delta.values())
    assert any(np.any(d != 0) for d in result.delta.values())
    assert result.steps == 8
    assert result.sampling_rate == 0.25


def test_train_window_learns_without_noise() -> None:
    """With σ = 0 and loose clipping, DP-SGD lowers the reconstruction loss."""
    model = build_model(6, [4], seed=4)
    x = _batch(256)
    with torch.no_grad():
        before = float(reconstruction_loss(model(x), x))
    train_dp_sgd(
        model,
        x.numpy(),
        clipping_norm=10.0,
        noise_multiplier=0.0,
        noise=SecureGaussian(test_seed=7),
        learning_rate=1e-2,
        local_epochs=10,
        batch_size=32,
    )
    with torch.no_grad():
        after = float(reconstruction_loss(model(x), x))
    assert after < before


class _ConvAutoencoder(nn.Module):
    """A (B, C, L) → (B, C, L) model, to show any same-shape module works."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # type: ignore[no-any-return]


def test_train_window_conv_model() -> None:
    """A convolutional same-shape model trains under DP-SGD too."""
    model = _ConvAutoencoder()
    x = np.random.default_rng(0).standard_normal((40, 2, 12)).astype(np.float32)
    result = train_dp_sgd(
        model,
        x,
        clipping_norm=1.0,
        noise_multiplier=1.0,
        noise=SecureGaussian(test_seed=8),
        local_epochs=1,
        batch_size=10,
    )
    assert result.delta["conv.weight"].shape == (2, 2, 3)
    assert result.steps == 4
