"""Per-source scoring pipeline of the edge client: context features, autoencoder, EMA, SPOT.

``ContextPipeline.process`` runs one batch of raw rows in the streaming order. It computes
features from the scaler state before the batch, the reconstruction error (by default of the
first differences only, with the levels as the autoencoder's context), the smoothed score
and a threshold fitted on past scores only. Only then do the scalers and the
threshold learn the batch.
``train`` runs local epochs on a window of feature rows and returns the weight delta that a
FedAvg round averages. The scalers learn the first ``warmup_rows`` rows and then freeze
(unless ``learn_during_stream``), so a later anomaly does not shift the statistics it is
measured against. The defaults of ``PipelineConfig`` are the configuration chosen with the
SMD evaluation harness (``fanomad_stream.evaluate.harness``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fanomad_stream.detect.autoencoder import AutoencoderDetector, Weights
from fanomad_stream.detect.context import ContextFeatures, EmaSmoother
from fanomad_stream.detect.spot import SpotThreshold


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of one source's pipeline.

    Parameters
    ----------
    scale_floor
        Smallest standard deviation used to standardize levels and first differences, in the
        units of the input (SMD values are in [0, 1]).
    clip
        Largest absolute standardized feature passed to the autoencoder.
    hidden
        Hidden layer widths of the encoder; the decoder mirrors them.
    local_epochs, learning_rate, batch_size
        Adam training of one window (one FedAvg round on this client).
    ema_alpha
        Weight of the newest score in the exponential moving average, in (0, 1].
    spot_risk, spot_warmup, spot_depth
        ``SpotThreshold`` risk, calibration length and DSPOT depth (0 is plain SPOT).
    spot_median_cap
        Upper bound on the threshold, as a multiple of the median calibration score. None
        leaves it uncapped (see ``SpotThreshold``).
    normalize_errors
        Divide each feature's squared reconstruction error by its mean over the calibration
        window (floored at ``error_scale_floor``) before averaging over features.
    level_weight
        Weight of a level feature's error in the score, against 1 for a first-difference
        feature, >= 0. The score is the weighted mean of the errors; 0 scores the reconstructed
        differences only, while the autoencoder still reads and reconstructs the levels.
    warmup_rows
        Rows the scalers learn before they freeze. The measured configuration froze them after
        an SMD train half (about 23,700 rows).
    learn_during_stream
        Keep the scalers learning after ``warmup_rows`` rows.
    """

    scale_floor: float = 0.01
    clip: float = 20.0
    hidden: tuple[int, ...] = (16, 8)
    local_epochs: int = 2
    learning_rate: float = 1e-3
    batch_size: int = 64
    ema_alpha: float = 0.1
    spot_risk: float = 1e-3
    spot_warmup: int = 2000
    spot_depth: int = 0
    spot_median_cap: float | None = 13.0
    normalize_errors: bool = False
    level_weight: float = 0.0
    error_scale_floor: float = 1e-3
    warmup_rows: int = 20000
    learn_during_stream: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level_weight) and self.level_weight >= 0):
            msg = f"level_weight must be a finite number >= 0, got {self.level_weight!r}"
            raise ValueError(msg)


def column_weights(n_features: int, level_weight: float) -> np.ndarray:
    """Return the score weights of the 2F context features, which sum to 1.

    The F level features get ``level_weight`` each and the F first differences get 1.
    """
    weights = np.ones(2 * n_features)
    weights[:n_features] = level_weight
    normalized: np.ndarray = weights / weights.sum()
    return normalized


@dataclass(frozen=True)
class PipelineBatch:
    """Result of one batch: the features (for training windows) and per-row decisions."""

    features: np.ndarray
    raw_scores: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray

    @property
    def alerts(self) -> np.ndarray:
        return self.scores > self.thresholds


