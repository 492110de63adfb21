"""One place that builds the detector a ``ModelSettings`` names, for edge and aggregator."""

from __future__ import annotations

from fanomad_stream.config import ModelSettings, ThresholdSettings
from fanomad_stream.detect.autoencoder import AutoencoderDetector, Weights
from fanomad_stream.detect.sequence import (
    LSTMAutoencoderDetector,
    SequenceAutoencoderDetector,
    TransformerAutoencoderDetector,
)
from fanomad_stream.detect.spot import SpotThreshold
from fanomad_stream.detect.threshold import QuantileThreshold

ModelDetector = AutoencoderDetector | SequenceAutoencoderDetector
Threshold = QuantileThreshold | SpotThreshold


def build_threshold(settings: ThresholdSettings) -> Threshold:
    """Build the alert threshold ``settings.kind`` names, for one source or site."""
    if settings.kind == "spot":
        return SpotThreshold(
            risk=settings.spot_risk,
            warmup_events=settings.warmup_events,
            median_cap=settings.spot_median_cap,
        )
    return QuantileThreshold(settings.quantile, settings.warmup_events, settings.history)


def build_detector(settings: ModelSettings) -> ModelDetector:
    """Build the seeded detector of ``settings.kind`` with ``settings.n_features`` inputs.

    Raises ValueError when the sizes do not fit the kind (for example a Transformer width
    that ``n_heads`` does not divide).
    """
    if settings.kind == "mlp_autoencoder":
        return AutoencoderDetector(
            settings.n_features,
            hidden=settings.hidden,
            learning_rate=settings.learning_rate,
            local_epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            proximal_mu=settings.proximal_mu,
            seed=settings.seed,
        )
    hidden, latent = settings.hidden[0], settings.hidden[-1]
    if settings.kind == "lstm_autoencoder":
        return LSTMAutoencoderDetector(
            settings.n_features,
            hidden=hidden,
            latent=latent,
            window=settings.window,
            learning_rate=settings.learning_rate,
            local_epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            proximal_mu=settings.proximal_mu,
            train_prefixes=settings.train_prefixes,
            seed=settings.seed,
        )
    return TransformerAutoencoderDetector(
        settings.n_features,
        d_model=hidden,
        n_heads=settings.n_heads,
        latent=latent,
        window=settings.window,
        learning_rate=settings.learning_rate,
        local_epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        proximal_mu=settings.proximal_mu,
        train_prefixes=settings.train_prefixes,
        seed=settings.seed,
    )


def initial_weights(settings: ModelSettings) -> Weights:
    """Return the seeded initial weights of the model, the global model's version 0."""
    return build_detector(settings).weights()
