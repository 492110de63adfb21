"""Sequence autoencoders (LSTM and Transformer encoder) scored by reconstruction error.

Shape contract: a window batch is a float32 array of shape (B, T, F), batch first, with
B >= 1 windows of T >= 1 time steps and F features per step. The models map (B, T, F) to
(B, T, F) for any T, so a stream is scored from its first event: event k (k < ``window``) is
scored in a window of its k first rows, later events in a window of ``window`` rows ending at
the event. Weights travel as ``dict[str, np.ndarray]`` with the same ``weights``,
``load_weights`` and ``train(x) -> delta`` calls as ``AutoencoderDetector``, so the update,
privacy and aggregation path does not depend on the model.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import TypedDict, Unpack

import numpy as np
import torch
from torch import nn

from fanomad_stream.detect.autoencoder import Weights, get_weights, set_weights
from fanomad_stream.detect.base import Detector, check_batch


def check_windows(x: np.ndarray, n_features: int) -> np.ndarray:
    """Return ``x`` as a contiguous float32 (B, T, F) array; raise ValueError on a wrong shape."""
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != n_features or array.shape[1] < 1:
        msg = f"expected windows of shape (B, T>=1, {n_features}), got {array.shape}"
        raise ValueError(msg)
    return np.ascontiguousarray(array)


def sliding_windows(rows: np.ndarray, window: int, stride: int = 1) -> np.ndarray:
    """Cut rows (N, F) in time order into windows (B, T, F) with T = min(window, N).

    The last window always ends at the last row, so no row is left out of training even when
    ``stride`` does not divide N - window.
    """
    if window < 1 or stride < 1:
        msg = f"window and stride must be >= 1, got window={window!r}, stride={stride!r}"
        raise ValueError(msg)
    n = rows.shape[0]
    if n == 0:
        return np.zeros((0, min(window, 1), rows.shape[1]), dtype=np.float32)
    length = min(window, n)
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] != n - length:
        starts.append(n - length)
    return np.stack([rows[s : s + length] for s in starts]).astype(np.float32)


class StreamContext:
    """The last ``window - 1`` rows of one stream, to score each new row in its window.

    Keep one per source: windows never mix rows of two sources.
    """

    def __init__(self, window: int, n_features: int) -> None:
        if window < 1:
            msg = f"window must be >= 1, got {window!r}"
            raise ValueError(msg)
        self.window = window
        self.n_features = n_features
        self.seen = 0
        self._tail = np.zeros((0, n_features), dtype=np.float32)

    def push(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Advance by ``rows`` (N, F); yield (row indices, windows (B, T, F)) grouped by T.

        Each yielded window ends at the row whose index it carries. Only the first
        ``window - 1`` rows a stream ever receives get windows shorter than ``window``.
        """
        rows = check_batch(rows, self.n_features)
        joined = np.concatenate([self._tail, rows])
        offset = self._tail.shape[0]
        short = [i for i in range(rows.shape[0]) if offset + i + 1 < self.window]
        for i in short:
            yield np.array([i]), joined[None, : offset + i + 1]
        full = np.arange(len(short), rows.shape[0])
        if full.size:
            ends = offset + full + 1
            yield full, np.stack([joined[e - self.window : e] for e in ends])
        self.seen += rows.shape[0]
        self._tail = joined[max(joined.shape[0] - (self.window - 1), 0) :].copy()


class TrainingOptions(TypedDict, total=False):
    """Keyword options shared by every sequence detector; see ``SequenceAutoencoderDetector``."""

    window: int
    learning_rate: float
    local_epochs: int
    batch_size: int
    train_stride: int
    train_prefixes: bool
    proximal_mu: float
    seed: int


def training_windows(
    streams: Sequence[np.ndarray], window: int, stride: int, *, prefixes: bool
) -> list[np.ndarray]:
    """Cut each stream (N_i, F) into windows and group them by length T.

    Every stream gives sliding windows of ``min(window, N_i)`` rows. With ``prefixes`` it
    also gives its first rows[:k] for k < that length, the short windows a stream is scored
    in during warm-up. Returns one (B_T, T, F) array per length, shortest first.
    """
    groups: dict[int, list[np.ndarray]] = {}
    for rows in streams:
        if rows.shape[0] == 0:
            continue
        full = sliding_windows(rows, window, stride)
        groups.setdefault(full.shape[1], []).append(full)
        if prefixes:
            for k in range(1, full.shape[1]):
                groups.setdefault(k, []).append(rows[None, :k].astype(np.float32))
    return [np.concatenate(groups[length]) for length in sorted(groups)]