class ContextPipeline:
    """Stateful scorer of one source; see the module docstring for the order of steps."""

    def __init__(
        self,
        n_features: int,
        config: PipelineConfig | None = None,
        seed: int = 0,
        *,
        detector: AutoencoderDetector | None = None,
    ) -> None:
        self.n_features = n_features
        self.config = config if config is not None else PipelineConfig()
        self.seed = seed
        self.features = ContextFeatures(
            n_features, scale_floor=self.config.scale_floor, clip=self.config.clip
        )
        if detector is None:
            detector = AutoencoderDetector(
                self.features.n_outputs,
                hidden=list(self.config.hidden),
                learning_rate=self.config.learning_rate,
                local_epochs=self.config.local_epochs,
                batch_size=self.config.batch_size,
                seed=seed,
            )
        elif detector.n_features != self.features.n_outputs:
            msg = (
                f"the detector takes {detector.n_features} inputs, the context features of "
                f"{n_features} columns are {self.features.n_outputs}; build it with that width"
            )
            raise ValueError(msg)
        # Several sources of one site may share a detector: the model the federation averages.
        self.detector = detector
        self.error_scale = np.ones(self.features.n_outputs)
        self.smoother = EmaSmoother(self.config.ema_alpha)
        self.threshold = SpotThreshold(
            risk=self.config.spot_risk,
            warmup_events=self.config.spot_warmup,
            depth=self.config.spot_depth,
            median_cap=self.config.spot_median_cap,
        )
        self.column_weights = column_weights(n_features, self.config.level_weight)

    def process(self, rows: np.ndarray, *, decide: bool = True) -> PipelineBatch:
        """Score a batch of raw rows (B, F) and decide alerts from past scores only.

        With ``decide`` False every threshold is +inf and the threshold does not learn the
        scores, for rows whose scores should not calibrate it (a warm-up).
        """
        learn = (
            self.config.learn_during_stream or self.features.levels.count < self.config.warmup_rows
        )
        features = self.features.transform_and_learn(rows, learn_statistics=learn)
        raw = self.raw_scores(features)
        scores = self.smoother.smooth(raw)
        if decide:
            thresholds = self.threshold.thresholds_for(scores)
        else:
            thresholds = np.full(scores.shape, np.inf)
        return PipelineBatch(features, raw, scores, thresholds)

    def raw_scores(self, features: np.ndarray) -> np.ndarray:
        """Return the weighted reconstruction error of each feature row, before smoothing."""
        errors = self.feature_errors(features)
        if self.config.normalize_errors:
            errors = errors / self.error_scale
        return np.asarray(errors @ self.column_weights)

    @torch.no_grad()
    def feature_errors(self, features: np.ndarray) -> np.ndarray:
        """Return the squared reconstruction error of every feature, shape (B, 2F)."""
        batch = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.detector.model.eval()
        errors: np.ndarray = (self.detector.model(batch) - batch).pow(2).numpy()
        return errors.astype(np.float64)

    def fit_error_scales(self, features: np.ndarray) -> None:
        """Set each feature's error scale to its mean squared error on ``features``.

        Call it after each training window, on rows the model has just trained on.
        """
        mean_error = self.feature_errors(features).mean(axis=0)
        self.error_scale = np.maximum(mean_error, self.config.error_scale_floor)

    def calibrate(self, features: np.ndarray) -> np.ndarray:
        """Fit error scales on feature rows that precede the stream, then score them.

        The smoother and the threshold learn the scores, which are returned. Use this after
        training on a history window, so the threshold starts from that history instead of
        waiting ``spot_warmup`` stream rows.
        """
        if self.config.normalize_errors:
            self.fit_error_scales(features)
        scores = self.smoother.smooth(self.raw_scores(features))
        self.threshold.learn(scores)
        return scores

    def train(self, features: np.ndarray) -> Weights:
        """Train ``local_epochs`` on a window of feature rows; return the weight delta."""
        return self.detector.train(features)

    def load_weights(self, weights: Weights) -> None:
        """Load global (or personalised) autoencoder weights."""
        self.detector.load_weights(weights)
