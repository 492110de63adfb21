"""Log and trace evaluation helpers on small hand-built inputs."""

from __future__ import annotations

import numpy as np
import pytest

from fanomad_stream.evaluate.logs import (
    burst_recall,
    count_windows,
    evaluate_log_lines,
    evaluate_sessions,
    group_series,
    time_windows,
)
from fanomad_stream.evaluate.traces import (
    evaluate_windows,
    quiet_windows,
    service_hits,
    service_labels,
    split_long_windows,
    top_k_accuracy,
    window_rows,
)
from fanomad_stream.replay.traces import FaultCase, WindowLabel


def test_count_and_time_windows() -> None:
    """Fixed-count windows number lines in blocks; time windows skip empty spans densely."""
    assert count_windows(5, 2).tolist() == [0, 0, 1, 1, 2]
    assert time_windows(np.array([0.5, 1.0, 9.0, 31.0]), 10.0).tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="0"):
        count_windows(3, 0)


def test_group_series_max_and_any() -> None:
    """A window is anomalous and alerting when any line is, with the max line score."""
    grouped = group_series(
        np.array([0, 0, 1, 1]),
        np.array([0, 1, 0, 0]),
        np.array([0.1, 0.9, 0.3, 0.2]),
        np.array([False, False, True, False]),
    )
    assert grouped.labels.tolist() == [1, 0]
    assert grouped.scores.tolist() == [0.9, 0.3]
    assert grouped.decisions.tolist() == [False, True]


def test_group_series_mean() -> None:
    """The mean aggregate averages the line scores of each window."""
    grouped = group_series(
        np.array([0, 0, 1]), np.zeros(3), np.array([1.0, 3.0, 5.0]), np.zeros(3), "mean"
    )
    assert grouped.scores.tolist() == [2.0, 5.0]


def test_burst_recall_counts_runs() -> None:
    """Two bursts, one with an alert inside, give one of two detected."""
    labels = np.array([0, 1, 1, 0, 1, 0])
    decisions = np.array([False, False, True, False, False, True])
    assert burst_recall(labels, decisions) == (1, 2)


def test_evaluate_log_lines_levels() -> None:
    """A detector that flags one line per burst has low line recall but full window recall."""
    labels = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.3, 0.3, 0.1, 0.2])
    decisions = scores > 0.5
    result = evaluate_log_lines(labels, scores, decisions, count_windows(8, 2))
    assert result.line.recall_operating == pytest.approx(0.25)
    assert result.window.recall_operating == pytest.approx(0.5)
    assert result.window.n == 4
    assert (result.bursts_detected, result.bursts) == (1, 1)


def test_evaluate_sessions_any_event() -> None:
    """A session alerts when any event did, and scores with its max event score."""
    metrics = evaluate_sessions(
        np.array([10, 10, 11, 12, 12]),
        {10: 1, 11: 0, 12: 0},
        np.array([0.2, 0.8, 0.1, 0.3, 0.4]),
        np.array([False, True, False, False, False]),
    )
    assert metrics.n == 3
    assert metrics.auroc == 1.0
    assert metrics.f1_operating == 1.0


def test_evaluate_sessions_missing_label() -> None:
    """An event of a session without a label raises ValueError naming the session."""
    with pytest.raises(ValueError, match="13"):
        evaluate_sessions(np.array([13]), {}, np.array([0.1]), np.array([False]))


WINDOWS = [
    WindowLabel("d", "w0", "c", -1, 0.0, 10.0),
    WindowLabel("d", "w1", "c", 1, 10.0, 20.0),
    WindowLabel("d", "w2", "", 0, 30.0, 40.0),
]


def test_window_rows_first_window_wins() -> None:
    """An event on the shared edge counts in the earlier window; events outside are ignored."""
    ts = np.array([5.0, 10.0, 15.0, 35.0, 50.0])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 5.0])
    decisions = np.array([False, False, True, False, True])
    rows = window_rows(ts, scores, decisions, WINDOWS)
    assert [(r.window, r.events, r.alerts) for r in rows] == [
        ("w0", 2, 0),
        ("w1", 1, 1),
        ("w2", 1, 0),
    ]
    assert rows[1].max_score == 0.9


def test_evaluate_windows_skips_injection_minute() -> None:
    """Only fault and fault-free windows with events enter the window metrics."""
    rows = window_rows(
        np.array([5.0, 15.0, 35.0]),
        np.array([9.0, 0.9, 0.3]),
        np.array([True, True, False]),
        WINDOWS,
    )
    metrics = evaluate_windows(rows)
    assert metrics.n == 2
    assert metrics.auroc == 1.0
    assert metrics.confusion == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}


