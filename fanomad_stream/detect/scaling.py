"""Streaming standardization with a floor on the scale.

Only past rows move the statistics: a batch is transformed with the state from before it and
learned afterwards, so a score never depends on the future. The scale floor stops columns that
were constant so far from turning a tiny change into a z-score in the thousands, and the clip
bounds what is left: a column that was 0 on every past row and then jumps to 3600 (a timeout
in seconds) still gives 3600 / floor without it.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CLIP = 100.0


class StreamingScaler:
    """Per-feature running mean and variance (Chan et al. parallel update), mergeable.

    Parameters
    ----------
    n_features
        Width of every row.
    scale_floor
        Smallest standard deviation used to divide, in the units of the input. Must be > 0.
    clip
        Largest absolute standardized value ``transform`` returns, > 0. The default of 100
        never binds on inputs in [0, 1] with the default floor of 0.01, and it keeps one
        extreme row from dominating an autoencoder's squared-error training loss.
    """

    def __init__(
        self, n_features: int, scale_floor: float = 0.01, clip: float = DEFAULT_CLIP
    ) -> None:
        if scale_floor <= 0 or not clip > 0:
            msg = f"scale_floor and clip must be > 0, got {scale_floor!r} and {clip!r}"
            raise ValueError(msg)
        self.n_features = n_features
        self.scale_floor = scale_floor
        self.clip = clip
        self.count = 0
        self._mean = np.zeros(n_features, dtype=np.float64)
        self._m2 = np.zeros(n_features, dtype=np.float64)

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones(self.n_features)
        return np.asarray(np.sqrt(self._m2 / (self.count - 1)))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardize rows with the statistics seen so far, clipped to +-``clip``.

        Before any row the statistics are mean 0 and scale 1, and after one row the scale is
        still 1, so the first two rows of a source pass in their own units, up to the clip.
        """
        x = np.asarray(x, dtype=np.float64)
        if self.count == 0:
            return np.asarray(np.clip(x, -self.clip, self.clip), dtype=np.float32)
        scale = np.maximum(self.std, self.scale_floor)
        z = np.clip((x - self._mean) / scale, -self.clip, self.clip)
        return np.asarray(z, dtype=np.float32)

    def learn(self, x: np.ndarray) -> None:
        """Fold a batch of rows into the statistics."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return
        other = StreamingScaler(self.n_features, self.scale_floor, self.clip)
        other.count = x.shape[0]
        other._mean = x.mean(axis=0)
        other._m2 = ((x - other._mean) ** 2).sum(axis=0)
        self += other

    def __iadd__(self, other: StreamingScaler) -> StreamingScaler:
        if other.count == 0:
            return self
        total = self.count + other.count
        delta = other._mean - self._mean
        self._mean = self._mean + delta * (other.count / total)
        self._m2 = self._m2 + other._m2 + delta**2 * (self.count * other.count / total)
        self.count = total
        return self

    def state(self) -> dict[str, object]:
        return {"count": self.count, "mean": self._mean.copy(), "m2": self._m2.copy()}

    def load_state(self, state: dict[str, object]) -> None:
        self.count = int(state["count"])  # type: ignore[call-overload]
        self._mean = np.asarray(state["mean"], dtype=np.float64).copy()
        self._m2 = np.asarray(state["m2"], dtype=np.float64).copy()
