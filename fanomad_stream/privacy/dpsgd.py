"""Sample-level DP-SGD (Abadi et al., CCS 2016) for small torch models, with torch.func.

Each step samples a batch by Poisson sampling (every record joins with probability q, as the
accountant assumes), computes one gradient per record with ``torch.func`` (``grad`` of a
single-record loss, vectorised by ``vmap`` over ``functional_call``), clips each per-record
gradient to L2 norm C over all parameters, sums them, adds N(0, (σ·C)²) noise to every
coordinate of the sum and divides by the expected batch size q·N. The optimizer then steps on
that gradient, which is post-processing and costs no privacy.

One window of training spends ``steps`` releases of a Poisson-subsampled Gaussian with
sampling rate q and noise multiplier σ; record them in the client's ``PrivacyLedger``.

NOTE: modules whose output for one record depends on the rest of the batch (BatchNorm in
training mode) break per-record sensitivity and are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fanomad_stream.detect.autoencoder import get_weights
from fanomad_stream.privacy.accountant import check_noise_multiplier
from fanomad_stream.privacy.dp import SecureGaussian, check_clipping_norm

Weights = dict[str, np.ndarray]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the mean squared error, the autoencoder's training loss."""
    return (output - target).pow(2).mean()


def per_sample_gradients(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Return the gradient of ``loss_fn`` for each record, shaped (B, *parameter shape).

    ``loss_fn(output, target)`` is evaluated on a batch of one record, so it sees the same
    shapes as in ordinary training with B = 1.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def record_loss(
        parameters: dict[str, torch.Tensor], record: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        output = functional_call(model, (parameters, buffers), (record.unsqueeze(0),))
        return loss_fn(output, target.unsqueeze(0))

    gradients: dict[str, torch.Tensor] = vmap(grad(record_loss), in_dims=(None, 0, 0))(
        params, inputs, targets
    )
    return gradients


def clip_per_sample(
    gradients: dict[str, torch.Tensor], *, clipping_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each record's gradient to L2 norm <= ``clipping_norm``; return it and the norms.

    The norm of a record's gradient is taken over all parameters flattened together.
    """
    squares = [g.flatten(start_dim=1).pow(2).sum(dim=1) for g in gradients.values()]
    norms = torch.stack(squares).sum(dim=0).sqrt()
    # A zero gradient keeps factor 1; the epsilon only avoids 0/0.
    factors = (clipping_norm / (norms + 1e-12)).clamp(max=1.0)
    clipped = {name: g * factors.view(-1, *([1] * (g.dim() - 1))) for name, g in gradients.items()}
    return clipped, norms


@dataclass(frozen=True)
class StepStats:
    """What one DP-SGD step saw: batch size, clipped fraction and mean per-record norm."""

    batch_size: int
    clipped_fraction: float
    mean_norm: float


def noisy_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise: SecureGaussian,
) -> tuple[dict[str, torch.Tensor], StepStats]:
    """Return the DP-SGD gradient (Σ clipped + N(0, (σC)²)) / expected_batch_size per parameter.

    An empty batch is allowed and yields pure noise, as Poisson sampling requires.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if inputs.shape[0] > 0:
        per_sample = per_sample_gradients(model, loss_fn, inputs, targets)
        clipped, norms = clip_per_sample(per_sample, clipping_norm=clipping_norm)
        sums = {name: g.sum(dim=0) for name, g in clipped.items()}
        stats = StepStats(
            int(inputs.shape[0]),
            float((norms > clipping_norm).float().mean()),
            float(norms.mean()),
        )
    else:
        sums = {name: torch.zeros_like(p) for name, p in params.items()}
        stats = StepStats(0, 0.0, 0.0)
    std = noise_multiplier * clipping_norm
    result: dict[str, torch.Tensor] = {}
    for name, total in sums.items():
        draws = noise.standard_normal(total.numel()) * std
        noised = total + torch.from_numpy(draws).to(total.dtype).view_as(total)
        result[name] = noised / expected_batch_size
    return result, stats


@dataclass(frozen=True)
class DpSgdResult:
    """The delta of one DP-SGD training window and what the accountant needs to record it."""

    delta: Weights
    steps: int
    sampling_rate: float
    noise_multiplier: float
    mean_loss: float
    clipped_fraction: float


def train_dp_sgd(
    model: nn.Module,
    x: np.ndarray,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    noise: SecureGaussian,
    learning_rate: float = 1e-3,
    local_epochs: int = 2,
    batch_size: int = 64,
    loss_fn: LossFn = reconstruction_loss,
) -> DpSgdResult:
    """Train ``model`` on window ``x`` with DP-SGD and Adam; return the weight delta.

    The model maps a (B, ...) batch to the same shape and learns to reconstruct its input,
    like ``AutoencoderDetector.train``. A window of N records runs
    ``local_epochs · ceil(N / batch_size)`` steps, each on a Poisson sample with rate
    q = batch_size / N.

    Parameters
    ----------
    model
        Any torch module mapping (B, ...) to (B, ...) without cross-record layers.
    x
        The training window, N records along the first axis.
    clipping_norm
        Largest L2 norm of one record's gradient over all parameters, in gradient units,
        > 0. Smaller bounds each record's influence more tightly but biases the gradient.
    noise_multiplier
        Ratio σ of the noise std on the summed gradient to ``clipping_norm``, >= 0; 0 gives
        no privacy. Larger is more private and noisier.
    noise
        The privacy component's generator for noise and for Poisson sampling.
    learning_rate, local_epochs, batch_size
        Adam step size, passes over the window, and the expected batch size (>= 1).
    loss_fn
        Loss of one record's output against its target (the record itself).
    """
    check_clipping_norm(clipping_norm)
    check_noise_multiplier(noise_multiplier)
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    records = int(data.shape[0])
    if records < 1 or batch_size < 1:
        msg = (
            f"need at least one record and batch_size >= 1, got {records} records and {batch_size}"
        )
        raise ValueError(msg)
    expected_batch = min(float(batch_size), float(records))
    sampling_rate = expected_batch / records
    steps = local_epochs * math.ceil(records / expected_batch)

    start = get_weights(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    losses: list[float] = []
    clipped: list[float] = []
    for _ in range(steps):
        chosen = torch.from_numpy(noise.uniform(records) < sampling_rate)
        batch = data[chosen]
        gradients, stats = noisy_gradient(
            model,
            loss_fn,
            batch,
            batch,
            clipping_norm=clipping_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch,
            noise=noise,
        )
        if stats.batch_size:
            with torch.no_grad():
                losses.append(float(loss_fn(model(batch), batch)))
            clipped.append(stats.clipped_fraction)
        for name, p in model.named_parameters():
            if name in gradients:
                p.grad = gradients[name]
        optimizer.step()
        optimizer.zero_grad()

    trained = get_weights(model)
    return DpSgdResult(
        delta={name: trained[name] - start[name] for name in trained},
        steps=steps,
        sampling_rate=sampling_rate,
        noise_multiplier=noise_multiplier,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        clipped_fraction=float(np.mean(clipped)) if clipped else 0.0,
    )
