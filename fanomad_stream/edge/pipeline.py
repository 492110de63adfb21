"""The edge client's scoring and training logic, free of Kafka so it can run offline too.

Per source (machine) the pipeline keeps a streaming scaler, a HalfSpaceTrees detector and an
alert threshold. The autoencoder is shared by the whole site, because it is the model the
federation averages. A batch of one source goes through: standardize with the statistics from
before the batch → score (autoencoder, HST, L2 norm) → threshold fitted on past scores →
learn. The autoencoder's input rows go into the site's training window. The first
``edge.scaler_warmup_rows`` rows of a source only fit its scaler: they get score 0, no alert,
HST and L2 of 0, and they never reach the threshold, HST or the training window.

``edge.scoring`` picks the autoencoder score and its threshold:

- ``baseline``: the autoencoder error of the standardized row, and a rolling quantile
  threshold.
- ``context``: each source runs a ``ContextPipeline`` on the shared autoencoder (level and
  first-difference features, the reconstruction error of the differences, EMA smoothing,
  SPOT with a cap). Its scalers learn ``edge.context.warmup_rows`` rows and freeze; no alert
  is raised before, and SPOT calibrates on the last rows of that warm-up. With
  ``edge.context.normalize_errors``, each feature's error scale is refitted on those
  calibration rows whenever the autoencoder's weights change.

The HST and L2 columns come from the standardized row in both modes, so the evaluation's
baselines do not depend on the mode.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fanomad_stream.config import EdgeSettings, ModelSettings
from fanomad_stream.detect.autoencoder import AutoencoderDetector, Weights
from fanomad_stream.detect.factory import Threshold, build_threshold
from fanomad_stream.detect.hst import HalfSpaceTreesDetector
from fanomad_stream.detect.pipeline import ContextPipeline, PipelineConfig
from fanomad_stream.detect.scaling import StreamingScaler


@dataclass
class BatchResult:
    """Scores of one source's batch, aligned with its rows."""

    score: np.ndarray  # the published score: reconstruction error (smoothed in context mode)
    threshold: np.ndarray
    alert: np.ndarray
    hst: np.ndarray
    l2: np.ndarray
    top_features: np.ndarray  # (B, 3) columns with the largest reconstruction error


class VersionedAutoencoder(AutoencoderDetector):
    """An autoencoder that counts changes of its weights through ``load_weights`` and ``train``.

    Context scoring refits its error scales when the count moves. Training that writes to
    ``model`` directly (DP-SGD) is not counted, so the scales follow it at the next
    ``load_weights``.
    """

    version = 0

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        super().load_weights(weights)
        self.version += 1

    def train(self, x: np.ndarray) -> Weights:
        delta = super().train(x)
        self.version += 1
        return delta


@dataclass
class ContextState:
    """A source's context pipeline and the feature rows its error scales are fitted on.

    During the warm-up the error scales follow the latest rows (``recent``). From the end of
    the warm-up on they are refitted on the fixed calibration rows (``reference``) only, so
    that anomalies in the stream do not raise the scales they are measured against.
    NOTE: an anomaly inside the calibration rows raises its columns' scales for good.
    """

    pipeline: ContextPipeline
    recent: deque[np.ndarray]
    reference: np.ndarray | None = None
    scaled_version: int = -1


@dataclass
class SourceState:
    scaler: StreamingScaler
    hst: HalfSpaceTreesDetector
    threshold: Threshold
    seen: int = 0
    context: ContextState | None = None


