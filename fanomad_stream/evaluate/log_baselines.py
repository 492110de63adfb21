"""Offline baselines computed in the evaluation from the replayed data itself.

``log_pca_scores`` is the count-vector PCA detector of Xu et al., "Detecting Large-Scale
System Problems by Mining Console Logs" (SOSP 2009): template counts per window, projected
on the principal subspace, scored by the squared residual. It runs offline over the whole
replay (fitted on every window, unsupervised), so it is an upper reference for a batch
method, not a streaming competitor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA

from fanomad_stream.featurize.logs import LogTemplateMiner
from fanomad_stream.replay.logs import LogRecord


def log_pca_scores(
    records: Sequence[LogRecord],
    *,
    window_s: float = 60.0,
    n_buckets: int = 64,
    variance: float = 0.95,
    window_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Return one score per record: the PCA residual of its window's count vector.

    A window is a (source, ``window_s`` time window) pair, or the group that ``window_ids``
    gives each record when it is set. Templates come from a fresh drain3 miner over the
    records in order. ``variance`` is the share of variance the principal subspace keeps;
    the residual outside it is the score.
    """
    if not 0.0 < variance < 1.0:
        msg = f"variance must be in (0, 1), got {variance!r}"
        raise ValueError(msg)
    if not records:
        return np.zeros(0)
    miner = LogTemplateMiner(None, n_buckets=n_buckets)
    buckets = np.array([miner.mine(record).bucket for record in records], dtype=np.int64)
    if window_ids is None:
        keys = [(record.source, int(record.ts // window_s)) for record in records]
        window_of: dict[tuple[str, int], int] = {}
        window_ids = np.array([window_of.setdefault(key, len(window_of)) for key in keys])
    elif np.shape(window_ids) != (len(records),):
        msg = f"window_ids must hold one id per record ({len(records)}), got {np.shape(window_ids)}"
        raise ValueError(msg)
    else:
        _, window_ids = np.unique(window_ids, return_inverse=True)
    counts = np.zeros((int(window_ids.max()) + 1, n_buckets), dtype=np.float64)
    np.add.at(counts, (window_ids, buckets), 1.0)

    features = np.log1p(counts)
    features -= features.mean(axis=0)
    if features.shape[0] < 2:
        return np.zeros(len(records))
    pca = PCA(n_components=variance, svd_solver="full").fit(features)
    residual = features - pca.inverse_transform(pca.transform(features))
    window_scores = (residual**2).sum(axis=1)
    scores: np.ndarray = window_scores[window_ids]
    return scores
