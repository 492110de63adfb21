"""Log evaluation: per line, per window of lines, per session, and per alert burst.

BGL alert lines come in bursts, so per-line figures mostly count how much of a burst was
flagged. The window and burst views report whether the burst was noticed at all, and are
meant to be read beside the per-line figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fanomad_stream.evaluate.metrics import DetectionMetrics, evaluate_scores

Aggregate = Literal["max", "mean"]


def count_windows(n: int, lines_per_window: int) -> np.ndarray:
    """Return the window index of each of ``n`` lines, for windows of a fixed line count."""
    if lines_per_window < 1:
        msg = f"lines_per_window must be >= 1, got {lines_per_window!r}"
        raise ValueError(msg)
    return np.arange(n) // lines_per_window


def time_windows(ts: np.ndarray, window_s: float) -> np.ndarray:
    """Return a dense window index per line for tumbling windows of ``window_s`` seconds.

    Empty windows get no index, so the result counts 0, 1, 2… over the windows that hold lines.
    """
    if window_s <= 0:
        msg = f"window_s must be > 0, got {window_s!r}"
        raise ValueError(msg)
    buckets = np.floor(np.asarray(ts, dtype=np.float64) / window_s).astype(np.int64)
    _, dense = np.unique(buckets, return_inverse=True)
    result: np.ndarray = dense.reshape(-1)
    return result


@dataclass(frozen=True)
class GroupedSeries:
    """Labels, scores and decisions per group (window or session), in group order."""

    groups: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    decisions: np.ndarray


def group_series(
    group_ids: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray,
    how: Aggregate = "max",
) -> GroupedSeries:
    """Fold per-line series into one value per group.

    A group is anomalous when any of its lines is, alerts when any line alerted, and scores
    the max (or mean) of its line scores.
    """
    group_ids = np.asarray(group_ids)
    if not group_ids.shape == np.shape(labels) == np.shape(scores) == np.shape(decisions):
        msg = "group_ids, labels, scores and decisions must have the same shape"
        raise ValueError(msg)
    groups, inverse = np.unique(group_ids, return_inverse=True)
    n = groups.shape[0]
    group_labels = np.zeros(n, dtype=np.int8)
    np.maximum.at(group_labels, inverse, np.asarray(labels, dtype=np.int8))
    group_decisions = np.zeros(n, dtype=bool)
    np.logical_or.at(group_decisions, inverse, np.asarray(decisions, dtype=bool))
    values = np.asarray(scores, dtype=np.float64)
    if how == "max":
        group_scores = np.full(n, -np.inf)
        np.maximum.at(group_scores, inverse, values)
    else:
        group_scores = np.bincount(inverse, weights=values, minlength=n) / np.bincount(
            inverse, minlength=n
        )
    return GroupedSeries(groups, group_labels, group_scores, group_decisions)


def burst_recall(labels: np.ndarray, decisions: np.ndarray) -> tuple[int, int]:
    """Return (bursts with at least one alert, bursts); a burst is a run of anomalous lines."""
    labels = np.asarray(labels, dtype=np.int8)
    edges = np.diff(np.concatenate([[0], labels, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    hit = sum(bool(np.asarray(decisions)[s:e].any()) for s, e in zip(starts, ends, strict=True))
    return hit, int(starts.shape[0])


@dataclass(frozen=True)
class LogEvaluation:
    """Per-line and per-window metrics of one log stream, and the burst recall."""

    line: DetectionMetrics
    window: DetectionMetrics
    bursts_detected: int
    bursts: int


def evaluate_log_lines(
    labels: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray,
    window_ids: np.ndarray,
    how: Aggregate = "max",
) -> LogEvaluation:
    """Evaluate per-line scores of a labelled log (BGL) per line, per window and per burst."""
    grouped = group_series(window_ids, labels, scores, decisions, how)
    hit, total = burst_recall(labels, decisions)
    return LogEvaluation(
        line=evaluate_scores(labels, scores, decisions),
        window=evaluate_scores(grouped.labels, grouped.scores, grouped.decisions),
        bursts_detected=hit,
        bursts=total,
    )


def evaluate_sessions(
    session_ids: np.ndarray,
    session_labels: dict[int, int],
    scores: np.ndarray,
    decisions: np.ndarray,
    how: Aggregate = "max",
) -> DetectionMetrics:
    """Evaluate per-event scores of HDFS block sessions per session.

    ``session_ids[i]`` names the session of event ``i`` and ``session_labels`` gives each
    session's label. A session alerts when any of its events did.
    """
    session_ids = np.asarray(session_ids)
    missing = set(np.unique(session_ids).tolist()) - set(session_labels)
    if missing:
        msg = f"{len(missing)} sessions have no label, for example {sorted(missing)[:3]!r}"
        raise ValueError(msg)
    labels = np.array([session_labels[int(s)] for s in session_ids], dtype=np.int8)
    grouped = group_series(session_ids, labels, scores, decisions, how)
    return evaluate_scores(grouped.labels, grouped.scores, grouped.decisions)


@dataclass(frozen=True)
class ScorerRow:
    """Per-line and per-window figures of one scorer on a labelled log.

    ``decided`` is False for a baseline that gives scores but no alerts; its operating F1
    and burst count are then undefined (NaN and -1).
    """

    scorer: str
    decided: bool
    lines: int
    line_positives: int
    line_auroc: float
    line_pr_auc: float
    line_f1_operating: float
    windows: int
    window_positives: int
    window_auroc: float
    window_pr_auc: float
    window_f1_operating: float
    bursts_detected: int
    bursts: int


def scorer_rows(
    labels: np.ndarray,
    window_ids: np.ndarray,
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]],
) -> list[ScorerRow]:
    """Evaluate each scorer's (scores, alert decisions or None) per line and per window."""
    rows = []
    for name, (scores, decisions) in scorers.items():
        decided = decisions is not None
        shown = decisions if decisions is not None else np.zeros(labels.shape, dtype=bool)
        result = evaluate_log_lines(labels, scores, shown, window_ids)
        rows.append(
            ScorerRow(
                scorer=name,
                decided=decided,
                lines=result.line.n,
                line_positives=result.line.positives,
                line_auroc=result.line.auroc,
                line_pr_auc=result.line.pr_auc,
                line_f1_operating=result.line.f1_operating if decided else float("nan"),
                windows=result.window.n,
                window_positives=result.window.positives,
                window_auroc=result.window.auroc,
                window_pr_auc=result.window.pr_auc,
                window_f1_operating=result.window.f1_operating if decided else float("nan"),
                bursts_detected=result.bursts_detected if decided else -1,
                bursts=result.bursts,
            )
        )
    return rows


