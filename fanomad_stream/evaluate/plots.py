"""Matplotlib figures of an evaluation: timelines, ROC, PR, calibration and rounds.

Every function builds a ``Figure`` with the object API and no pyplot state, so figures are
freed when dropped and nothing depends on a global current figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from fanomad_stream.evaluate.series import UNLABELLED, RoundRecord

# Detector names as evaluation.json writes them, and the score array that contains each series.
SCORE_ARRAYS = {
    "system": "score",
    "local": "score_local",
    "hst": "score_hst",
    "l2": "score_l2",
    "random": "score_random",
}
COLOURS = {
    "system": "tab:blue",
    "local": "tab:orange",
    "hst": "tab:green",
    "l2": "tab:purple",
    "random": "tab:gray",
}


def timeline_figure(source: str, arrays: Mapping[str, np.ndarray]) -> Figure:
    """Plot one source's scores, its alert threshold, its alerts and the labelled anomalies."""
    index, score = arrays["index"], arrays["score"]
    label, alert = arrays["label"], arrays["alert"].astype(bool)
    figure = Figure(figsize=(11, 3.2), layout="constrained")
    ax = figure.subplots()
    ax.fill_between(
        index,
        0,
        1,
        where=label == 1,
        transform=ax.get_xaxis_transform(),
        color="tab:red",
        alpha=0.15,
        linewidth=0,
        label="labelled anomaly",
    )
    ax.plot(index, score, color="tab:blue", linewidth=0.6, label="score")
    ax.plot(
        index, arrays["threshold"], color="black", linewidth=0.8, linestyle="--", label="threshold"
    )
    ax.scatter(index[alert], score[alert], color="tab:red", s=8, zorder=3, label="alert")
    labelled = np.flatnonzero(label != UNLABELLED)
    if labelled.size:
        ax.axvline(index[labelled[0]], color="gray", linewidth=0.8, linestyle=":")
    # Reconstruction errors are heavy-tailed, so a log axis keeps the normal range readable.
    if score.size and np.all(score > 0):
        ax.set_yscale("log")
    ax.set_title(f"{source}: score, threshold and alerts (dotted line: first labelled row)")
    ax.set_xlabel("event index")
    ax.set_ylabel("anomaly score")
    ax.legend(loc="upper left", fontsize="small", ncols=4)
    return figure


def pooled_labelled(
    series: Mapping[str, Mapping[str, np.ndarray]], detector: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (labels, scores) of one detector over the labelled rows of every source."""
    name = SCORE_ARRAYS[detector]
    labels, scores = [], []
    for arrays in series.values():
        if name not in arrays:
            continue
        labelled = arrays["label"] != UNLABELLED
        labels.append(arrays["label"][labelled])
        scores.append(arrays[name][labelled])
    if not labels:
        return None
    y = np.concatenate(labels)
    if y.min(initial=0) == y.max(initial=0):
        return None  # one class only: neither curve is defined
    return y, np.concatenate(scores)


def roc_figure(series: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Plot the ROC curve of every detector, pooled over the sources' labelled rows."""
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    ax = figure.subplots()
    for detector in SCORE_ARRAYS:
        pooled = pooled_labelled(series, detector)
        if pooled is None:
            continue
        fpr, tpr, _ = roc_curve(*pooled)
        ax.plot(fpr, tpr, color=COLOURS[detector], label=detector)
    ax.plot([0, 1], [0, 1], color="lightgray", linestyle="--", linewidth=0.8)
    ax.set_title("ROC, all sources pooled")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    return figure


def pr_figure(series: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Plot the precision-recall curve of every detector, with the anomaly rate as chance."""
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    ax = figure.subplots()
    prevalence = None
    for detector in SCORE_ARRAYS:
        pooled = pooled_labelled(series, detector)
        if pooled is None:
            continue
        precision, recall, _ = precision_recall_curve(*pooled)
        ax.plot(recall, precision, color=COLOURS[detector], label=detector)
        prevalence = float(pooled[0].mean())
    if prevalence is not None:
        ax.axhline(prevalence, color="lightgray", linestyle="--", linewidth=0.8)
    ax.set_title("Precision-recall, all sources pooled")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper right")
    return figure


def calibration_figure(per_source: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Plot the system's observed anomaly rate per score-rank bin, one line per source.

    The points are the ``calibration`` lists of evaluation.json: (mean rank in [0, 1],
    anomaly rate, count). A detector that orders rows well shows rates rising with rank.
    """
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    ax = figure.subplots()
    for source, by_detector in sorted(per_source.items()):
        points = by_detector.get("system", {}).get("calibration") or []
        if not points:
            continue
        ranks, rates = zip(*[(p[0], p[1]) for p in points], strict=True)
        ax.plot(ranks, rates, marker="o", markersize=3, linewidth=1, label=source)
    ax.set_title("Calibration of the system score (by rank)")
    ax.set_xlabel("score rank within the source (0 = lowest)")
    ax.set_ylabel("observed anomaly rate")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize="small")
    return figure


def rounds_figure(rounds: Sequence[RoundRecord]) -> Figure:
    """Plot training loss, participating clients and epsilon spent per federated round."""
    figure = Figure(figsize=(11, 3.2), layout="constrained")
    loss_ax, clients_ax, epsilon_ax = figure.subplots(1, 3)
    numbers = [r.round for r in rounds]
    loss_ax.plot(numbers, [r.train_loss for r in rounds], marker="o", color="tab:blue")
    loss_ax.set_title("mean client training loss")
    clients_ax.bar(numbers, [len(r.clients) for r in rounds], color="tab:green")
    clients_ax.set_title("participating clients")
    epsilons = [(r.round, r.epsilon) for r in rounds if r.epsilon is not None]
    if epsilons:
        epsilon_ax.plot(*zip(*epsilons, strict=True), marker="o", color="tab:red")
        epsilon_ax.set_title("epsilon spent")
    else:
        epsilon_ax.text(0.5, 0.5, "no privacy accounting\nin this run", ha="center", va="center")
        epsilon_ax.set_title("epsilon spent")
        epsilon_ax.set_xticks([])
        epsilon_ax.set_yticks([])
    for ax in (loss_ax, clients_ax, epsilon_ax):
        ax.set_xlabel("round")
        if ax.get_xticks().size:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    clients_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not rounds:
        loss_ax.text(0.5, 0.5, "no closed rounds", ha="center", va="center")
    return figure
