"""The system's own rows of the SMD harness: context autoencoder, FedAvg, online thresholds.

Each machine is one edge client. Its train half is the stream before the evaluation starts:
the feature scalers learn it, and the autoencoder trains on it in rounds (local, or FedAvg
over all clients with ``fanomad_stream.federate.aggregate.fedavg``). The test half is then
streamed in batches in the edge client's order: features from the scaler state before the
batch, score, smooth, threshold from past scores only, then learn the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from fanomad_stream.detect.autoencoder import AutoencoderDetector
from fanomad_stream.detect.context import ContextFeatures, EmaSmoother
from fanomad_stream.detect.spot import SpotThreshold
from fanomad_stream.detect.threshold import QuantileThreshold
from fanomad_stream.evaluate.baselines import Scorer, ScoreSet
from fanomad_stream.evaluate.smd import MachineSeries
from fanomad_stream.federate.aggregate import apply_delta, fedavg

ERROR_SCALE_FLOOR = 1e-3


@dataclass(frozen=True)
class SystemConfig:
    """Every knob of the system's pipeline; the defaults are the configuration shipped."""

    scale_floor: float = 0.01
    clip: float = 20.0
    differences: bool = True
    model: str = "ae"  # "ae" or "l2" (mean square of the features, no model)
    hidden: tuple[int, ...] = (16, 8)
    rounds: int = 5
    local_epochs: int = 2
    fine_tune_epochs: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 64
    federated: bool = True
    normalize_errors: bool = True
    ema_alpha: float = 0.1
    threshold: str = "spot"  # "spot" or "quantile"
    spot_risk: float = 3e-3
    spot_depth: int = 0
    spot_warmup: int = 2000
    batch_rows: int = 100
    learn_during_test: bool = False


def _features(config: SystemConfig, n_features: int) -> ContextFeatures:
    return ContextFeatures(n_features, scale_floor=config.scale_floor, clip=config.clip)


