"""Baseline scorers of the SMD harness: models that a useful detector has to beat.

Every scorer takes the unlabelled series of all machines and a seed, fits on each machine's
train half (or, for the pooled autoencoder, on all train halves), and returns a ``ScoreSet``
per machine. The operating threshold of a baseline is the 99th percentile of its train
scores. No scorer receives labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from river import anomaly
from sklearn.decomposition import PCA

from fanomad_stream.detect.autoencoder import AutoencoderDetector
from fanomad_stream.detect.scaling import StreamingScaler
from fanomad_stream.evaluate.smd import MachineSeries

# The baseline rows standardize with the plain train mean and standard deviation. The
# StreamingScaler needs a floor > 0, and at 1e-6 a column that is constant in the train half
# turns a small test-time change into a z-score in the thousands, as a plain standardization does.
BASELINE_SCALE_FLOOR = 1e-6
BASELINE_QUANTILE = 0.99
AE_HIDDEN = [16, 8]


@dataclass(frozen=True)
class ScoreSet:
    """Scores of one machine: train scores, test scores and the per-row test threshold.

    ``test_thresholds[i]`` is the threshold that decides row ``i``; it must come from train
    scores or from test scores before row ``i``.
    """

    train_scores: np.ndarray
    test_scores: np.ndarray
    test_thresholds: np.ndarray


Scorer = Callable[[Mapping[str, MachineSeries], int], dict[str, ScoreSet]]


def train_quantile_scores(train_scores: np.ndarray, test_scores: np.ndarray) -> ScoreSet:
    """Wrap scores with a constant threshold at the 99th percentile of the train scores."""
    threshold = float(np.quantile(train_scores, BASELINE_QUANTILE))
    return ScoreSet(train_scores, test_scores, np.full(test_scores.shape[0], threshold))


def fit_scaler(train: np.ndarray, scale_floor: float = BASELINE_SCALE_FLOOR) -> StreamingScaler:
    """Return a StreamingScaler that has learned the train half."""
    scaler = StreamingScaler(train.shape[1], scale_floor=scale_floor)
    scaler.learn(train)
    return scaler


def score_random(series: Mapping[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
    """Score every row with an independent uniform draw."""
    result = {}
    for index, (machine, s) in enumerate(sorted(series.items())):
        rng = np.random.default_rng([seed, index])
        result[machine] = train_quantile_scores(rng.random(len(s.train)), rng.random(len(s.test)))
    return result


def score_l2(series: Mapping[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
    """Score a row by the L2 norm of its standardized values."""
    del seed  # deterministic
    result = {}
    for machine, s in series.items():
        scaler = fit_scaler(s.train)
        train, test = (np.linalg.norm(scaler.transform(x), axis=1) for x in (s.train, s.test))
        result[machine] = train_quantile_scores(train.astype(np.float64), test.astype(np.float64))
    return result


def score_pca(series: Mapping[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
    """Score a row by its mean squared residual after PCA keeping 95 % of the train variance."""
    result = {}
    for machine, s in series.items():
        scaler = fit_scaler(s.train)
        z_train, z_test = scaler.transform(s.train), scaler.transform(s.test)
        pca = PCA(n_components=0.95, random_state=seed).fit(z_train)

        def residual(z: np.ndarray, pca: PCA = pca) -> np.ndarray:
            error = (z - pca.inverse_transform(pca.transform(z))) ** 2
            return np.asarray(error.mean(axis=1), dtype=np.float64)

        result[machine] = train_quantile_scores(residual(z_train), residual(z_test))
    return result


def score_hst(series: Mapping[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
    """Stream River's HalfSpaceTrees with its default parameters over train, then test.

    SMD values are already min-max scaled to [0, 1], the range HalfSpaceTrees expects, so the
    rows go in unchanged (clipped to [0, 1]). Each row is scored before it is learned.
    """
    result = {}
    for machine, s in series.items():
        model = anomaly.HalfSpaceTrees(seed=seed)

        def stream(x: np.ndarray, model: anomaly.HalfSpaceTrees = model) -> np.ndarray:
            scores = np.empty(x.shape[0], dtype=np.float64)
            for i, row in enumerate(np.clip(x, 0.0, 1.0).tolist()):
                features = dict(enumerate(row))
                scores[i] = model.score_one(features)  # type: ignore[no-untyped-call]
                model.learn_one(features)  # type: ignore[no-untyped-call]
            return scores

        train = stream(s.train)
        result[machine] = train_quantile_scores(train, stream(s.test))
    return result


def _ae_scores(
    detector: AutoencoderDetector, scaler: StreamingScaler, s: MachineSeries
) -> ScoreSet:
    train = detector.score_batch(scaler.transform(s.train))
    return train_quantile_scores(train, detector.score_batch(scaler.transform(s.test)))


def make_ae_scorer(mode: str, epochs: int = 10) -> Scorer:
    """Return the 38-16-8-16-38 autoencoder scorer: ``local``, ``untrained`` or ``pooled``.

    ``local`` trains one model per machine on its train half; ``pooled`` trains one model on
    the train halves of all machines, each standardized with its own statistics.
    """
    if mode not in {"local", "untrained", "pooled"}:
        msg = f"autoencoder mode must be local, untrained or pooled, got {mode!r}"
        raise ValueError(msg)

    def score(series: Mapping[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
        scalers = {machine: fit_scaler(s.train) for machine, s in series.items()}
        n_features = next(iter(series.values())).train.shape[1]
        pooled = AutoencoderDetector(n_features, hidden=AE_HIDDEN, local_epochs=epochs, seed=seed)
        if mode == "pooled":
            pooled.train(np.concatenate([scalers[m].transform(s.train) for m, s in series.items()]))
        result = {}
        for machine, s in series.items():
            detector = pooled
            if mode == "local":
                detector = AutoencoderDetector(
                    n_features, hidden=AE_HIDDEN, local_epochs=epochs, seed=seed
                )
                detector.train(scalers[machine].transform(s.train))
            result[machine] = _ae_scores(detector, scalers[machine], s)
        return result

    return score


BASELINES: dict[str, Scorer] = {
    "random": score_random,
    "L2 norm of the standardized row": score_l2,
    "PCA reconstruction (95 % variance)": score_pca,
    "River HalfSpaceTrees, defaults, streaming": score_hst,
    "MLP autoencoder 38-16-8-16-38, local": make_ae_scorer("local"),
    "the same, untrained": make_ae_scorer("untrained"),
    "the same, trained on all machines pooled": make_ae_scorer("pooled"),
}
