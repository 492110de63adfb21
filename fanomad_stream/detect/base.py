"""The detector contract shared by the online and the neural detectors."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Detector(ABC):
    """Scores rows of a feature matrix; a higher score means more anomalous.

    Detectors work on batches: ``X`` has shape (B, F) with float32 values, one row per event,
    and ``score_batch`` returns shape (B,). A detector keeps no I/O and no logging.
    """

    name: str = "detector"

    @abstractmethod
    def score_batch(self, x: np.ndarray) -> np.ndarray:
        """Return one anomaly score per row, without learning from the rows."""

    @abstractmethod
    def learn_batch(self, x: np.ndarray) -> None:
        """Update the detector with rows that were already scored."""


def check_batch(x: np.ndarray, n_features: int) -> np.ndarray:
    """Return ``x`` as a contiguous float32 (B, F) array; raise ValueError on a wrong shape."""
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != n_features:
        msg = f"expected a batch of shape (B, {n_features}), got {array.shape}"
        raise ValueError(msg)
    return np.ascontiguousarray(array)
