"""The multimodal evaluation: label joins per producer, rows per modality, combined alerts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.evaluate.modalities import (
    WARMING_UP,
    ModalitySeries,
    combined_row,
    evaluate_series,
    join_series,
    render_table,
)
from fanomad_stream.replay.traces import FaultCase, WindowLabel
from fanomad_stream.transport.codec import Envelope
from fanomad_stream.transport.reader import Keyed


def _keyed(key: str, kind: str, src: str, ts: float, **body: object) -> Keyed:
    return Keyed(key, Envelope(kind, src, ts, dict(body)), 0, 0)


WINDOWS = [
    WindowLabel("d", "00_01", "", 0, 0.0, 59.0),
    WindowLabel("d", "00_02", "c1", 1, 60.0, 119.0),
]
CASES = [FaultCase("c1", 60.0, 119.0, "svc-b", "svc-b-1", "cpu", True)]


def test_join_keeps_producers_apart() -> None:
    """A metric label and a log label with the same key and index do not mix."""
    labels = [
        _keyed("svc-a", "label", "nezha-metrics", 1.0, index=0, label=1),
        _keyed("svc-a", "label", "nezha-logs", 1.0, index=0, label=0),
    ]
    scores = [
        _keyed("svc-a", "score", "edge", 1.0, index=0, score=0.5, alert=False, modality="logs"),
        _keyed("svc-a", "score", "edge", 1.0, index=1, score=0.7, alert=True, modality="logs"),
        _keyed("svc-a", "score", "edge", 1.0, index=0, score=0.1, alert=False, modality="metrics"),
        _keyed("svc-a", "score", "edge", 1.0, index=0, score=0.9, alert=True, modality="logs"),
    ]
    logs = join_series(scores, labels, "nezha-logs", "logs")
    metrics = join_series(scores, labels, "nezha-metrics", "metrics")
    assert logs.labels.tolist() == [0, -1]
    assert logs.scores.tolist() == [0.5, 0.7]
    assert metrics.labels.tolist() == [1]
    assert logs.services == ["svc-a", "svc-a"]
    assert logs.hst is None


def test_join_reads_hst_baseline() -> None:
    labels = [_keyed("t1", "label", "nezha-traces", 1.0, index=3, label=1)]
    scores = [
        _keyed(
            "t1",
            "score",
            "edge",
            1.0,
            index=3,
            score=0.5,
            alert=False,
            modality="traces",
            service="svc-b",
            detail={"hst": 0.25},
        )
    ]
    traces = join_series(scores, labels, "nezha-traces", "traces")
    assert traces.labels.tolist() == [1]
    assert traces.services == ["svc-b"]
    assert traces.hst is not None
    assert traces.hst.tolist() == [0.25]


def _series(ts: list[float], scores: list[float], alerts: list[bool], services: list[str]):  # type: ignore[no-untyped-def]
    labels = [int(60.0 <= t <= 119.0) for t in ts]
    return ModalitySeries(
        np.array(ts),
        np.arange(len(ts)),
        np.array(scores),
        np.array(alerts),
        np.array(labels, dtype=np.int8),
        services,
    )


def test_series_row_counts_and_service() -> None:
    series = _series(
        [10.0, 20.0, 70.0, 80.0],
        [0.1, 0.2, 0.9, 0.8],
        [False, False, True, True],
        ["svc-a", "svc-a", "svc-b", "svc-a"],
    )
    # the offline baseline is indexed by stream index and ranks the events the other way
    offline = np.array([0.9, 0.8, 0.1, 0.2])
    row = evaluate_series("traces", series, WINDOWS, CASES, offline_baseline=offline)
    assert row.events == 4
    assert row.positives == 2
    assert row.alerts == 2
    assert row.auroc == 1.0
    assert row.f1_operating == 1.0
    assert row.offline_pr_auc == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert math.isnan(row.hst_pr_auc)
    assert row.windows == 2
    assert row.window_f1_operating == 1.0
    # svc-b and svc-a got one alert each, so the injected service ties for first place
    assert row.service_top1 == 1.0


def test_combined_any_alert_per_window() -> None:
    quiet = _series([10.0, 70.0], [0.5, 0.4], [False, False], ["svc-a", "svc-a"])
    loud = _series([15.0, 75.0], [0.1, 0.9], [False, True], ["svc-c", "svc-c"])
    row = combined_row({"metrics": quiet, "logs": loud}, WINDOWS, CASES)
    assert row.modality == "combined"
    assert row.events == 4
    assert row.alerts == 1
    assert row.windows == 2
    assert row.window_f1_operating == 1.0
    assert row.service_top1 == 0.0
    assert math.isnan(row.auroc)
    assert "| combined |" in render_table([row])


def test_log_pca_flags_rare_window() -> None:
    """A window whose template mix is unlike every other gets the highest residual."""
    from fanomad_stream.evaluate.log_baselines import log_pca_scores
    from fanomad_stream.replay.logs import LogRecord

    records = []
    for minute in range(30):
        for i in range(5):
            records.append(LogRecord(60.0 * minute + i, "n1", f"job {i} started ok"))
            records.append(LogRecord(60.0 * minute + i, "n1", f"job {i} finished in {i} ms"))
    odd = [LogRecord(60.0 * 31 + i, "n1", f"kernel panic at node {i}") for i in range(5)]
    scores = log_pca_scores(records + odd, n_buckets=16)
    assert scores.shape == (len(records) + len(odd),)
    assert scores[-1] > scores[: len(records)].max()


def test_join_shifts_interval_and_marks_warmup() -> None:
    """A one-minute sample counts at the middle of its minute; warming thresholds are marked."""
    scores = [
        _keyed(
            "svc-a",
            "score",
            "edge",
            120.0,
            index=0,
            score=0.5,
            alert=False,
            modality="metrics",
            threshold=WARMING_UP,
        ),
        _keyed(
            "svc-a",
            "score",
            "edge",
            180.0,
            index=1,
            score=0.7,
            alert=True,
            modality="metrics",
            threshold=0.6,
        ),
    ]
    series = join_series(scores, [], "nezha-metrics", "metrics", interval_s=60.0)
    assert series.ts.tolist() == [90.0, 150.0]
    assert series.ready is not None
    assert series.ready.tolist() == [False, True]


def test_windows_skip_warming_events() -> None:
    """An event whose threshold was still warming up scores no window."""
    series = ModalitySeries(
        np.array([10.0, 70.0, 80.0]),
        np.arange(3),
        np.array([9.0, 0.2, 0.8]),
        np.array([False, False, True]),
        np.array([0, 1, 1], dtype=np.int8),
        ["svc-a", "svc-b", "svc-b"],
        ready=np.array([False, True, True]),
    )
    row = evaluate_series("metrics", series, WINDOWS, CASES)
    assert row.windows == 1  # the fault-free window held only the warming event
    assert row.events == 3


def test_service_view_beside_event_labels() -> None:
    """The service view drops other services' events in a case and keeps both rows' counts."""
    series = ModalitySeries(
        np.array([10.0, 20.0, 70.0, 80.0, 90.0]),
        np.arange(5),
        np.array([0.1, 0.3, 0.9, 0.2, 0.4]),
        np.array([False, False, True, False, False]),
        np.array([0, 0, 1, 1, 1], dtype=np.int8),
        ["svc-a", "svc-a", "svc-b", "svc-a", "svc-b"],
        hst=np.array([0.5, 0.1, 0.2, 0.9, 0.3]),
    )
    row = evaluate_series("metrics", series, WINDOWS, CASES, label_cases=CASES)
    assert row.positives == 3
    assert row.service_positives == 2
    # svc-b's two events (0.9, 0.4) against the two normal ones (0.1, 0.3)
    assert row.service_auroc == 1.0
    # HST ranks 0.5 (normal), 0.3, 0.2 (svc-b), 0.1 (normal)
    assert row.service_hst_pr_auc == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert 0.0 < row.service_random_pr_auc <= 1.0
    without = evaluate_series("traces", series, WINDOWS, CASES)
    assert without.service_positives == 0
    assert math.isnan(without.service_auroc)
