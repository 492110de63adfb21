"""Evaluation of a multimodal run: one row per modality and one for the combined alerts.

Scores are joined with labels on (producer id of the labels, key, index), so the labels of
metrics and logs stay apart although both are keyed by service. Per modality the table gives
the event-level metrics (a metric row, a log line or a trace) and two baselines on the same
events: random scores, HalfSpaceTrees scores where the edge client sent them, and for logs
the offline count-vector PCA of ``log_baselines.log_pca_scores``. It also
gives the window-level metrics over the labelled Nezha windows and the share of fault cases
whose alerts named the injected service most often. The combined row takes the alerts of
every modality together: a window alerts when any modality alerted in it, and its score is
the highest per-modality rank of the window's maximum score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from fanomad_stream.evaluate.metrics import evaluate_scores
from fanomad_stream.evaluate.traces import (
    evaluate_windows,
    service_hits,
    top_k_accuracy,
    window_rows,
)
from fanomad_stream.replay.traces import FaultCase, WindowLabel
from fanomad_stream.transport.reader import Keyed


@dataclass(frozen=True)
class ModalitySeries:
    """The joined scores of one modality, in score order."""

    ts: np.ndarray
    indices: np.ndarray  # the ``index`` of each score: line, row or first-span number
    scores: np.ndarray
    alerts: np.ndarray
    labels: np.ndarray  # -1 where a score has no label
    services: list[str]
    hst: np.ndarray | None = None  # HalfSpaceTrees baseline scores, where the client sent them


@dataclass(frozen=True)
class ModalityRow:
    """One row of the evaluation table; NaN where a metric is undefined (one class only)."""

    modality: str
    events: int
    labelled: int
    positives: int
    alerts: int
    auroc: float
    pr_auc: float
    f1_operating: float
    random_pr_auc: float
    hst_pr_auc: float
    offline_pr_auc: float
    windows: int
    window_auroc: float
    window_f1_operating: float
    cases: int
    service_top1: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def join_series(
    scores: Sequence[Keyed], labels: Sequence[Keyed], label_source: str, modality: str
) -> ModalitySeries:
    """Collect the scores of ``modality`` and their labels from the producer ``label_source``.

    A repeated (key, index) keeps its first score. The service of a score is its ``service``
    field when present, else its key.
    """
    by_key = {
        (item.key, int(item.envelope.body["index"])): int(item.envelope.body["label"])
        for item in labels
        if item.envelope.src == label_source
    }
    # Delivery is at-least-once, so a batch replayed after a consumer restart or rebalance
    # scores its events again; the first score of each (key, index) counts.
    seen: set[tuple[str, int]] = set()
    chosen = []
    for item in scores:
        identity = (item.key, int(item.envelope.body["index"]))
        if item.envelope.body.get("modality") != modality or identity in seen:
            continue
        seen.add(identity)
        chosen.append(item)
    return ModalitySeries(
        ts=np.array([item.envelope.ts for item in chosen], dtype=np.float64),
        indices=np.array([int(item.envelope.body["index"]) for item in chosen], dtype=np.int64),
        scores=np.array([item.envelope.body["score"] for item in chosen], dtype=np.float64),
        alerts=np.array([bool(item.envelope.body["alert"]) for item in chosen], dtype=bool),
        labels=np.array(
            [by_key.get((item.key, int(item.envelope.body["index"])), -1) for item in chosen],
            dtype=np.int8,
        ),
        services=[str(item.envelope.body.get("service") or item.key) for item in chosen],
        hst=_hst_scores(chosen),
    )


def _hst_scores(chosen: Sequence[Keyed]) -> np.ndarray | None:
    details = [item.envelope.body.get("detail") or {} for item in chosen]
    if not details or any("hst" not in detail for detail in details):
        return None
    return np.array([float(detail["hst"]) for detail in details], dtype=np.float64)


def evaluate_series(
    name: str,
    series: ModalitySeries,
    windows: Sequence[WindowLabel],
    cases: Sequence[FaultCase],
    seed: int = 0,
    offline_baseline: np.ndarray | None = None,
) -> ModalityRow:
    """Return the table row of one modality's series.

    ``offline_baseline`` holds scores indexed by the stream index (for logs, the count-vector
    PCA of ``log_baselines.log_pca_scores``); its PR-AUC goes to ``offline_pr_auc``.
    """
    known = series.labels >= 0
    labels, scores, alerts = series.labels[known], series.scores[known], series.alerts[known]
    events = evaluate_scores(labels, scores, alerts) if known.any() else None
    rng = np.random.default_rng(seed)
    random_scores = np.asarray(rng.random(size=labels.shape[0]))
    random = evaluate_scores(labels, random_scores) if known.any() else None
    offline = (
        evaluate_scores(labels, offline_baseline[series.indices[known]])
        if offline_baseline is not None and known.any()
        else None
    )
    hst = (
        evaluate_scores(labels, series.hst[known])
        if series.hst is not None and known.any()
        else None
    )
    per_window = evaluate_windows(window_rows(series.ts, series.scores, series.alerts, windows))
    hits = service_hits(
        series.ts[series.alerts],
        [s for s, a in zip(series.services, series.alerts, strict=True) if a],
        cases,
    )
    return ModalityRow(
        modality=name,
        events=int(series.scores.shape[0]),
        labelled=int(known.sum()),
        positives=int(labels.sum()),
        alerts=int(series.alerts.sum()),
        auroc=events.auroc if events else float("nan"),
        pr_auc=events.pr_auc if events else float("nan"),
        f1_operating=events.f1_operating if events else float("nan"),
        random_pr_auc=random.pr_auc if random else float("nan"),
        hst_pr_auc=hst.pr_auc if hst else float("nan"),
        offline_pr_auc=offline.pr_auc if offline else float("nan"),
        windows=per_window.n,
        window_auroc=per_window.auroc,
        window_f1_operating=per_window.f1_operating,
        cases=len(hits),
        service_top1=top_k_accuracy(hits, 1),
    )


def combined_row(
    series: Mapping[str, ModalitySeries],
    windows: Sequence[WindowLabel],
    cases: Sequence[FaultCase],
) -> ModalityRow:
    """Return the row of every modality's alerts taken together, per window and per case."""
    per_modality = {
        name: window_rows(s.ts, s.scores, s.alerts, windows) for name, s in series.items()
    }
    ranks = []
    for rows in per_modality.values():
        maxima = np.array([row.max_score for row in rows])
        rank = np.full(maxima.shape, 0.0)
        present = np.isfinite(maxima)
        if present.any():
            rank[present] = rankdata(maxima[present]) / present.sum()
        ranks.append(rank)
    combined_rank = np.max(ranks, axis=0)
    any_alert = np.zeros(len(windows), dtype=bool)
    for rows in per_modality.values():
        any_alert |= np.array([row.alerts > 0 for row in rows])
    kept = np.array([w.label in (0, 1) for w in windows]) & (combined_rank > 0)
    labels = np.array([w.label for w in windows])[kept]
    window_metrics = evaluate_scores(labels, combined_rank[kept], any_alert[kept], ks=(1,))

    alert_ts = np.concatenate([s.ts[s.alerts] for s in series.values()])
    alert_services = [
        service
        for s in series.values()
        for service, alert in zip(s.services, s.alerts, strict=True)
        if alert
    ]
    hits = service_hits(alert_ts, alert_services, cases)
    return ModalityRow(
        modality="combined",
        events=sum(int(s.scores.shape[0]) for s in series.values()),
        labelled=sum(int((s.labels >= 0).sum()) for s in series.values()),
        positives=sum(int((s.labels == 1).sum()) for s in series.values()),
        alerts=int(alert_ts.shape[0]),
        auroc=float("nan"),
        pr_auc=float("nan"),
        f1_operating=float("nan"),
        random_pr_auc=float("nan"),
        hst_pr_auc=float("nan"),
        offline_pr_auc=float("nan"),
        windows=window_metrics.n,
        window_auroc=window_metrics.auroc,
        window_f1_operating=window_metrics.f1_operating,
        cases=len(hits),
        service_top1=top_k_accuracy(hits, 1),
    )


COLUMNS = (
    ("modality", "modality"),
    ("events", "events"),
    ("positives", "positives"),
    ("alerts", "alerts"),
    ("auroc", "AUROC"),
    ("pr_auc", "PR-AUC"),
    ("random_pr_auc", "PR-AUC random"),
    ("hst_pr_auc", "PR-AUC HST"),
    ("offline_pr_auc", "PR-AUC offline PCA"),
    ("f1_operating", "F1 (online)"),
    ("windows", "windows"),
    ("window_auroc", "window AUROC"),
    ("window_f1_operating", "window F1 (any alert)"),
    ("service_top1", "injected service top-1"),
)


def render_table(rows: Sequence[ModalityRow]) -> str:
    """Render the rows as a Markdown table, with three decimals for rates."""
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        values = row.as_dict()
        cells = [
            f"{values[name]:.3f}" if isinstance(values[name], float) else str(values[name])
            for name, _ in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
