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

The event labels mark every event inside a fault case's time span, of every service, so
event-level figures cannot tell the injected service from the rest. Where an event's service
is a fact of the data (the metric row's pod, the log line's pod) the row also gives a
per-service view: events of the injected service inside its case are positive, events of
other services inside a case are left out, and all other events keep label 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from fanomad_stream.evaluate.metrics import evaluate_scores
from fanomad_stream.evaluate.traces import (
    WindowRow,
    evaluate_windows,
    service_hits,
    service_labels,
    top_k_accuracy,
    window_rows,
)
from fanomad_stream.replay.traces import FaultCase, WindowLabel
from fanomad_stream.transport.reader import Keyed

# Edge clients send a threshold that is still warming up (+inf) as the largest float.
WARMING_UP = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class ModalitySeries:
    """The joined scores of one modality, in score order."""

    ts: np.ndarray  # evaluation time: the event time, or the middle of the interval it sums up
    indices: np.ndarray  # the ``index`` of each score: line, row or first-span number
    scores: np.ndarray
    alerts: np.ndarray
    labels: np.ndarray  # -1 where a score has no label
    services: list[str]
    hst: np.ndarray | None = None  # HalfSpaceTrees baseline scores, where the client sent them
    # False where the event's threshold was still warming up (sent as the largest float), so
    # the detector could not alert; None when every event had a threshold.
    ready: np.ndarray | None = None

    def window_rows(self, windows: Sequence[WindowLabel], scores: np.ndarray) -> list[WindowRow]:
        """Summarise ``scores`` per window, over the events whose threshold had warmed up."""
        ready = np.ones(self.ts.shape, dtype=bool) if self.ready is None else self.ready
        return window_rows(self.ts[ready], scores[ready], self.alerts[ready], windows)


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
    window_hst_auroc: float
    cases: int
    service_top1: float
    service_positives: int = 0
    service_auroc: float = float("nan")
    service_pr_auc: float = float("nan")
    service_random_pr_auc: float = float("nan")
    service_hst_pr_auc: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def join_series(
    scores: Sequence[Keyed],
    labels: Sequence[Keyed],
    label_source: str,
    modality: str,
    interval_s: float = 0.0,
) -> ModalitySeries:
    """Collect the scores of ``modality`` and their labels from the producer ``label_source``.

    A repeated (key, index) keeps its first score. The service of a score is its ``service``
    field when present, else its key. An event stamped t that sums up the interval
    (t - ``interval_s``, t], such as a one-minute metric sample, is evaluated at the middle of
    that interval.
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
        ts=np.array([item.envelope.ts for item in chosen], dtype=np.float64) - interval_s / 2,
        indices=np.array([int(item.envelope.body["index"]) for item in chosen], dtype=np.int64),
        scores=np.array([item.envelope.body["score"] for item in chosen], dtype=np.float64),
        alerts=np.array([bool(item.envelope.body["alert"]) for item in chosen], dtype=bool),
        labels=np.array(
            [by_key.get((item.key, int(item.envelope.body["index"])), -1) for item in chosen],
            dtype=np.int8,
        ),
        services=[str(item.envelope.body.get("service") or item.key) for item in chosen],
        hst=_hst_scores(chosen),
        ready=np.array(
            [item.envelope.body.get("threshold", 0.0) < WARMING_UP for item in chosen], dtype=bool
        ),
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
    label_cases: Sequence[FaultCase] | None = None,
) -> ModalityRow:
    """Return the table row of one modality's series.

    ``offline_baseline`` holds scores indexed by the stream index (for logs, the count-vector
    PCA of ``log_baselines.log_pca_scores``); its PR-AUC goes to ``offline_pr_auc``.
    ``label_cases`` are the cases the event labels were derived from, for the per-service
    view (``service_labels``); None leaves that view out, as for events whose service is the
    detector's own choice. ``cases`` are the cases the service ranking runs over.
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
    per_window = evaluate_windows(series.window_rows(windows, series.scores))
    hst_window = (
        evaluate_windows(series.window_rows(windows, series.hst))
        if series.hst is not None
        else None
    )
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
        window_hst_auroc=hst_window.auroc if hst_window else float("nan"),
        cases=len(hits),
        service_top1=top_k_accuracy(hits, 1),
        **(_service_view(series, label_cases, seed) if label_cases is not None else {}),
    )


def _service_view(series: ModalitySeries, cases: Sequence[FaultCase], seed: int) -> dict[str, Any]:
    """Return the per-service view's fields of a ``ModalityRow``, without scores for one class."""
    relabelled = service_labels(series.ts, series.services, series.labels, cases)
    known = relabelled >= 0
    labels = relabelled[known]
    view: dict[str, Any] = {"service_positives": int(labels.sum())}
    if not 0 < labels.sum() < labels.shape[0]:
        return view
    events = evaluate_scores(labels, series.scores[known])
    rng = np.random.default_rng(seed)
    view["service_auroc"] = events.auroc
    view["service_pr_auc"] = events.pr_auc
    random_scores = np.asarray(rng.random(size=labels.shape[0]))
    view["service_random_pr_auc"] = evaluate_scores(labels, random_scores).pr_auc
    if series.hst is not None:
        view["service_hst_pr_auc"] = evaluate_scores(labels, series.hst[known]).pr_auc
    return view


def combined_row(
    series: Mapping[str, ModalitySeries],
    windows: Sequence[WindowLabel],
    cases: Sequence[FaultCase],
) -> ModalityRow:
    """Return the row of every modality's alerts taken together, per window and per case."""
    per_modality = {name: s.window_rows(windows, s.scores) for name, s in series.items()}
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
        window_hst_auroc=float("nan"),
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
    ("window_hst_auroc", "window AUROC HST"),
    ("window_f1_operating", "window F1 (any alert)"),
    ("service_top1", "injected service top-1"),
    ("service_positives", "service-view positives"),
    ("service_auroc", "service-view AUROC"),
    ("service_pr_auc", "service-view PR-AUC"),
    ("service_random_pr_auc", "service-view PR-AUC random"),
    ("service_hst_pr_auc", "service-view PR-AUC HST"),
)


TABLE_NOTES = """\
Event labels: every event inside a fault case's time span is positive, of every service.
Service view: only the injected service's events inside its case are positive, other
services' events inside a case are left out, and traces have none (their service is the
detector's choice). Windows: fault windows (+1 and +2 minutes) against fault-free windows,
with the long fault-free window cut into minute-long parts. Metrics also get quiet minutes at
least 10 minutes from every case as fault-free windows. A window's score is its max event
score, over the events whose threshold had warmed up. Metric rows count at the middle of the
minute they sum up."""


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