def _select(config: SystemConfig, features: np.ndarray) -> np.ndarray:
    return features if config.differences else features[:, : features.shape[1] // 2]


@dataclass
class _Client:
    features: ContextFeatures
    train_x: np.ndarray
    detector: AutoencoderDetector | None = None
    error_scale: np.ndarray | None = None


def _prepare_clients(
    config: SystemConfig, series: Mapping[str, MachineSeries]
) -> dict[str, _Client]:
    clients = {}
    for machine, s in series.items():
        features = _features(config, s.train.shape[1])
        train_x = _select(config, features.fit_transform(s.train))
        clients[machine] = _Client(features, train_x)
    return clients


def _new_detector(
    config: SystemConfig, n_inputs: int, seed: int, epochs: int
) -> AutoencoderDetector:
    return AutoencoderDetector(
        n_inputs,
        hidden=list(config.hidden),
        learning_rate=config.learning_rate,
        local_epochs=epochs,
        batch_size=config.batch_size,
        seed=seed,
    )


def _train_models(config: SystemConfig, clients: Mapping[str, _Client], seed: int) -> None:
    n_inputs = next(iter(clients.values())).train_x.shape[1]
    for client in clients.values():
        client.detector = _new_detector(config, n_inputs, seed, config.local_epochs)
    if config.federated:
        global_weights = next(iter(clients.values())).detector.weights()  # type: ignore[union-attr]
        for _ in range(config.rounds):
            updates = []
            for client in clients.values():
                assert client.detector is not None
                client.detector.load_weights(global_weights)
                updates.append((client.detector.train(client.train_x), float(len(client.train_x))))
            global_weights = apply_delta(global_weights, fedavg(updates, global_weights))
        for client in clients.values():
            assert client.detector is not None
            client.detector.load_weights(global_weights)
    else:
        for client in clients.values():
            assert client.detector is not None
            for _ in range(config.rounds):
                client.detector.train(client.train_x)
    if config.fine_tune_epochs:
        for client in clients.values():
            assert client.detector is not None
            client.detector.local_epochs = config.fine_tune_epochs
            client.detector.train(client.train_x)


def _raw_scores(config: SystemConfig, client: _Client, x: np.ndarray) -> np.ndarray:
    if config.model == "l2":
        return np.asarray((x.astype(np.float64) ** 2).mean(axis=1))
    assert client.detector is not None
    if not config.normalize_errors:
        return client.detector.score_batch(x)
    assert client.error_scale is not None
    return np.asarray((_feature_errors(client.detector, x) / client.error_scale).mean(axis=1))


@torch.no_grad()
def _feature_errors(detector: AutoencoderDetector, x: np.ndarray) -> np.ndarray:
    batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    detector.model.eval()
    return (detector.model(batch) - batch).pow(2).numpy().astype(np.float64)  # type: ignore[no-any-return]


def _fit_error_scales(config: SystemConfig, clients: Mapping[str, _Client]) -> None:
    """Set each feature's error scale to its mean squared train error, floored."""
    for client in clients.values():
        assert client.detector is not None
        errors = _feature_errors(client.detector, client.train_x)
        client.error_scale = np.maximum(errors.mean(axis=0), ERROR_SCALE_FLOOR)


def _threshold(config: SystemConfig) -> SpotThreshold | QuantileThreshold:
    if config.threshold == "spot":
        return SpotThreshold(
            risk=config.spot_risk, warmup_events=config.spot_warmup, depth=config.spot_depth
        )
    return QuantileThreshold(quantile=0.99, warmup_events=200, history=20000)


def _stream_test(config: SystemConfig, client: _Client, test: np.ndarray) -> ScoreSet:
    smoother = EmaSmoother(config.ema_alpha)
    threshold = _threshold(config)
    train_scores = smoother.smooth(_raw_scores(config, client, client.train_x))
    threshold.learn(train_scores)
    scores, thresholds = [], []
    for begin in range(0, len(test), config.batch_rows):
        batch = test[begin : begin + config.batch_rows]
        features = client.features.transform_and_learn(
            batch, learn_statistics=config.learn_during_test
        )
        x = _select(config, features)
        smoothed = smoother.smooth(_raw_scores(config, client, x))
        thresholds.append(threshold.thresholds_for(smoothed))
        scores.append(smoothed)
    return ScoreSet(train_scores, np.concatenate(scores), np.concatenate(thresholds))


def make_system_scorer(config: SystemConfig) -> Scorer:
    """Return a harness scorer that runs the pipeline of ``config`` on every machine."""

    def score(series: Mapping[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
        clients = _prepare_clients(config, series)
        if config.model == "ae":
            _train_models(config, clients, seed)
            if config.normalize_errors:
                _fit_error_scales(config, clients)
        return {
            machine: _stream_test(config, clients[machine], s.test) for machine, s in series.items()
        }

    return score


SHIPPED = SystemConfig()

SYSTEM_ROWS: dict[str, Scorer] = {
    "system: context AE, FedAvg, EMA, SPOT": make_system_scorer(SHIPPED),
    "system: same, local only": make_system_scorer(replace(SHIPPED, federated=False)),
    "system: FedAvg + 2 local fine-tuning epochs": make_system_scorer(
        replace(SHIPPED, fine_tune_epochs=2)
    ),
}

# The ablations change one setting of ABLATION_BASE each: scalers that keep learning during
# the test half, plain reconstruction error and SPOT risk 1e-3.
ABLATION_BASE = replace(SHIPPED, learn_during_test=True, normalize_errors=False, spot_risk=1e-3)
ABLATIONS: dict[str, SystemConfig] = {
    "ablation base": ABLATION_BASE,
    "ablation: no EMA smoothing": replace(ABLATION_BASE, ema_alpha=1.0),
    "ablation: no first differences": replace(ABLATION_BASE, differences=False),
    "ablation: no clipping": replace(ABLATION_BASE, clip=1e9),
    "ablation: scale floor 1e-6 instead of 0.01": replace(ABLATION_BASE, scale_floor=1e-6),
    "ablation: per-feature error normalization": replace(ABLATION_BASE, normalize_errors=True),
    "ablation: no autoencoder (mean square of features)": replace(ABLATION_BASE, model="l2"),
    "ablation: untrained autoencoder": replace(ABLATION_BASE, rounds=0),
    "ablation: scalers frozen after the train half": replace(
        ABLATION_BASE, learn_during_test=False
    ),
    "ablation: threshold rolling 99th percentile": replace(ABLATION_BASE, threshold="quantile"),
    "ablation: SPOT risk 1e-2": replace(ABLATION_BASE, spot_risk=1e-2),
    "ablation: SPOT risk 1e-4": replace(ABLATION_BASE, spot_risk=1e-4),
    "ablation: DSPOT depth 200": replace(ABLATION_BASE, spot_depth=200),
    "shipped, SPOT risk 1e-3": replace(SHIPPED, spot_risk=1e-3),
    "shipped, threshold rolling 99th percentile": replace(SHIPPED, threshold="quantile"),
}

SYSTEM_ROWS.update({name: make_system_scorer(config) for name, config in ABLATIONS.items()})