def test_evaluate_windows_without_events() -> None:
    """When no window contains an event the window metrics are empty and NaN, not an error."""
    rows = window_rows(np.array([1e6]), np.array([0.5]), np.array([False]), WINDOWS)

    metrics = evaluate_windows(rows)

    assert metrics.n == 0
    assert np.isnan(metrics.auroc)
    assert np.isnan(metrics.pr_auc)


CASES = [
    FaultCase("a", 100.0, 200.0, "contacts", "contacts-x-y", "cpu", True),
    FaultCase("b", 300.0, 400.0, "food", "food-x-y", "delay", True),
    FaultCase("c", 500.0, 600.0, "travel", "travel-x-y", "delay", True),
]


def test_service_hits_rank_injected() -> None:
    """The injected service's rank among alerted services decides the top-k accuracy."""
    ts = np.array([110.0, 120.0, 130.0, 310.0, 320.0, 330.0, 50.0])
    services = ["contacts", "contacts", "gateway", "gateway", "gateway", "food", "contacts"]
    hits = service_hits(ts, services, CASES)
    assert [(h.alerts, h.alerts_naming_injected, h.rank) for h in hits] == [
        (3, 2, 1),
        (3, 1, 2),
        (0, 0, 0),
    ]
    assert hits[0].top_service == "contacts"
    assert hits[2].top_service == ""
    assert top_k_accuracy(hits, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(hits, 2) == pytest.approx(2 / 3)


def test_service_hits_length_mismatch() -> None:
    """Alert times and services of different lengths raise ValueError with both counts."""
    with pytest.raises(ValueError, match="2 alert times but 1 services"):
        service_hits(np.array([1.0, 2.0]), ["x"], CASES)


def test_split_long_fault_free_window() -> None:
    """A fault-free window three fault windows long becomes three parts; others stay whole."""
    windows = [
        WindowLabel("d", "00_02", "c", 1, 60.0, 119.0),
        WindowLabel("d", "00_03", "c", 1, 120.0, 181.0),
        WindowLabel("d", "00_09", "", 0, 300.0, 480.0),
        WindowLabel("d", "00_12", "", 0, 600.0, 670.0),
    ]
    split = split_long_windows(windows)
    assert [w.window for w in split] == ["00_02", "00_03", "00_09.1", "00_09.2", "00_09.3", "00_12"]
    assert [(w.first_unix, w.last_unix) for w in split[2:5]] == [
        (300.0, 360.0),
        (360.0, 420.0),
        (420.0, 480.0),
    ]
    assert all(w.label == 0 for w in split[2:])


def test_split_keeps_windows_without_faults() -> None:
    windows = [WindowLabel("d", "00_09", "", 0, 300.0, 480.0)]
    assert split_long_windows(windows) == windows


def test_quiet_windows_keep_gap() -> None:
    """Minute windows holding an event and at least gap_s from every case are fault-free."""
    cases = [FaultCase("a", 1000.0, 1100.0, "contacts", "contacts-x-y", "cpu", False)]
    ts = np.array([30.0, 45.0, 370.0, 430.0, 1050.0, 1710.0, 1750.0, 2000.0])
    windows = quiet_windows(ts, cases, gap_s=600.0)
    # [360, 420) ends 580 s before the injection and [1680, 1740) starts 580 s after the end
    assert [w.first_unix for w in windows] == [0.0, 1740.0, 1980.0]
    assert all(w.label == 0 for w in windows)
    assert windows[0].window == "quiet-00_00"
    assert windows[0].date == "1970-01-01"
    assert 59.9 < windows[0].last_unix < 60.0
    with pytest.raises(ValueError, match="gap_s"):
        quiet_windows(ts, cases, gap_s=-1.0)


def test_service_labels_keep_injected_only() -> None:
    """Inside a case only the injected service stays positive; the rest is left out."""
    ts = np.array([50.0, 150.0, 160.0, 170.0, 350.0])
    services = ["contacts", "contacts", "food", "contacts", "food"]
    labels = np.array([0, 1, 1, -1, 1], dtype=np.int8)
    assert service_labels(ts, services, labels, CASES).tolist() == [0, 1, -1, -1, 1]
    # a positive event outside every known case cannot be matched to a service
    assert service_labels(np.array([250.0]), ["food"], np.array([1]), CASES).tolist() == [-1]
    with pytest.raises(ValueError, match="2 labels but 1 services"):
        service_labels(ts[:2], ["x"], labels[:2], CASES)