class SequenceAutoencoderDetector(Detector):
    """Reconstruction-error detector over windows of standardized rows.

    ``score_windows`` returns the mean squared error per window. ``score_batch`` takes rows
    (B, F) of one stream in time order, scores each row by the squared error of its own last
    step within its window (past rows only), and advances the stream context, so call it once
    per batch. For several sources, keep one ``new_context()`` per source and call
    ``score_rows``. Warm-up: the first ``window - 1`` rows are scored in shorter windows (T = 1 for
    the very first row); a model that has not trained yet scores with its seeded initial or the
    latest global weights, as the MLP does. Training sees few windows shorter than
    ``window``, so warm-up scores run high on normal data: hold alerts until
    ``context.seen >= window`` for each source. ``train_prefixes`` adds each stream's short
    prefixes to training, which lowers warm-up errors but spends training on them.

    ``train`` accepts rows (N, F) of one stream in time order, a list of such arrays (one per
    source or session, so no window mixes two of them), or ready windows (B, T, F), and
    returns the weight delta. ``last_n_windows`` is the number of windows it trained on, the
    sample count to report with the delta.
    """

    name = "sequence"

    def __init__(
        self,
        n_features: int,
        *,
        window: int = 16,
        learning_rate: float = 1e-3,
        local_epochs: int = 2,
        batch_size: int = 32,
        train_stride: int = 1,
        train_prefixes: bool = False,
        proximal_mu: float = 0.0,
        seed: int = 0,
    ) -> None:
        if n_features < 1 or window < 1 or train_stride < 1:
            msg = (
                f"n_features, window and train_stride must be >= 1, got {n_features!r}, "
                f"{window!r}, {train_stride!r}"
            )
            raise ValueError(msg)
        self.n_features = n_features
        self.window = window
        self.learning_rate = learning_rate
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.train_stride = train_stride
        self.train_prefixes = train_prefixes
        self.proximal_mu = proximal_mu
        self.seed = seed
        self.model = self._build_seeded(seed)
        self.context = StreamContext(window, n_features)
        self._generator = torch.Generator().manual_seed(seed)
        self.last_loss = float("nan")
        self.last_n_windows = 0

    @abstractmethod
    def _build(self) -> nn.Module:
        """Build the module mapping (B, T, F) to (B, T, F); called under a seeded generator."""

    def _build_seeded(self, seed: int) -> nn.Module:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return self._build()
        finally:
            torch.random.set_rng_state(generator_state)

    def weights(self) -> Weights:
        return get_weights(self.model)

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        set_weights(self.model, weights)

    @torch.no_grad()
    def step_errors(self, x: np.ndarray) -> np.ndarray:
        """Return the squared reconstruction error per step, mean over features, as (B, T)."""
        batch = torch.from_numpy(check_windows(x, self.n_features))
        self.model.eval()
        error = (self.model(batch) - batch).pow(2).mean(dim=2)
        result: np.ndarray = error.numpy().astype(np.float64)
        return result

    def score_windows(self, x: np.ndarray) -> np.ndarray:
        """Return the mean squared reconstruction error of each window (B, T, F) as (B,)."""
        result: np.ndarray = self.step_errors(x).mean(axis=1)
        return result

    def score_batch(self, x: np.ndarray) -> np.ndarray:
        return self.score_rows(x, self.context)

    def new_context(self) -> StreamContext:
        """Return an empty stream context of this detector's window, for one more source."""
        return StreamContext(self.window, self.n_features)

    def score_rows(self, x: np.ndarray, context: StreamContext) -> np.ndarray:
        """Score rows (B, F) of the stream that ``context`` follows, and advance it.

        Each row's score is the squared error of the last step of the window that ends at it.
        """
        if context.window != self.window or context.n_features != self.n_features:
            msg = (
                f"context of window {context.window} and {context.n_features} features does not "
                f"fit a detector of window {self.window} and {self.n_features} features"
            )
            raise ValueError(msg)
        scores = np.empty(np.asarray(x).shape[0], dtype=np.float64)
        for indices, windows in context.push(x):
            scores[indices] = self.step_errors(windows)[:, -1]
        return scores

    def learn_batch(self, x: np.ndarray) -> None:
        self.train(x)

    def train(self, x: np.ndarray | Sequence[np.ndarray]) -> Weights:
        """Train ``local_epochs`` over the windows of ``x`` and return (trained − start) weights.

        With ``proximal_mu`` > 0 the loss adds the FedProx term mu/2 · ||w − w_start||².
        """
        groups = [torch.from_numpy(group) for group in self._windows(x) if group.size]
        start = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        start_weights = self.weights()
        self.last_n_windows = sum(int(group.shape[0]) for group in groups)
        losses = self._fit(groups, start) if groups else []
        self.last_loss = float(np.mean(losses)) if losses else float("nan")
        trained = self.weights()
        return {name: trained[name] - start_weights[name] for name in trained}

    def _windows(self, x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(x, np.ndarray) and x.ndim == 3:
            return [check_windows(x, self.n_features)] if x.size else []
        streams = [x] if isinstance(x, np.ndarray) else list(x)
        checked = [check_batch(rows, self.n_features) for rows in streams]
        return training_windows(
            checked, self.window, self.train_stride, prefixes=self.train_prefixes
        )

    def _fit(self, groups: list[torch.Tensor], start: Mapping[str, torch.Tensor]) -> list[float]:
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)
        self.model.train()
        losses = []
        for _ in range(self.local_epochs):
            for batch in self._batches(groups):
                loss = (self.model(batch) - batch).pow(2).mean()
                losses.append(float(loss.detach()))
                if self.proximal_mu > 0:
                    drift = sum(
                        (p - start[n]).pow(2).sum() for n, p in self.model.named_parameters()
                    )
                    loss = loss + 0.5 * self.proximal_mu * drift
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return losses

    def _batches(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Shuffle within each length group, cut into batches, then shuffle the batch order."""
        batches = []
        for data in groups:
            order = torch.randperm(data.shape[0], generator=self._generator)
            for begin in range(0, data.shape[0], self.batch_size):
                batches.append(data[order[begin : begin + self.batch_size]])
        shuffled = torch.randperm(len(batches), generator=self._generator).tolist()
        return [batches[i] for i in shuffled]


class LSTMAutoencoder(nn.Module):
    """Encoder LSTM → latent vector → repeated over T → decoder LSTM → linear output.

    The latent vector is the only path from input to output, so the model cannot copy a
    window step by step and has to learn its usual shape.
    """

    def __init__(self, n_features: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.LSTM(n_features, hidden, batch_first=True)
        self.to_latent = nn.Linear(hidden, latent)
        self.decoder = nn.LSTM(latent, hidden, batch_first=True)
        self.output = nn.Linear(hidden, n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_last, _) = self.encoder(x)
        latent = torch.tanh(self.to_latent(h_last[-1]))
        repeated = latent.unsqueeze(1).expand(-1, x.shape[1], -1)
        decoded, _ = self.decoder(repeated)
        return self.output(decoded)  # type: ignore[no-any-return]


def positional_encoding(length: int, d_model: int) -> torch.Tensor:
    """Return the sinusoidal position table (length, d_model) of Vaswani et al. (2017)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    scale = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10_000.0) / d_model)
    )
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * scale)
    table[:, 1::2] = torch.cos(position * scale[: d_model // 2])
    return table


class TransformerAutoencoder(nn.Module):
    """Transformer encoder → mean-pooled latent vector → Transformer layer decoder.

    Like the LSTM model, the pooled latent vector is a bottleneck, so attention cannot learn
    the identity. Positions are sinusoidal and computed per call, so they are not weights and
    any T works.
    """

    def __init__(
        self, n_features: int, d_model: int, n_heads: int, n_layers: int, latent: int
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Linear(n_features, d_model)
        self.encoder = nn.TransformerEncoder(
            _layer(d_model, n_heads), num_layers=n_layers, enable_nested_tensor=False
        )
        self.to_latent = nn.Linear(d_model, latent)
        self.from_latent = nn.Linear(latent, d_model)
        self.decoder = nn.TransformerEncoder(
            _layer(d_model, n_heads), num_layers=1, enable_nested_tensor=False
        )
        self.output = nn.Linear(d_model, n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = positional_encoding(x.shape[1], self.d_model).to(x.dtype)
        encoded = self.encoder(self.embed(x) + positions)
        latent = torch.tanh(self.to_latent(encoded.mean(dim=1)))
        seeds = self.from_latent(latent).unsqueeze(1) + positions
        return self.output(self.decoder(seeds))  # type: ignore[no-any-return]


def _layer(d_model: int, n_heads: int) -> nn.TransformerEncoderLayer:
    # Dropout 0 keeps training reproducible under a seed without a dropout generator.
    return nn.TransformerEncoderLayer(
        d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
    )


class LSTMAutoencoderDetector(SequenceAutoencoderDetector):
    """LSTM autoencoder over windows; see ``SequenceAutoencoderDetector`` for the contract."""

    name = "lstm_ae"

    def __init__(
        self,
        n_features: int,
        *,
        hidden: int = 32,
        latent: int = 8,
        **options: Unpack[TrainingOptions],
    ) -> None:
        self.hidden = hidden
        self.latent = latent
        super().__init__(n_features, **options)

    def _build(self) -> nn.Module:
        return LSTMAutoencoder(self.n_features, self.hidden, self.latent)


class TransformerAutoencoderDetector(SequenceAutoencoderDetector):
    """Small Transformer encoder autoencoder over windows; ``n_heads`` must divide ``d_model``."""

    name = "transformer_ae"

    def __init__(
        self,
        n_features: int,
        *,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 1,
        latent: int = 8,
        **options: Unpack[TrainingOptions],
    ) -> None:
        if d_model % n_heads or d_model % 2:
            msg = (
                "d_model must be even and divisible by n_heads, got "
                f"d_model={d_model!r}, n_heads={n_heads!r}"
            )
            raise ValueError(msg)
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.latent = latent
        super().__init__(n_features, **options)

    def _build(self) -> nn.Module:
        return TransformerAutoencoder(
            self.n_features, self.d_model, self.n_heads, self.n_layers, self.latent
        )
