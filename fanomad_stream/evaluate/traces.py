"""Trace evaluation: fault windows against fault-free windows, and root-cause services.

Inputs are plain arrays of event times, scores, alert decisions and the service each event
(or alert) names, so the same functions apply to traces, logs and metrics of the same system.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fanomad_stream.evaluate.metrics import DetectionMetrics, evaluate_scores
from fanomad_stream.replay.traces import FaultCase, WindowLabel


@dataclass(frozen=True)
class WindowRow:
    """One labelled window: events scored in it, alerts raised, and the highest score."""

    date: str
    window: str
    label: int
    events: int
    alerts: int
    max_score: float


def window_rows(
    ts: np.ndarray, scores: np.ndarray, decisions: np.ndarray, windows: Sequence[WindowLabel]
) -> list[WindowRow]:
    """Assign each event to the first window whose time range contains it and summarise each window.

    Windows of one case overlap by up to a second at their edges, and an event there counts in
    the earlier window only. Events outside every window are ignored.
    """
    ts = np.asarray(ts, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    decisions = np.asarray(decisions, dtype=bool)
    taken = np.zeros(ts.shape, dtype=bool)
    rows = []
    for window in windows:
        inside = (ts >= window.first_unix) & (ts <= window.last_unix) & ~taken
        taken |= inside
        count = int(inside.sum())
        top = float(scores[inside].max()) if count else float("nan")
        rows.append(
            WindowRow(
                window.date, window.window, window.label, count, int(decisions[inside].sum()), top
            )
        )
    return rows


def evaluate_windows(rows: Sequence[WindowRow]) -> DetectionMetrics:
    """Score fault windows against fault-free ones by max score, and by any alert.

    Windows labelled -1 (the injection minute) and windows without events are left out.
    """
    kept = [row for row in rows if row.label in (0, 1) and row.events > 0]
    labels = np.array([row.label for row in kept], dtype=np.int8)
    scores = np.array([row.max_score for row in kept])
    decisions = np.array([row.alerts > 0 for row in kept], dtype=bool)
    return evaluate_scores(labels, scores, decisions, ks=(1,))


@dataclass(frozen=True)
class CaseHit:
    """Alerts during one fault case and whether they named the injected service."""

    case_id: str
    injected: str
    alerts: int
    alerts_naming_injected: int
    top_service: str
    rank: int


def service_hits(
    alert_ts: np.ndarray, alert_services: Sequence[str], cases: Sequence[FaultCase]
) -> list[CaseHit]:
    """Rank the services the alerts of each case name, by alert count.

    ``rank`` is the injected service's 1-based place in that ranking (ties share the better
    place), or 0 when no alert of the case named it. ``top_service`` is empty without alerts.
    """
    alert_ts = np.asarray(alert_ts, dtype=np.float64)
    if alert_ts.shape[0] != len(alert_services):
        msg = f"got {alert_ts.shape[0]} alert times but {len(alert_services)} services"
        raise ValueError(msg)
    hits = []
    for case in cases:
        inside = np.flatnonzero((alert_ts >= case.inject_unix) & (alert_ts <= case.end_unix))
        counts = Counter(alert_services[int(i)] for i in inside)
        named = counts.get(case.service, 0)
        rank = 1 + sum(count > named for count in counts.values()) if named else 0
        top = counts.most_common(1)[0][0] if counts else ""
        hits.append(CaseHit(case.case_id, case.service, int(inside.shape[0]), named, top, rank))
    return hits


def top_k_accuracy(hits: Sequence[CaseHit], k: int) -> float:
    """Return the share of cases whose injected service ranks within the first ``k``."""
    if not hits:
        return float("nan")
    return sum(0 < hit.rank <= k for hit in hits) / len(hits)
