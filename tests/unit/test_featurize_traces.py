"""Trace assembly from out-of-order spans, the operation baseline and trace features."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fanomad_stream.featurize.trace_assembly import Span, Trace, TraceAssembler
from fanomad_stream.featurize.traces import (
    TRACE_SCALARS,
    OperationBaseline,
    TraceFeaturizer,
    is_error_status,
    tree_shape,
)

S = 1_000_000  # microseconds per second


def span(
    trace: str,
    span_id: str,
    parent: str = "",
    *,
    start: int = 0,
    duration: int = 100,
    service: str = "svc",
    operation: str = "op",
    status: str = "",
) -> Span:
    return Span(trace, span_id, parent, service, operation, start, duration, status)


def request(trace: str, start: int) -> list[Span]:
    """A root on the gateway calling two services, one of which calls a third."""
    return [
        span(trace, "r", start=start, duration=5 * S, service="gateway"),
        span(trace, "a", "r", start=start + 1, duration=2 * S, service="orders"),
        span(trace, "b", "r", start=start + 2, duration=1 * S, service="users"),
        span(trace, "c", "a", start=start + 3, duration=1 * S, service="db"),
    ]


class TestTraceAssembler:
    def test_closes_after_root_completes(self) -> None:
        """A trace closes once the clock passes its root end plus the grace, with all spans."""
        assembler = TraceAssembler(root_grace_us=1 * S, timeout_us=60 * S)
        closed: list[Trace] = []
        for item in request("t1", 0):
            closed += assembler.add(item)
        assert closed == []
        closed += assembler.advance(6 * S - 1)
        assert closed == []
        closed += assembler.advance(6 * S)
        assert [t.trace_id for t in closed] == ["t1"]
        assert closed[0].closed_by == "root"
        assert len(closed[0].spans) == 4

    def test_out_of_order_children_kept(self) -> None:
        """Children that arrive before their root still land in the same trace."""
        assembler = TraceAssembler(root_grace_us=0, timeout_us=60 * S)
        spans = request("t1", 0)
        for item in reversed(spans):
            assert assembler.add(item) == []
        (trace,) = assembler.advance(5 * S)
        assert {s.span_id for s in trace.spans} == {"r", "a", "b", "c"}

    def test_timeout_without_root(self) -> None:
        """A trace whose root never comes closes after the inactivity timeout and is counted."""
        assembler = TraceAssembler(timeout_us=10 * S)
        assembler.add(span("t1", "a", "missing", start=0))
        closed = assembler.add(span("t2", "x", "missing", start=10 * S))
        assert [(t.trace_id, t.closed_by) for t in closed] == [("t1", "timeout")]
        assert assembler.counters.timed_out_traces == 1
        assert assembler.open_traces == 1

    def test_overflow_evicts_oldest_and_counts(self) -> None:
        """Past max_open_traces the least recently updated trace closes as evicted."""
        assembler = TraceAssembler(max_open_traces=2, timeout_us=60 * S)
        assembler.add(span("t1", "a", "p", start=0))
        assembler.add(span("t2", "a", "p", start=1))
        assembler.add(span("t1", "b", "p", start=2))
        closed = assembler.add(span("t3", "a", "p", start=3))
        assert [(t.trace_id, t.closed_by) for t in closed] == [("t2", "evicted")]
        assert assembler.counters.evicted_traces == 1
        assert assembler.open_traces == 2

    def test_late_span_dropped_and_counted(self) -> None:
        """A span of a trace that already closed is counted as late and opens nothing."""
        assembler = TraceAssembler(root_grace_us=0)
        assembler.add(span("t1", "r", start=0, duration=10))
        assembler.advance(10)
        assert assembler.add(span("t1", "late", "r", start=5)) == []
        assert assembler.counters.late_spans == 1
        assert assembler.open_traces == 0

    def test_span_limit_per_trace(self) -> None:
        """Spans beyond max_spans_per_trace are dropped and counted."""
        assembler = TraceAssembler(max_spans_per_trace=2)
        for i in range(4):
            assembler.add(span("t1", f"s{i}", "p", start=i))
        (trace,) = assembler.flush()
        assert len(trace.spans) == 2
        assert assembler.counters.dropped_spans == 2

    def test_duplicate_span_counted(self) -> None:
        """A redelivered span is dropped and counted, not stored twice."""
        assembler = TraceAssembler()
        assembler.add(span("t1", "a", "p"))
        assembler.add(span("t1", "a", "p"))
        (trace,) = assembler.flush()
        assert len(trace.spans) == 1
        assert assembler.counters.duplicate_spans == 1

    def test_restart_from_state(self) -> None:
        """A restored assembler closes the same traces as one that never stopped."""
        spans = sorted(
            (s for i in range(6) for s in request(f"t{i}", i * 2 * S)),
            key=lambda item: item.start_us,
        )
        reference = TraceAssembler(root_grace_us=S, timeout_us=20 * S)
        expected = [t for item in spans for t in reference.add(item)] + reference.flush()

        first = TraceAssembler(root_grace_us=S, timeout_us=20 * S)
        got = [t for item in spans[:10] for t in first.add(item)]
        state = msgpack.unpackb(msgpack.packb(first.state()))
        second = TraceAssembler(root_grace_us=S, timeout_us=20 * S)
        second.load_state(state)
        assert second.open_traces == first.open_traces > 0
        got += [t for item in spans[8:] for t in second.add(item)] + second.flush()

        assert [(t.trace_id, t.closed_by, len(t.spans)) for t in got] == [
            (t.trace_id, t.closed_by, len(t.spans)) for t in expected
        ]
        assert second.counters.duplicate_spans + second.counters.late_spans == 2

    def test_rejects_bad_parameters(self) -> None:
        """A non-positive timeout raises ValueError naming the value."""
        with pytest.raises(ValueError, match="timeout_us > 0"):
            TraceAssembler(timeout_us=0)


def test_tree_shape_counts_depth_fan_out_and_orphans() -> None:
    """Depth, fan-out and spans with an absent parent are measured on the span tree."""
    shape = tree_shape([*request("t", 0), span("t", "o", "gone")])
    assert shape.depth == 3
    assert shape.max_fan_out == 2
    assert shape.missing_parents == 1


def test_tree_shape_survives_cycle() -> None:
    """Spans that name each other as parents do not loop forever."""
    shape = tree_shape([span("t", "a", "b"), span("t", "b", "a")])
    assert shape.depth == 0


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("", False),
        ("OK", False),
        ("200", False),
        ("404", True),
        ("500", True),
        ("ERROR", True),
        ("failed", True),
    ],
)
def test_error_status(status: str, error: bool) -> None:
    """Codes >= 400 and error words count as errors; empty and OK do not."""
    assert is_error_status(status) is error


def test_baseline_scores_against_past_only() -> None:
    """z is 0 until min_count spans, then a slow span of the same operation scores high."""
    baseline = OperationBaseline(min_count=5)
    for duration in (100, 110, 90, 105, 95):
        assert baseline.z_score(span("t", "s", duration=duration)) == 0.0
        baseline.learn(span("t", "s", duration=duration))
    assert baseline.z_score(span("t", "s", duration=10_000)) > 10
    assert baseline.z_score(span("t", "s", duration=100, operation="other")) == 0.0


def test_baseline_state_roundtrip() -> None:
    """A baseline restored from its state scores like the original."""
    baseline = OperationBaseline(min_count=2)
    for duration in (100, 120, 90):
        baseline.learn(span("t", "s", duration=duration))
    restored = OperationBaseline(min_count=2)
    restored.load_state(msgpack.unpackb(msgpack.packb(baseline.state())))
    probe = span("t", "s", duration=500)
    assert restored.z_score(probe) == baseline.z_score(probe)


def test_baseline_key_overflow_counted() -> None:
    """Spans of keys beyond max_keys are counted, not silently dropped."""
    baseline = OperationBaseline(max_keys=1)
    baseline.learn(span("t", "s", operation="a"))
    baseline.learn(span("t", "s", operation="b"))
    assert baseline.overflow_spans == 1


class TestTraceFeaturizer:
    def test_vector_layout(self) -> None:
        """The vector contains the named scalars, then the hashed edge counts."""
        featurizer = TraceFeaturizer(n_edge_buckets=8)
        trace = Trace("t1", request("t1", 0), root=request("t1", 0)[0])
        features = featurizer.featurize(trace)
        values = dict(zip(TRACE_SCALARS, features.vector, strict=False))
        assert features.vector.shape == (featurizer.n_features,)
        assert len(featurizer.feature_names()) == featurizer.n_features
        assert values["log_latency_us"] == pytest.approx(np.log1p(5 * S))
        assert values["depth"] == 3
        assert values["max_fan_out"] == 2
        assert values["services"] == 4
        assert values["has_root"] == 1
        assert np.expm1(features.vector[len(TRACE_SCALARS) :]).sum() == pytest.approx(3)
        assert features.services == ("db", "gateway", "orders", "users")

    def test_span_rows_in_start_order(self) -> None:
        """Span rows follow start order, flag the root and one-hot the service."""
        featurizer = TraceFeaturizer(n_service_buckets=8)
        spans = list(reversed(request("t1", 0)))
        rows = featurizer.featurize(Trace("t1", spans, root=spans[-1])).span_rows
        assert rows.shape == (4, featurizer.n_span_features)
        assert rows[:, 3].tolist() == [1, 0, 0, 0]
        assert rows[0, 0] == pytest.approx(np.log1p(5 * S))
        assert (rows[:, 4:].sum(axis=1) == 1).all()

    def test_slow_service_named(self) -> None:
        """After normal traces, a trace with one slow service names it as the top service."""
        featurizer = TraceFeaturizer()
        for i in range(10):
            spans = request(f"t{i}", i * 10 * S)
            featurizer.featurize(Trace(f"t{i}", spans, root=spans[0]))
        slow = request("slow", 200 * S)
        slow[3] = span("slow", "c", "a", start=200 * S + 3, duration=50 * S, service="db")
        features = featurizer.featurize(Trace("slow", slow, root=slow[0]))
        assert features.top_service == "db"
        assert features.service_z["db"] > 3
        assert features.vector[TRACE_SCALARS.index("share_latency_z_over_3")] == pytest.approx(0.25)

    def test_empty_trace_rejected(self) -> None:
        """A trace with no spans raises ValueError naming the trace."""
        with pytest.raises(ValueError, match="'t0'"):
            TraceFeaturizer().featurize(Trace("t0"))
