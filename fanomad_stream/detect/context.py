"""Temporal context for row detectors: level and first-difference features, score smoothing.

A single standardized row misses anomalies that show as a sudden change rather than an
unusual level, and point scores are noisy inside anomaly segments that last minutes. Two
stateful pieces add that context and keep the streaming contract (a batch is transformed with
the state from before it, and learned afterwards):

* ``ContextFeatures`` turns raw rows into ``[z(x_t), z(x_t - x_{t-1})]``: the level and the
  first difference, each standardized by its own ``StreamingScaler`` with a scale floor, then
  clipped to ``±clip`` so that no single column dominates a reconstruction error.
* ``EmaSmoother`` replaces each score by an exponential moving average of the scores so far.
"""

from __future__ import annotations

import numpy as np

from fanomad_stream.detect.scaling import StreamingScaler


class ContextFeatures:
    """Streaming map from raw rows (B, F) to context features (B, 2F).

    Parameters
    ----------
    n_features
        Width ``F`` of a raw row.
    scale_floor
        Smallest standard deviation used to divide, for levels and differences alike, in the
        units of the input. Must be > 0.
    clip
        Largest absolute standardized value passed on. Must be > 0.

    The first row ever seen has no predecessor; its difference is taken as 0.
    """

    def __init__(self, n_features: int, *, scale_floor: float = 0.01, clip: float = 20.0) -> None:
        if clip <= 0:
            msg = f"clip must be > 0, got {clip!r}"
            raise ValueError(msg)
        self.n_features = n_features
        self.scale_floor = scale_floor
        self.clip = clip
        self.levels = StreamingScaler(n_features, scale_floor=scale_floor)
        self.differences = StreamingScaler(n_features, scale_floor=scale_floor)
        self._last_row: np.ndarray | None = None

    @property
    def n_outputs(self) -> int:
        return 2 * self.n_features

    def _differences(self, x: np.ndarray) -> np.ndarray:
        previous = x[:1] if self._last_row is None else self._last_row[None, :]
        return np.diff(np.concatenate([previous, x]), axis=0)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Return the float32 context features of a batch, using only the state before it."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            msg = f"expected a batch of shape (B, {self.n_features}), got {x.shape}"
            raise ValueError(msg)
        features = np.concatenate(
            [self.levels.transform(x), self.differences.transform(self._differences(x))], axis=1
        )
        clipped: np.ndarray = np.clip(features, -self.clip, self.clip).astype(np.float32)
        return clipped

    def learn(self, x: np.ndarray) -> None:
        """Fold a batch of raw rows into the level and difference statistics."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return
        self.levels.learn(x)
        self.differences.learn(self._differences(x))
        self._last_row = x[-1].copy()

    def transform_and_learn(self, x: np.ndarray, *, learn_statistics: bool = True) -> np.ndarray:
        """Transform a batch with the state from before it, then learn it.

        With ``learn_statistics`` False the scalers stay frozen and only the row that the next
        first difference starts from moves on.
        """
        features = self.transform(x)
        if learn_statistics:
            self.learn(x)
        elif x.shape[0]:
            self._last_row = np.asarray(x[-1], dtype=np.float64).copy()
        return features

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        """Learn a block of rows, then return its features under the updated statistics.

        This is for a training window that is scored in-sample; a stream uses
        ``transform_and_learn``. The first difference of the block starts from the last row
        seen before it.
        """
        previous = self._last_row
        self.learn(x)
        after = self._last_row
        self._last_row = previous
        features = self.transform(x)
        self._last_row = after
        return features


class EmaSmoother:
    """Causal exponential moving average of a score stream: m_t = a·s_t + (1 − a)·m_{t−1}.

    Parameters
    ----------
    alpha
        Weight ``a`` of the newest score, in (0, 1]. 1 disables smoothing; 0.1 averages over
        about the last 10 rows (1/a). The first score starts the average.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            msg = f"alpha must be in (0, 1], got {alpha!r}"
            raise ValueError(msg)
        self.alpha = alpha
        self._mean: float | None = None

    def smooth(self, scores: np.ndarray) -> np.ndarray:
        """Return the smoothed scores of a batch and carry the average to the next batch."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        out = np.empty_like(scores)
        mean = self._mean
        keep = 1.0 - self.alpha
        for i, score in enumerate(scores):
            mean = score if mean is None else self.alpha * score + keep * mean
            out[i] = mean
        self._mean = mean
        return out
