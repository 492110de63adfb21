"""The edge client's scoring and training logic, free of Kafka so it can run offline too.

Per source (machine) the pipeline keeps a streaming scaler, a HalfSpaceTrees detector and an
alert threshold; the autoencoder is shared by the whole site because it is the model the
federation averages. A batch of one source goes through: standardize with the statistics from
before the batch → score (autoencoder, HST, L2 norm) → threshold fitted on past scores →
learn. Standardized rows go into the site's training window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fanomad_stream.config import EdgeSettings, ModelSettings
from fanomad_stream.detect.autoencoder import AutoencoderDetector, Weights
from fanomad_stream.detect.hst import HalfSpaceTreesDetector
from fanomad_stream.detect.scaling import StreamingScaler
from fanomad_stream.detect.threshold import QuantileThreshold


@dataclass
class BatchResult:
    """Scores of one source's batch, aligned with its rows."""

    score: np.ndarray  # the published score: autoencoder reconstruction error
    threshold: np.ndarray
    alert: np.ndarray
    hst: np.ndarray
    l2: np.ndarray
    top_features: np.ndarray  # (B, 3) columns with the largest reconstruction error


@dataclass
class SourceState:
    scaler: StreamingScaler
    hst: HalfSpaceTreesDetector
    threshold: QuantileThreshold
    seen: int = 0


@dataclass
class EdgePipeline:
    """Scoring state of one site plus its training window."""

    n_features: int
    edge: EdgeSettings
    model: ModelSettings
    sources: dict[str, SourceState] = field(default_factory=dict)
    detector: AutoencoderDetector = field(init=False)
    window: deque[np.ndarray] = field(init=False)
    events_since_training: int = 0
    with_hst: bool = True  # the offline local-only baseline skips it: it needs the autoencoder only

    def __post_init__(self) -> None:
        self.detector = AutoencoderDetector(
            self.n_features,
            hidden=self.model.hidden,
            learning_rate=self.model.learning_rate,
            local_epochs=self.model.local_epochs,
            batch_size=self.model.batch_size,
            proximal_mu=self.model.proximal_mu,
            seed=self.model.seed,
        )
        self.window = deque(maxlen=self.edge.window_events)

    def _source(self, name: str) -> SourceState:
        state = self.sources.get(name)
        if state is None:
            settings = self.edge
            state = SourceState(
                scaler=StreamingScaler(self.n_features, settings.scale_floor),
                hst=HalfSpaceTreesDetector(
                    self.n_features,
                    n_trees=settings.hst_trees,
                    height=settings.hst_height,
                    window_size=settings.hst_window,
                    seed=self.model.seed,
                ),
                threshold=QuantileThreshold(
                    settings.threshold.quantile,
                    settings.threshold.warmup_events,
                    settings.threshold.history,
                ),
            )
            self.sources[name] = state
        return state

    def process(self, source: str, values: np.ndarray) -> BatchResult:
        """Score a (B, F) batch of one source in arrival order, then learn from it."""
        state = self._source(source)
        z = state.scaler.transform(values)

        reconstruction = self.detector.reconstruction_error(z)
        score = reconstruction.mean(axis=1)
        hst = state.hst.score_and_learn(z) if self.with_hst else np.zeros(z.shape[0])
        l2 = np.linalg.norm(z, axis=1).astype(np.float64)
        threshold = state.threshold.thresholds_for(score)
        top = np.argsort(-reconstruction, axis=1)[:, :3]

        state.scaler.learn(values)
        state.seen += values.shape[0]
        self.window.extend(z)
        self.events_since_training += values.shape[0]
        return BatchResult(
            score=score,
            threshold=threshold,
            alert=score > threshold,
            hst=hst,
            l2=l2,
            top_features=top,
        )

    def window_ready(self) -> bool:
        return self.events_since_training >= self.edge.window_events and len(self.window) > 0

    def train_window(self) -> tuple[Weights, int]:
        """Train on the window from the current weights; return (delta, n_samples)."""
        data = np.stack(list(self.window))
        delta = self.detector.train(data)
        self.events_since_training = 0
        return delta, data.shape[0]