def render_scorer_table(rows: list[ScorerRow]) -> str:
    """Render scorer rows as a Markdown table, with three decimals for rates."""
    header = (
        "| scorer | lines (anomalous) | line AUROC | line PR-AUC | line F1 (online) "
        "| windows (anomalous) | window AUROC | window PR-AUC | window F1 (any alert) "
        "| bursts with an alert |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        bursts = f"{row.bursts_detected}/{row.bursts}" if row.decided else "n/a"
        cells = [
            row.scorer,
            f"{row.lines} ({row.line_positives})",
            f"{row.line_auroc:.3f}",
            f"{row.line_pr_auc:.3f}",
            f"{row.line_f1_operating:.3f}",
            f"{row.windows} ({row.window_positives})",
            f"{row.window_auroc:.3f}",
            f"{row.window_pr_auc:.3f}",
            f"{row.window_f1_operating:.3f}",
            bursts,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class SessionRow:
    """Per-session figures of one scorer: a session scores the max (and mean) of its lines.

    ``decided`` is False for a baseline without alerts; its operating F1 is then NaN.
    """

    scorer: str
    decided: bool
    sessions: int
    anomalous: int
    line_auroc: float
    auroc_max: float
    pr_auc_max: float
    best_f1_max: float
    f1_operating: float
    precision_operating: float
    recall_operating: float
    auroc_mean: float
    pr_auc_mean: float


def session_scorer_rows(
    labels: np.ndarray,
    session_ids: np.ndarray,
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]],
) -> list[SessionRow]:
    """Evaluate each scorer's per-line (scores, alerts or None) per session.

    ``labels`` gives each line's session label. A session alerts when any of its lines did.
    """
    session_ids = np.asarray(session_ids)
    first: dict[int, int] = {}
    for session, label in zip(session_ids.tolist(), np.asarray(labels).tolist(), strict=True):
        first.setdefault(int(session), int(label))
    rows = []
    for name, (scores, decisions) in scorers.items():
        decided = decisions is not None
        shown = decisions if decisions is not None else np.zeros(np.shape(scores), dtype=bool)
        by_max = evaluate_sessions(session_ids, first, scores, shown, "max")
        by_mean = evaluate_sessions(session_ids, first, scores, shown, "mean")
        line = evaluate_scores(labels, scores, shown)
        rows.append(
            SessionRow(
                scorer=name,
                decided=decided,
                sessions=by_max.n,
                anomalous=by_max.positives,
                line_auroc=line.auroc,
                auroc_max=by_max.auroc,
                pr_auc_max=by_max.pr_auc,
                best_f1_max=by_max.best_f1,
                f1_operating=by_max.f1_operating if decided else float("nan"),
                precision_operating=by_max.precision_operating if decided else float("nan"),
                recall_operating=by_max.recall_operating if decided else float("nan"),
                auroc_mean=by_mean.auroc,
                pr_auc_mean=by_mean.pr_auc,
            )
        )
    return rows


def render_session_table(rows: list[SessionRow]) -> str:
    """Render session rows as a Markdown table, with three decimals for rates."""
    header = (
        "| scorer | sessions (anomalous) | line AUROC | session AUROC | session PR-AUC "
        "| best F1 | F1 (any alert) | precision | recall | AUROC (mean) | PR-AUC (mean) |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        cells = [
            row.scorer,
            f"{row.sessions} ({row.anomalous})",
            *(
                f"{value:.3f}"
                for value in (
                    row.line_auroc,
                    row.auroc_max,
                    row.pr_auc_max,
                    row.best_f1_max,
                    row.f1_operating,
                    row.precision_operating,
                    row.recall_operating,
                    row.auroc_mean,
                    row.pr_auc_mean,
                )
            ),
        ]
        lines.append("| " + " | ".join(cells).replace("nan", "n/a") + " |")
    return "\n".join(lines)
