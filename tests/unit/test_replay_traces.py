"""Nezha TrainTicket readers, replay pacing and fault labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fanomad_stream.featurize.trace_assembly import Span, TraceAssembler
from fanomad_stream.featurize.traces import TraceFeaturizer
from fanomad_stream.replay.traces import (
    FaultCase,
    label_times,
    read_cases,
    read_logs,
    read_pod_metrics,
    read_spans,
    read_window_labels,
    replay_offsets,
    service_of,
)

NEZHA = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "multimodal"
    / "nezha_trainticket"
)
needs_nezha = pytest.mark.skipif(
    not NEZHA.is_dir(), reason=f"Nezha data not found at {NEZHA}; it is not shipped"
)
FAULT_29 = NEZHA / "fault" / "2023-01-29"


def test_service_of_pod() -> None:
    """The service is the pod name without its two generated suffixes."""
    assert service_of("ts-contacts-service-866bd68c97-xcqfx") == "ts-contacts-service"
    assert service_of("standalone") == "standalone"


def test_replay_offsets_speed() -> None:
    """Offsets are recorded gaps divided by the speed; speed 0 sends at once."""
    np.testing.assert_allclose(replay_offsets([0, 1_000_000, 3_000_000], 2.0), [0.0, 0.5, 1.5])
    np.testing.assert_array_equal(replay_offsets([5, 9], 0.0), [0.0, 0.0])
    with pytest.raises(ValueError, match="sorted"):
        replay_offsets([2, 1], 1.0)
    with pytest.raises(ValueError, match="-1"):
        replay_offsets([1], -1.0)


def test_label_times_uses_case_span() -> None:
    """Times from injection to the case end get the case index, others -1."""
    cases = [
        FaultCase("a", 100.0, 200.0, "svc-a", "svc-a-x-y", "cpu", True),
        FaultCase("b", 300.0, 400.0, "svc-b", "svc-b-x-y", "delay", False),
    ]
    assert label_times([99.9, 100.0, 200.0, 250.0, 350.0], cases).tolist() == [-1, 0, 0, -1, 1]


@needs_nezha
class TestNezhaFiles:
    def test_spans_sorted_with_root(self) -> None:
        """The 08_43 window has 4,445 spans in start order and one root per trace."""
        spans = read_spans(FAULT_29 / "trace" / "08_43_trace.csv.gz")
        assert len(spans) == 4445
        starts = [s.start_us for s in spans]
        assert starts == sorted(starts)
        roots = [s for s in spans if not s.parent_id]
        assert len(roots) == len({s.trace_id for s in spans}) == 53
        assert spans[0].service == "ts-gateway-service"

    def test_window_assembles_by_root(self) -> None:
        """Replaying a window through the assembler closes all 53 traces, none evicted."""
        assembler = TraceAssembler(root_grace_us=1_000_000, timeout_us=30_000_000)
        featurizer = TraceFeaturizer()
        closed = []
        for span in read_spans(FAULT_29 / "trace" / "08_43_trace.csv.gz"):
            closed += assembler.add(span)
        closed += assembler.flush()
        assert len(closed) == 53
        assert sum(len(t.spans) for t in closed) == 4445
        assert assembler.counters.evicted_traces == 0
        assert assembler.counters.late_spans == 0
        assert all(np.isfinite(featurizer.featurize(t).vector).all() for t in closed)

    def test_logs_time_quirk_fixed(self) -> None:
        """Rows with an overflowed TimeUnixNano take the Timestamp string and stay in the window."""
        lines = read_logs(NEZHA / "fault" / "2023-01-30" / "log" / "13_15_log.csv.gz")
        assert len(lines) == 306
        times = np.array([line.record.ts for line in lines])
        assert times.min() > 1675084400
        assert times.max() < 1675084560
        assert sum(line.record.level == "ERROR" for line in lines) == 50
        assert lines[0].record.source == service_of(lines[0].pod)

    def test_metrics_filled_and_dropped(self) -> None:
        """Pod metrics lose the always-zero success rate and carry no NaN."""
        metrics = read_pod_metrics(
            NEZHA / "metric" / "2023-01-29" / "ts-contacts-service-866bd68c97-xcqfx_metric.csv.gz"
        )
        assert metrics.values.shape == (919, 18)
        assert "PodSuccessRate(%)" not in metrics.names
        assert np.isfinite(metrics.values).all()
        assert metrics.filled > 0
        assert metrics.service == "ts-contacts-service"

    def test_cases_use_inject_time(self) -> None:
        """Cases start at inject_time (UTC) and the shipped ones end at their last window."""
        cases = read_cases(NEZHA / "labels")
        assert len(cases) == 45
        first = cases[0]
        assert first.inject_unix == 1674981784.0
        assert first.end_unix == pytest.approx(1674981908.524, abs=1e-3)
        assert sum(c.shipped for c in cases) == 6
        assert all(c.end_unix > c.inject_unix for c in cases)

    def test_window_labels(self) -> None:
        """12 post-injection windows are faulty, 2 fault-free, 6 injection minutes left out."""
        labels = read_window_labels(NEZHA / "labels")
        assert sorted(w.label for w in labels).count(1) == 12
        assert [w.label for w in labels].count(0) == 2
        assert [w.label for w in labels].count(-1) == 6


def test_missing_file_named(tmp_path: Path) -> None:
    """A missing trace file raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="nothing"):
        read_spans(tmp_path / "nothing.csv.gz")


def test_span_pod_default() -> None:
    """Spans built without a pod keep an empty pod field."""
    assert Span("t", "s", "", "svc", "op", 0, 1).pod == ""
