"""River's HalfSpaceTrees behind the batch detector contract."""

from __future__ import annotations

import numpy as np
from river import anomaly

from fanomad_stream.detect.base import Detector, check_batch


class HalfSpaceTreesDetector(Detector):
    """Online HalfSpaceTrees (Tan et al., 2011) as implemented by River.

    HST expects features in [0, 1]; standardized inputs are squashed with
    ``0.5 + z / (2 * z_range)`` and clipped, so |z| >= z_range lands on the boundary. River
    scores one event at a time, so this wrapper loops in Python; it is the online baseline, not
    the hot model. Warm-up: River returns 0 until its first reference window (``window_size``
    events) is full.
    """

    name = "hst"

    def __init__(
        self,
        n_features: int,
        *,
        n_trees: int = 25,
        height: int = 12,
        window_size: int = 250,
        z_range: float = 4.0,
        seed: int = 0,
    ) -> None:
        self.n_features = n_features
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.z_range = z_range
        self.seed = seed
        self._model = anomaly.HalfSpaceTrees(
            n_trees=n_trees, height=height, window_size=window_size, seed=seed
        )
        self._keys = list(range(n_features))

    def _rows(self, x: np.ndarray) -> list[dict[int, float]]:
        squashed = np.clip(0.5 + check_batch(x, self.n_features) / (2 * self.z_range), 0.0, 1.0)
        return [dict(zip(self._keys, row.tolist(), strict=True)) for row in squashed]

    def score_batch(self, x: np.ndarray) -> np.ndarray:
        return np.array([self._model.score_one(row) for row in self._rows(x)], dtype=np.float64)

    def learn_batch(self, x: np.ndarray) -> None:
        for row in self._rows(x):
            self._model.learn_one(row)

    def score_and_learn(self, x: np.ndarray) -> np.ndarray:
        """Score each row with the model as it was before that row, then learn the row."""
        scores = np.empty(x.shape[0], dtype=np.float64)
        for i, row in enumerate(self._rows(x)):
            scores[i] = self._model.score_one(row)
            self._model.learn_one(row)
        return scores
