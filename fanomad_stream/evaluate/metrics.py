"""Point-wise detection metrics, with point-adjusted F1 kept apart and labelled as such."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


@dataclass
class DetectionMetrics:
    """Metrics of one score series against binary labels.

    ``f1_operating`` uses the alert decisions the system made online (score > threshold);
    ``best_f1`` picks the threshold on the labels and is an upper bound, not deployable.
    ``pa_f1`` is point-adjusted F1 at the operating decisions: a whole true segment counts as
    detected when any point of it alerts. It inflates results and is reported only beside the
    point-wise figures.
    """

    n: int
    positives: int
    auroc: float
    pr_auc: float
    best_f1: float
    f1_operating: float
    precision_operating: float
    recall_operating: float
    precision_at_k: dict[int, float] = field(default_factory=dict)
    confusion: dict[str, int] = field(default_factory=dict)
    calibration: list[tuple[float, float, int]] = field(default_factory=list)
    pa_f1: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the highest F1 over all thresholds (picked on the labels)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(np.max(f1))


def f1_from_decisions(labels: np.ndarray, decisions: np.ndarray) -> tuple[float, float, float]:
    """Return (precision, recall, F1) of boolean decisions."""
    tp = int(np.sum(decisions & (labels == 1)))
    fp = int(np.sum(decisions & (labels == 0)))
    fn = int(np.sum(~decisions & (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def point_adjust(labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """Mark every point of a true segment as detected when any of its points is."""
    adjusted = decisions.copy()
    edges = np.diff(np.concatenate([[0], labels.astype(np.int8), [0]]))
    for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        if adjusted[start:end].any():
            adjusted[start:end] = True
    return adjusted


def precision_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of true anomalies among the k highest scores (ties broken by position)."""
    k = min(k, labels.shape[0])
    if k == 0:
        return float("nan")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(labels[top].mean())


def calibration_curve(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> list[tuple[float, float, int]]:
    """Observed anomaly rate per score-quantile bin: (mean score rank, rate, count).

    Scores are not probabilities, so each score is first mapped to its rank in [0, 1]; a well
    ordered detector shows a rate that rises with the rank.
    """
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") / max(len(scores) - 1, 1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(ranks, edges[1:-1]), 0, bins - 1)
    curve = []
    for b in range(bins):
        members = which == b
        if members.any():
            curve.append(
                (float(ranks[members].mean()), float(labels[members].mean()), int(members.sum()))
            )
    return curve


def evaluate_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray | None = None,
    ks: tuple[int, ...] = (100,),
) -> DetectionMetrics:
    """Compute every metric of one series; ``decisions`` defaults to no alerts at all."""
    labels = np.asarray(labels).astype(np.int8)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        msg = f"labels {labels.shape} and scores {scores.shape} must have the same shape"
        raise ValueError(msg)
    decisions = (
        np.zeros(labels.shape, dtype=bool)
        if decisions is None
        else np.asarray(decisions, dtype=bool)
    )
    # No labels or one class only: the ranking metrics are undefined.
    one_class = labels.size == 0 or labels.min() == labels.max()
    precision, recall, f1 = f1_from_decisions(labels, decisions)
    _, _, pa_f1 = f1_from_decisions(labels, point_adjust(labels, decisions))
    tp = int(np.sum(decisions & (labels == 1)))
    fp = int(np.sum(decisions & (labels == 0)))
    fn = int(np.sum(~decisions & (labels == 1)))
    return DetectionMetrics(
        n=int(labels.shape[0]),
        positives=int(labels.sum()),
        auroc=float("nan") if one_class else float(roc_auc_score(labels, scores)),
        pr_auc=float("nan") if one_class else float(average_precision_score(labels, scores)),
        best_f1=float("nan") if one_class else best_f1(labels, scores),
        f1_operating=f1,
        precision_operating=precision,
        recall_operating=recall,
        precision_at_k={k: precision_at_k(labels, scores, k) for k in ks},
        confusion={"tp": tp, "fp": fp, "fn": fn, "tn": int(labels.shape[0]) - tp - fp - fn},
        calibration=calibration_curve(labels, scores),
        pa_f1=pa_f1,
    )
