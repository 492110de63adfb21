"""The three modalities and the per-modality view of the configuration.

Each modality is its own federation: its edge clients train one model kind on one feature
layout, and its aggregator publishes the global model under its own name. ``modality_config``
returns the config an edge client or aggregator of one modality runs with: ``model`` is the
modality's model with ``n_features`` set to the featurizer's width, and the model name gets
the modality as suffix.
"""

from __future__ import annotations

from typing import Literal, get_args

from fanomad_stream.config import AppConfig, ModelSettings
from fanomad_stream.errors import ConfigError
from fanomad_stream.featurize.logs import feature_names
from fanomad_stream.featurize.traces import TRACE_SCALARS

Modality = Literal["metrics", "logs", "traces"]
MODALITIES: tuple[str, ...] = get_args(Modality)


def is_sequence(model: ModelSettings) -> bool:
    return model.kind != "mlp_autoencoder"


def feature_width(config: AppConfig, modality: Modality) -> int:
    """Return the number of features per row that the modality's model receives."""
    if modality == "metrics":
        return config.model.n_features
    if modality == "logs":
        logs = config.logs
        if is_sequence(logs.model):
            return logs.n_buckets + 2
        return len(feature_names(logs.n_buckets))
    traces = config.traces
    if is_sequence(traces.model):
        return 4 + traces.n_service_buckets
    return len(TRACE_SCALARS) + traces.n_edge_buckets


def modality_config(config: AppConfig, modality: Modality) -> AppConfig:
    """Return ``config`` as one modality's edge clients and aggregator see it."""
    if modality not in MODALITIES:
        msg = f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}"
        raise ValueError(msg)
    if modality == "metrics":
        return config
    section = config.logs if modality == "logs" else config.traces
    model = section.model.model_copy(update={"n_features": feature_width(config, modality)})
    aggregator = config.aggregator.model_copy(
        update={"model_name": f"{config.aggregator.model_name}-{modality}"}
    )
    # Context scoring (levels plus differences) belongs to the metrics pipeline only, so the
    # other modalities' models take their featurizer's width as it is.
    edge = config.edge.model_copy(update={"scoring": "baseline"})
    return config.model_copy(update={"model": model, "aggregator": aggregator, "edge": edge})


def require_mlp_for_metrics(config: AppConfig) -> None:
    """Raise ConfigError unless the metrics model is the MLP autoencoder.

    NOTE: ``EdgePipeline`` scores metric rows with the MLP only; the sequence kinds run on
    the logs and traces modalities.
    """
    if config.model.kind != "mlp_autoencoder":
        msg = (
            f"model.kind {config.model.kind!r} is not supported for metrics yet; use "
            "mlp_autoencoder there, and set sequence models under logs.model or traces.model"
        )
        raise ConfigError(msg)
