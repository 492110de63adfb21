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
from fanomad_stream.detect.pipeline import column_weights
from fanomad_stream.detect.spot import SpotThreshold
from fanomad_stream.detect.threshold import QuantileThreshold
from fanomad_stream.evaluate.baselines import Scorer, ScoreSet
from fanomad_stream.evaluate.smd import MachineSeries
from fanomad_stream.federate.aggregate import apply_delta, fedavg
from fanomad_stream.federate.strategies import FedAvg
from fanomad_stream.privacy.accountant import compute_epsilon
from fanomad_stream.privacy.dp import SecureGaussian
from fanomad_stream.privacy.strategy import ClientLevelDP

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
    normalize_errors: bool = False
    level_weight: float = 0.0
    ema_alpha: float = 0.1
    threshold: str = "spot"  # "spot" or "quantile"
    spot_risk: float = 1e-3
    spot_depth: int = 0
    spot_warmup: int = 2000
    spot_median_cap: float | None = 13.0
    batch_rows: int = 100
    learn_during_test: bool = False
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5

    def dp_epsilon(self) -> float:
        """Return the client-level ε of the FedAvg rounds (∞ without noise), every client each round."""
        return compute_epsilon(
            noise_multiplier=self.dp_noise_multiplier,
            sampling_rate=1.0,
            steps=self.rounds,
            delta=self.dp_delta,
        )


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
    if config.federated and config.dp_noise_multiplier > 0:
        _train_private(config, clients, seed)
    elif config.federated:
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


def _train_private(config: SystemConfig, clients: Mapping[str, _Client], seed: int) -> None:
    """Run DP-FedAvg: every client clips its delta, the server noises the sum.

    ``ClientLevelDP`` divides the noised sum by the number of clients, so every client has
    weight 1 whatever its row count. The noise generator is keyed from the seed, which makes
    the row reproducible; the privacy claim is the accountant's ε for the same noise.
    """
    strategy = ClientLevelDP(
        FedAvg(),
        clipping_norm=config.dp_clipping_norm,
        noise_multiplier=config.dp_noise_multiplier,
        denominator=len(clients),
        min_cohort=len(clients),
        noise=SecureGaussian(test_seed=seed),
    )
    global_weights = next(iter(clients.values())).detector.weights()  # type: ignore[union-attr]
    for _ in range(config.rounds):
        strategy.begin_round(global_weights)
        for client in clients.values():
            assert client.detector is not None
            client.detector.load_weights(global_weights)
            strategy.fold(client.detector.train(client.train_x), float(len(client.train_x)))
        global_weights = strategy.finish_round()
    for client in clients.values():
        assert client.detector is not None
        client.detector.load_weights(global_weights)


def _column_weights(config: SystemConfig, n_inputs: int) -> np.ndarray:
    if not config.differences:
        return np.full(n_inputs, 1.0 / n_inputs)
    return column_weights(n_inputs // 2, config.level_weight)


def _raw_scores(config: SystemConfig, client: _Client, x: np.ndarray) -> np.ndarray:
    if config.model == "l2":
        return np.asarray((x.astype(np.float64) ** 2) @ _column_weights(config, x.shape[1]))
    assert client.detector is not None
    errors = _feature_errors(client.detector, x)
    if config.normalize_errors:
        assert client.error_scale is not None
        errors = errors / client.error_scale
    return np.asarray(errors @ _column_weights(config, x.shape[1]))


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
            risk=config.spot_risk,
            warmup_events=config.spot_warmup,
            depth=config.spot_depth,
            median_cap=config.spot_median_cap,
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
# The configuration shipped before the difference-only score: every feature's error normalized
# by its mean train error, SPOT risk 3e-3 and no cap.
PREVIOUS = replace(
    SHIPPED, normalize_errors=True, level_weight=1.0, spot_risk=3e-3, spot_median_cap=None
)
# Client-level DP-FedAvg: 5 rounds with every client, noise multiplier 1.5, which the PLD
# accountant puts at ε = 7.0 for δ = 1e-5. Clipping norm 0.3 scored best of 0.03, 0.1, 0.3
# and 1 on seed 0. A client's first-round delta has a norm of about 6.
PRIVATE = replace(SHIPPED, dp_noise_multiplier=1.5, dp_clipping_norm=0.3)

SYSTEM_ROWS: dict[str, Scorer] = {
    "system: context AE, FedAvg, EMA, SPOT": make_system_scorer(SHIPPED),
    "system: same, local only": make_system_scorer(replace(SHIPPED, federated=False)),
    "system: FedAvg + 2 local fine-tuning epochs": make_system_scorer(
        replace(SHIPPED, fine_tune_epochs=2)
    ),
    "system: DP-FedAvg, client-level ε = 7.0": make_system_scorer(PRIVATE),
    "system: DP-FedAvg + 2 local fine-tuning epochs": make_system_scorer(
        replace(PRIVATE, fine_tune_epochs=2)
    ),
    "system: previous shipped configuration": make_system_scorer(PREVIOUS),
}

# The ablations change one setting of ABLATION_BASE each: scalers that keep learning during
# the test half, plain reconstruction error of all features, SPOT risk 1e-3 and no cap.
ABLATION_BASE = replace(PREVIOUS, learn_during_test=True, normalize_errors=False, spot_risk=1e-3)
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
    "shipped, SPOT risk 1e-3": replace(PREVIOUS, spot_risk=1e-3),
    "shipped, threshold rolling 99th percentile": replace(PREVIOUS, threshold="quantile"),
}
# Each row changes one setting of the shipped configuration.
ABLATIONS.update(
    {
        "shipped: level errors weighted 1 (all features)": replace(SHIPPED, level_weight=1.0),
        "shipped: level errors weighted 0.25": replace(SHIPPED, level_weight=0.25),
        "shipped: per-feature error normalization": replace(SHIPPED, normalize_errors=True),
        "shipped: EMA alpha 0.05": replace(SHIPPED, ema_alpha=0.05),
        "shipped: EMA alpha 0.2": replace(SHIPPED, ema_alpha=0.2),
        "shipped: no threshold cap": replace(SHIPPED, spot_median_cap=None),
        "shipped: threshold cap 8": replace(SHIPPED, spot_median_cap=8.0),
        "shipped: threshold cap 20": replace(SHIPPED, spot_median_cap=20.0),
        "shipped: SPOT risk 3e-3": replace(SHIPPED, spot_risk=3e-3),
        "shipped: no autoencoder (mean square of differences)": replace(SHIPPED, model="l2"),
        "shipped: untrained autoencoder": replace(SHIPPED, rounds=0),
        "DP-FedAvg, clipping norm 0.03": replace(PRIVATE, dp_clipping_norm=0.03),
        "DP-FedAvg, clipping norm 0.1": replace(PRIVATE, dp_clipping_norm=0.1),
        "DP-FedAvg, clipping norm 1": replace(PRIVATE, dp_clipping_norm=1.0),
        "DP-FedAvg, clipping norm 0.1, then 2 fine-tuning epochs": replace(
            PRIVATE, dp_clipping_norm=0.1, fine_tune_epochs=2
        ),
        "DP-FedAvg, clipping norm 1, then 2 fine-tuning epochs": replace(
            PRIVATE, dp_clipping_norm=1.0, fine_tune_epochs=2
        ),
    }
)

SYSTEM_ROWS.update({name: make_system_scorer(config) for name, config in ABLATIONS.items()})
