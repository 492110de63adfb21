"""Adaptive per-source alert thresholds fitted only on past scores."""

from __future__ import annotations

import math

import numpy as np


class QuantileThreshold:
    """Threshold at a high quantile of the last ``history`` scores of one source.

    ``thresholds_for`` returns, for each row of a batch, the threshold fitted on scores
    strictly before that batch; during warm-up (fewer than ``warmup_events`` past scores) the
    threshold is +inf, so nothing alerts before there is a baseline.

    The score buffer grows with the scores seen, up to ``history``, so a source that writes
    a few windows (one HDFS block) costs a few floats and not ``history`` of them.
    """

    def __init__(
        self, quantile: float = 0.99, warmup_events: int = 200, history: int = 5000
    ) -> None:
        if not 0.5 < quantile < 1.0:
            msg = f"quantile must be in (0.5, 1), got {quantile!r}"
            raise ValueError(msg)
        self.quantile = quantile
        self.warmup_events = warmup_events
        self.history = history
        self._buffer = np.empty(0, dtype=np.float64)
        self._next = 0
        self.seen = 0

    @property
    def current(self) -> float:
        filled = min(self.seen, self.history)
        if self.seen < self.warmup_events or filled == 0:
            return math.inf
        return float(np.quantile(self._buffer[:filled], self.quantile))

    def thresholds_for(self, scores: np.ndarray) -> np.ndarray:
        """Return the threshold for each score of a batch, then learn the batch."""
        threshold = self.current
        self.learn(scores)
        return np.full(scores.shape[0], threshold)

    def learn(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        self.seen += scores.shape[0]
        scores = scores[-self.history :]
        n = scores.shape[0]
        end = self._next + n
        size = self._buffer.shape[0]
        if size < min(end, self.history):
            # Until it reaches history, the buffer is filled from 0 and has never wrapped.
            grown = np.empty(min(self.history, max(end, 2 * size)), dtype=np.float64)
            grown[:size] = self._buffer
            self._buffer = grown
        if end <= self.history:
            self._buffer[self._next : end] = scores
        else:
            first = self.history - self._next
            self._buffer[self._next :] = scores[:first]
            self._buffer[: n - first] = scores[first:]
        self._next = end % self.history