@dataclass
class EdgePipeline:
    """Scoring state of one site plus its training window."""

    n_features: int
    edge: EdgeSettings
    model: ModelSettings
    sources: dict[str, SourceState] = field(default_factory=dict)
    detector: VersionedAutoencoder = field(init=False)
    window: deque[np.ndarray] = field(init=False)
    events_since_training: int = 0
    with_hst: bool = True  # the offline local-only baseline skips it: it needs the autoencoder only

    def __post_init__(self) -> None:
        context = self.edge.scoring == "context"
        self.detector = VersionedAutoencoder(
            2 * self.n_features if context else self.n_features,
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
                threshold=build_threshold(settings.threshold),
            )
            if settings.scoring == "context":
                state.context = ContextState(
                    ContextPipeline(
                        self.n_features,
                        self.context_config(),
                        seed=self.model.seed,
                        detector=self.detector,
                    ),
                    deque(maxlen=max(settings.window_events, settings.context.spot_warmup)),
                )
            self.sources[name] = state
        return state

    def context_config(self) -> PipelineConfig:
        """Return the ``ContextPipeline`` settings that ``edge.context`` and ``model`` give."""
        context = self.edge.context
        return PipelineConfig(
            scale_floor=self.edge.scale_floor,
            clip=context.clip,
            hidden=tuple(self.model.hidden),
            local_epochs=self.model.local_epochs,
            learning_rate=self.model.learning_rate,
            batch_size=self.model.batch_size,
            ema_alpha=context.ema_alpha,
            spot_risk=context.spot_risk,
            spot_warmup=context.spot_warmup,
            spot_median_cap=context.spot_median_cap,
            normalize_errors=context.normalize_errors,
            level_weight=context.level_weight,
            warmup_rows=context.warmup_rows,
        )

    def process(self, source: str, values: np.ndarray) -> BatchResult:
        """Score a (B, F) batch of one source in arrival order, then learn from it."""
        state = self._source(source)
        # Rows of the scaler warm-up are learned first, so the later rows of the same batch
        # are standardized with statistics of earlier rows only.
        n_warmup = min(values.shape[0], max(0, self.edge.scaler_warmup_rows - state.scaler.count))
        state.scaler.learn(values[:n_warmup])
        scored = values[n_warmup:]
        z = state.scaler.transform(scored)
        hst = state.hst.score_and_learn(z) if self.with_hst else np.zeros(z.shape[0])
        hst = _after_warmup(n_warmup, hst, 0.0)
        l2 = _after_warmup(n_warmup, np.linalg.norm(z, axis=1).astype(np.float64), 0.0)

        if state.context is None:
            reconstruction = self.detector.reconstruction_error(z)
            score = _after_warmup(n_warmup, reconstruction.mean(axis=1), 0.0)
            threshold = state.threshold.thresholds_for(score[n_warmup:])
            threshold = _after_warmup(n_warmup, threshold, np.inf)
            top = _after_warmup(n_warmup, np.argsort(-reconstruction, axis=1)[:, :3], 0)
            self.window.extend(z)
        else:
            score, threshold, top = self._process_context(state.context, values)

        state.scaler.learn(scored)
        state.seen += values.shape[0]
        self.events_since_training += values.shape[0]
        return BatchResult(
            score=score,
            threshold=threshold,
            alert=score > threshold,
            hst=hst,
            l2=l2,
            top_features=top,
        )

    def _process_context(
        self, context: ContextState, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run a batch through the source's ``ContextPipeline`` and return its decisions.

        Returns the scores, the thresholds and the 3 raw columns with the largest share of
        the score.
        """
        pipeline = context.pipeline
        warmed_up = pipeline.features.levels.count >= pipeline.config.warmup_rows
        if context.reference is None and context.recent and warmed_up:
            # The scalers froze before this batch, so the error scales and SPOT are fitted on
            # the latest warm-up rows, as the offline harness does on a train half.
            # NOTE: those rows keep the features computed while the scalers still learned,
            # while the harness recomputes a train half's features with the final scalers.
            recent = np.stack(list(context.recent))
            context.reference = recent[-pipeline.config.spot_warmup :]
            context.recent.clear()
            pipeline.calibrate(context.reference)
            context.scaled_version = self.detector.version
        fit_rows = context.reference
        if fit_rows is None and context.recent:
            fit_rows = np.stack(list(context.recent))
        if (
            fit_rows is not None
            and pipeline.config.normalize_errors
            and context.scaled_version != self.detector.version
        ):
            pipeline.fit_error_scales(fit_rows)
            context.scaled_version = self.detector.version

        calibrated = context.reference is not None
        batch = pipeline.process(values, decide=calibrated)
        if not calibrated:
            context.recent.extend(batch.features)
        self.window.extend(batch.features)
        # A raw column's share of the score is the sum of its weighted level and difference
        # errors, so with the default level weight 0 only the differences explain an alert.
        errors = pipeline.feature_errors(batch.features) / pipeline.error_scale
        errors = errors * pipeline.column_weights
        by_column = errors[:, : self.n_features] + errors[:, self.n_features :]
        top = np.argsort(-by_column, axis=1)[:, :3]
        return batch.scores, batch.thresholds, top

    def snapshot(self) -> dict[str, Any]:
        """Return references to every piece of state that scoring and training change.

        The pieces are not copied: pickle them before the next ``process`` or training call.
        The context pipelines share ``detector``, and one pickle of the returned dict keeps
        that sharing.
        """
        return {
            "sources": self.sources,
            "detector": self.detector,
            "window": list(self.window),
            "events_since_training": self.events_since_training,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the scoring state with one that ``snapshot`` returned and a pickle kept.

        The caller checks that the state comes from the same edge and model settings. Raises
        KeyError, TypeError or ValueError on a state of another shape and then changes nothing.
        """
        detector = state["detector"]
        if not isinstance(detector, VersionedAutoencoder):
            msg = f"state holds a {type(detector).__name__} detector, expected VersionedAutoencoder"
            raise TypeError(msg)
        sources = dict(state["sources"])
        window = deque(state["window"], maxlen=self.edge.window_events)
        events_since_training = int(state["events_since_training"])
        self.sources = sources
        self.detector = detector
        self.window = window
        self.events_since_training = events_since_training

    def window_ready(self) -> bool:
        return self.events_since_training >= self.edge.window_events and len(self.window) > 0

    def train_window(self) -> tuple[Weights, int]:
        """Train on the window from the current weights; return (delta, n_samples)."""
        data = np.stack(list(self.window))
        delta = self.detector.train(data)
        self.events_since_training = 0
        return delta, data.shape[0]


def _after_warmup(n_warmup: int, values: np.ndarray, fill: float) -> np.ndarray:
    """Prepend ``n_warmup`` rows of ``fill`` to the per-row ``values`` of the scored rows."""
    head = np.full((n_warmup, *values.shape[1:]), fill, dtype=values.dtype)
    return np.concatenate([head, values])
