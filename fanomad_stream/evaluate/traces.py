"""Trace evaluation: fault windows against fault-free windows, and root-cause services.

Inputs are plain arrays of event times, scores, alert decisions and the service each event
(or alert) names, so the same functions apply to traces, logs and metrics of the same system.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np

from fanomad_stream.evaluate.metrics import DetectionMetrics, evaluate_scores
from fanomad_stream.replay.traces import FaultCase, WindowLabel, label_times


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


def split_long_windows(windows: Sequence[WindowLabel]) -> list[WindowLabel]:
    """Cut each window much longer than the median fault window into parts of about that length.

    A window's score is the max over its events, and the max over three minutes of normal
    events is higher than over one. A long fault-free window would therefore look more
    anomalous for its length alone: the Nezha 2023-01-29 one spans about 168 s, against about
    60 s per fault window. A window longer than 1.5 median lengths becomes ``round(length / median)``
    equal parts named ``<window>.<part>``. The other windows are kept as they are.
    """
    lengths = [w.last_unix - w.first_unix for w in windows if w.label == 1]
    if not lengths:
        return list(windows)
    median = float(np.median(lengths))
    result = []
    for window in windows:
        length = window.last_unix - window.first_unix
        if median <= 0 or length <= 1.5 * median:
            result.append(window)
            continue
        parts = round(length / median)
        edges = np.linspace(window.first_unix, window.last_unix, parts + 1)
        for part in range(parts):
            result.append(
                replace(
                    window,
                    window=f"{window.window}.{part + 1}",
                    first_unix=float(edges[part]),
                    last_unix=float(edges[part + 1]),
                )
            )
    return result


def quiet_windows(
    ts: np.ndarray, cases: Sequence[FaultCase], gap_s: float, length_s: float = 60.0
) -> list[WindowLabel]:
    """Return fault-free windows of ``length_s`` over the times ``ts``, far from every case.

    The windows tile UTC time from the epoch, and a window is kept when it contains a time of
    ``ts`` and lies at least ``gap_s`` from the time span of every case in ``cases`` (pass all
    cases, shipped or not). It is named ``quiet-HH_MM`` after its start. Streams that cover
    more than the shipped windows, such as the per-pod metrics, get negatives this way that
    are not the first minutes of a day.
    """
    if gap_s < 0 or length_s <= 0:
        msg = f"gap_s must be >= 0 and length_s > 0, got {gap_s!r} and {length_s!r}"
        raise ValueError(msg)
    starts = np.unique(np.floor(np.asarray(ts, dtype=np.float64) / length_s)) * length_s
    windows = []
    for start in starts.tolist():
        end = start + length_s
        if any(start < case.end_unix + gap_s and case.inject_unix < end + gap_s for case in cases):
            continue
        moment = datetime.fromtimestamp(start, UTC)
        # The end is open: the last instant before the next window starts.
        last = float(np.nextafter(end, start))
        windows.append(
            WindowLabel(
                moment.strftime("%Y-%m-%d"), moment.strftime("quiet-%H_%M"), "", 0, start, last
            )
        )
    return windows


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


def service_labels(
    ts: np.ndarray, services: Sequence[str], labels: np.ndarray, cases: Sequence[FaultCase]
) -> np.ndarray:
    """Relabel events for the per-service view of a fault: only the injected service is positive.

    An event labelled 1 stays 1 when it belongs to the injected service of the case whose time
    span contains it, and becomes -1 (left out) otherwise, because the labels cannot tell
    whether another service's events carry the fault's effects. Events labelled 0 or -1 keep
    their label.
    """
    labels = np.asarray(labels, dtype=np.int8)
    if labels.shape[0] != len(services):
        msg = f"got {labels.shape[0]} labels but {len(services)} services"
        raise ValueError(msg)
    case_index = label_times(ts, cases)
    result = labels.copy()
    for i in np.flatnonzero(labels == 1):
        case = int(case_index[i])
        if case < 0 or services[int(i)] != cases[case].service:
            result[i] = -1
    return result


def top_k_accuracy(hits: Sequence[CaseHit], k: int) -> float:
    """Return the share of cases whose injected service ranks within the first ``k``."""
    if not hits:
        return float("nan")
    return sum(0 < hit.rank <= k for hit in hits) / len(hits)
