"""PyTorch MLP autoencoder scored by reconstruction error, with windowed local training."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fanomad_stream.detect.base import Detector, check_batch

Weights = dict[str, np.ndarray]


class MLPAutoencoder(nn.Module):
    """Symmetric encoder/decoder: n_features → hidden… → hidden reversed → n_features."""

    def __init__(self, n_features: int, hidden: list[int]) -> None:
        super().__init__()
        sizes = [n_features, *hidden]
        encoder: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            encoder += [nn.Linear(a, b), nn.ReLU()]
        decoder: list[nn.Module] = []
        reverse = sizes[::-1]
        for a, b in zip(reverse[:-1], reverse[1:], strict=True):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        decoder.pop()  # the output layer is linear
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # type: ignore[no-any-return]


def build_model(n_features: int, hidden: list[int], seed: int) -> MLPAutoencoder:
    """Build the autoencoder with weights drawn from a generator seeded by ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MLPAutoencoder(n_features, hidden)
    finally:
        torch.random.set_rng_state(generator_state)


def get_weights(model: nn.Module) -> Weights:
    """Copy the parameters out as float32 numpy arrays keyed by parameter name."""
    return {name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load weights; raise ValueError naming the first missing or misshapen parameter."""
    state = model.state_dict()
    for name, tensor in state.items():
        if name not in weights:
            raise ValueError(f"weights lack parameter {name!r}")
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ValueError(f"parameter {name!r} has shape {weights[name].shape}, model needs {tuple(tensor.shape)}")
    model.load_state_dict({name: torch.from_numpy(np.array(weights[name], dtype=np.float32)) for name in state})


class AutoencoderDetector(Detector):
    """Reconstruction-error detector over standardized rows.

    The score is the mean squared reconstruction error of a row. Scoring works from the first
    event: before any training the weights are the (seeded) initial or the latest global ones.
    ``train`` runs local epochs of Adam on a window and returns the weight delta against the
    weights it started from, which is what the edge client publishes.
    """

    name = "ae"

    def __init__(
        self, n_features: int, *, hidden: list[int], learning_rate: float = 1e-3,
        local_epochs: int = 2, batch_size: int = 64, proximal_mu: float = 0.0, seed: int = 0,
    ) -> None:
        self.n_features = n_features
        self.hidden = list(hidden)
        self.learning_rate = learning_rate
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.proximal_mu = proximal_mu
        self.seed = seed
        self.model = build_model(n_features, self.hidden, seed)
        self._generator = torch.Generator().manual_seed(seed)
        self.last_loss = float("nan")

    def weights(self) -> Weights:
        return get_weights(self.model)

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        set_weights(self.model, weights)

    @torch.no_grad()
    def score_batch(self, x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(check_batch(x, self.n_features))
        self.model.eval()
        error = (self.model(batch) - batch).pow(2).mean(dim=1)
        return error.numpy().astype(np.float64)

    def learn_batch(self, x: np.ndarray) -> None:
        self.train(x)

    def train(self, x: np.ndarray) -> Weights:
        """Train ``local_epochs`` over the window and return (trained − start) weights.

        With ``proximal_mu`` > 0 the loss adds the FedProx term mu/2 · ||w − w_start||², which
        keeps the local model near the global weights it started from.
        """
        data = torch.from_numpy(check_batch(x, self.n_features))
        start = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        start_weights = self.weights()
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
        self.model.train()
        losses = []
        for _ in range(self.local_epochs):
            order = torch.randperm(data.shape[0], generator=self._generator)
            for begin in range(0, data.shape[0], self.batch_size):
                batch = data[order[begin : begin + self.batch_size]]
                loss = (self.model(batch) - batch).pow(2).mean()
                losses.append(float(loss.detach()))
                if self.proximal_mu > 0:
                    drift = sum((p - start[n]).pow(2).sum() for n, p in self.model.named_parameters())
                    loss = loss + 0.5 * self.proximal_mu * drift
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        self.last_loss = float(np.mean(losses)) if losses else float("nan")
        trained = self.weights()
        return {name: trained[name] - start_weights[name] for name in trained}
