"""Trace assembly from out-of-order spans, and fixed-width features per trace.

Time here is event time in microseconds: the assembler's clock (the watermark) is the latest
span start it has received, or a later time given to ``advance``. Replay sends spans in start
order, so the watermark follows the replay clock, and the assembler behaves the same at any
replay speed.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import asdict, astuple, dataclass, field
from typing import Any, Literal

import numpy as np

from fanomad_stream.featurize.logs import template_bucket

CloseReason = Literal["root", "timeout", "evicted", "flush"]


@dataclass(frozen=True)
class Span:
    """One span. ``parent_id`` is empty for a root span; ``status`` and ``pod`` may be empty."""

    trace_id: str
    span_id: str
    parent_id: str
    service: str
    operation: str
    start_us: int
    duration_us: int
    status: str = ""
    pod: str = ""

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us

    def to_body(self) -> dict[str, Any]:
        """Return the body of a ``span`` record (the codec checks it on decode)."""
        return asdict(self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Span:
        """Rebuild a span from a decoded ``span`` body; absent optional fields become empty."""
        return cls(
            trace_id=body["trace_id"],
            span_id=body["span_id"],
            parent_id=body["parent_id"],
            service=body["service"],
            operation=body["operation"],
            start_us=body["start_us"],
            duration_us=body["duration_us"],
            status=body.get("status") or "",
            pod=body.get("pod") or "",
        )


@dataclass
class Trace:
    """The spans of one trace in arrival order, and why the assembler closed it."""

    trace_id: str
    spans: list[Span] = field(default_factory=list)
    closed_by: CloseReason = "flush"
    root: Span | None = None
    last_update_us: int = 0
    span_ids: set[str] = field(default_factory=set)


@dataclass
class AssemblerCounters:
    """Counts of traces the assembler cut short and spans it dropped, so no loss is silent."""

    evicted_traces: int = 0
    timed_out_traces: int = 0
    late_spans: int = 0
    dropped_spans: int = 0
    duplicate_spans: int = 0
    duplicate_roots: int = 0


class TraceAssembler:
    """Group spans into traces; memory is bounded by ``max_open_traces``.

    A trace closes when the watermark passes its root span's end by ``root_grace_us`` (the
    root completed and its children had time to arrive), or when it received no span for
    ``timeout_us``. When a span opens a trace while ``max_open_traces`` are open, the trace
    updated least recently is closed early as ``evicted``. A span for a trace closed in the
    last ``closed_memory`` closings is late: it is dropped and counted, never reopened. A span
    id that a trace already holds (a redelivery after a consumer restart) is dropped and
    counted as a duplicate. ``state`` and ``load_state`` carry the open traces across a restart.

    Parameters
    ----------
    timeout_us
        Inactivity, in microseconds of event time, after which an open trace closes. > 0.
    root_grace_us
        Event time to wait after the root span's end for late children. >= 0.
    max_open_traces
        Upper bound on open traces kept in memory. >= 1.
    max_spans_per_trace
        Spans kept per trace; later ones are dropped and counted. >= 1.
    closed_memory
        How many closed trace ids are remembered to recognise late spans. >= 0.
    """

    def __init__(
        self,
        *,
        timeout_us: int = 30_000_000,
        root_grace_us: int = 2_000_000,
        max_open_traces: int = 10_000,
        max_spans_per_trace: int = 2_000,
        closed_memory: int = 100_000,
    ) -> None:
        if timeout_us <= 0 or root_grace_us < 0 or max_open_traces < 1 or max_spans_per_trace < 1:
            msg = (
                "need timeout_us > 0, root_grace_us >= 0, max_open_traces >= 1 and "
                f"max_spans_per_trace >= 1, got {timeout_us!r}, {root_grace_us!r}, "
                f"{max_open_traces!r}, {max_spans_per_trace!r}"
            )
            raise ValueError(msg)
        if closed_memory < 0:
            msg = f"closed_memory must be >= 0, got {closed_memory!r}"
            raise ValueError(msg)
        self.timeout_us = timeout_us
        self.root_grace_us = root_grace_us
        self.max_open_traces = max_open_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.closed_memory = closed_memory
        self.counters = AssemblerCounters()
        self.watermark_us = 0
        # Ordered by last update, oldest first, so timeouts and evictions pop from the front.
        self._open: OrderedDict[str, Trace] = OrderedDict()
        self._root_deadlines: list[tuple[int, str]] = []
        self._closed: OrderedDict[str, None] = OrderedDict()

    @property
    def open_traces(self) -> int:
        return len(self._open)

    def add(self, span: Span) -> list[Trace]:
        """Add one span and return the traces that closed, in closing order."""
        closed = self._due(max(self.watermark_us, span.start_us))
        if span.trace_id in self._closed:
            self.counters.late_spans += 1
            return closed
        trace = self._open.get(span.trace_id)
        if trace is None:
            if len(self._open) >= self.max_open_traces:
                closed.append(self._close(next(iter(self._open)), "evicted"))
            trace = self._open[span.trace_id] = Trace(span.trace_id)
        self._append(trace, span)
        return closed + self._due(self.watermark_us)

    def advance(self, now_us: int) -> list[Trace]:
        """Move the clock to ``now_us`` (when no span arrives) and return the traces that closed."""
        return self._due(max(self.watermark_us, now_us))

    def flush(self) -> list[Trace]:
        """Close every open trace, oldest first (at shutdown or the end of a replay)."""
        return [self._close(trace_id, "flush") for trace_id in list(self._open)]

    def _append(self, trace: Trace, span: Span) -> None:
        if span.span_id in trace.span_ids:
            self.counters.duplicate_spans += 1
            return
        if len(trace.spans) >= self.max_spans_per_trace:
            self.counters.dropped_spans += 1
            return
        trace.spans.append(span)
        trace.span_ids.add(span.span_id)
        trace.last_update_us = self.watermark_us
        self._open.move_to_end(trace.trace_id)
        if span.parent_id:
            return
        if trace.root is not None:
            self.counters.duplicate_roots += 1
            return
        trace.root = span
        heapq.heappush(self._root_deadlines, (span.end_us + self.root_grace_us, trace.trace_id))

    def state(self) -> dict[str, Any]:
        """Return the open traces, clock, counters and closed ids as plain msgpack-able values."""
        return {
            "watermark_us": self.watermark_us,
            "counters": asdict(self.counters),
            "open": [
                {
                    "trace_id": t.trace_id,
                    "last_update_us": t.last_update_us,
                    "spans": [list(astuple(s)) for s in t.spans],
                }
                for t in self._open.values()
            ],
            "closed": list(self._closed),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace this assembler's state with one from ``state``; the settings stay as built."""
        self.watermark_us = int(state["watermark_us"])
        self.counters = AssemblerCounters(**state["counters"])
        self._open.clear()
        self._root_deadlines.clear()
        for item in state["open"]:
            trace = self._open[item["trace_id"]] = Trace(item["trace_id"])
            for fields in item["spans"]:
                self._append(trace, Span(*fields))
            trace.last_update_us = int(item["last_update_us"])
        self._closed = OrderedDict.fromkeys(state["closed"])
        while len(self._closed) > self.closed_memory:
            self._closed.popitem(last=False)

    def _due(self, now_us: int) -> list[Trace]:
        self.watermark_us = now_us
        closed = []
        while self._root_deadlines and self._root_deadlines[0][0] <= now_us:
            _, trace_id = heapq.heappop(self._root_deadlines)
            if trace_id in self._open:
                closed.append(self._close(trace_id, "root"))
        while self._open:
            oldest = next(iter(self._open.values()))
            if now_us - oldest.last_update_us < self.timeout_us:
                break
            closed.append(self._close(oldest.trace_id, "timeout"))
        return closed

    def _close(self, trace_id: str, reason: CloseReason) -> Trace:
        trace = self._open.pop(trace_id)
        trace.closed_by = reason
        if reason == "evicted":
            self.counters.evicted_traces += 1
        elif reason == "timeout":
            self.counters.timed_out_traces += 1
        if self.closed_memory:
            self._closed[trace_id] = None
            if len(self._closed) > self.closed_memory:
                self._closed.popitem(last=False)
        return trace


def is_error_status(status: str) -> bool:
    """Return True for an error status: a code >= 400, or a word such as ERROR or FAILED."""
    text = status.strip().upper()
    if not text:
        return False
    if text.isdigit():
        return int(text) >= 400
    return text.startswith(("ERR", "FAIL", "EXCEPTION", "ABORT", "TIMEOUT"))


class OperationBaseline:
    """Streaming mean and variance of log1p(span duration) per (service, operation).

    Welford's update per key. ``max_keys`` bounds memory: spans of keys beyond it get no
    baseline (z = 0) and are counted in ``overflow_spans``. ``std_floor`` (in log1p
    microseconds) stops an operation whose durations never varied from turning any change
    into a huge z-score.
    """

    def __init__(
        self, *, max_keys: int = 10_000, min_count: int = 5, std_floor: float = 0.05
    ) -> None:
        if max_keys < 1 or min_count < 2 or std_floor <= 0:
            msg = (
                "need max_keys >= 1, min_count >= 2 and std_floor > 0, got "
                f"{max_keys!r}, {min_count!r}, {std_floor!r}"
            )
            raise ValueError(msg)
        self.max_keys = max_keys
        self.min_count = min_count
        self.std_floor = std_floor
        self.overflow_spans = 0
        self._stats: dict[tuple[str, str], list[float]] = {}

    def z_score(self, span: Span) -> float:
        """Return the span's z-score against the past of its key; 0 before ``min_count`` spans."""
        stats = self._stats.get((span.service, span.operation))
        if stats is None or stats[0] < self.min_count:
            return 0.0
        count, mean, m2 = stats
        std = max(math.sqrt(m2 / (count - 1)), self.std_floor)
        return (math.log1p(span.duration_us) - mean) / std

    def state(self) -> list[list[Any]]:
        """Return ``[service, operation, count, mean, m2]`` per key, as plain values."""
        return [[service, operation, *stats] for (service, operation), stats in self._stats.items()]

    def load_state(self, state: list[list[Any]]) -> None:
        self._stats = {(str(row[0]), str(row[1])): [float(v) for v in row[2:5]] for row in state}

    def learn(self, span: Span) -> None:
        key = (span.service, span.operation)
        stats = self._stats.get(key)
        if stats is None:
            if len(self._stats) >= self.max_keys:
                self.overflow_spans += 1
                return
            stats = self._stats[key] = [0.0, 0.0, 0.0]
        value = math.log1p(span.duration_us)
        stats[0] += 1
        delta = value - stats[1]
        stats[1] += delta / stats[0]
        stats[2] += delta * (value - stats[1])


@dataclass(frozen=True)
class TraceFeatures:
    """Feature vector of one trace, its span rows, and the service whose spans deviated most.

    ``span_rows`` has one row per span in start order (for the sequence models):
    log1p(duration in µs), latency z-score, error flag, root flag, then the service one-hot
    over ``n_service_buckets`` hashed buckets.
    """

    trace_id: str
    start_us: int
    end_us: int
    vector: np.ndarray
    services: tuple[str, ...]
    top_service: str
    service_z: dict[str, float]
    span_rows: np.ndarray


TRACE_SCALARS = (
    "log_latency_us",
    "log_spans",
    "depth",
    "max_fan_out",
    "services",
    "error_spans",
    "missing_parents",
    "has_root",
    "max_latency_z",
    "mean_latency_z",
    "share_latency_z_over_3",
)


class TraceFeaturizer:
    """Turn closed traces into fixed-width vectors: scalars, then hashed call-edge counts.

    Each span is scored against its operation's baseline before the baseline learns it, so a
    trace's features depend only on earlier traces and on itself.
    """

    def __init__(
        self,
        *,
        n_edge_buckets: int = 32,
        n_service_buckets: int = 16,
        baseline: OperationBaseline | None = None,
    ) -> None:
        if n_edge_buckets < 1 or n_service_buckets < 1:
            msg = (
                "n_edge_buckets and n_service_buckets must be >= 1, got "
                f"{n_edge_buckets!r}, {n_service_buckets!r}"
            )
            raise ValueError(msg)
        self.n_edge_buckets = n_edge_buckets
        self.n_service_buckets = n_service_buckets
        self.baseline = baseline if baseline is not None else OperationBaseline()

    @property
    def n_features(self) -> int:
        return len(TRACE_SCALARS) + self.n_edge_buckets

    @property
    def n_span_features(self) -> int:
        return 4 + self.n_service_buckets

    def feature_names(self) -> list[str]:
        return [*TRACE_SCALARS, *(f"edge_bucket_{i}" for i in range(self.n_edge_buckets))]

    def featurize(self, trace: Trace) -> TraceFeatures:
        """Return the features of ``trace`` and then fold its spans into the baseline."""
        spans = trace.spans
        if not spans:
            msg = (
                f"trace {trace.trace_id!r} has no spans; the assembler never closes an empty trace"
            )
            raise ValueError(msg)
        z = np.array([self.baseline.z_score(span) for span in spans])
        for span in spans:
            self.baseline.learn(span)

        shape = tree_shape(spans)
        start = min(span.start_us for span in spans)
        end = trace.root.end_us if trace.root is not None else max(span.end_us for span in spans)
        service_z = _service_z(spans, z)
        scalars = [
            math.log1p(max(end - start, 0)),
            math.log1p(len(spans)),
            shape.depth,
            shape.max_fan_out,
            len(service_z),
            sum(is_error_status(span.status) for span in spans),
            shape.missing_parents,
            float(trace.root is not None),
            float(z.max()),
            float(z.mean()),
            float((z > 3.0).mean()),
        ]

        vector = np.concatenate([scalars, self._edge_counts(spans)]).astype(np.float32)
        top = max(service_z, key=lambda service: service_z[service])
        rows = self._span_rows(spans, z)
        return TraceFeatures(
            trace.trace_id, start, end, vector, tuple(sorted(service_z)), top, service_z, rows
        )

    def _span_rows(self, spans: list[Span], z: np.ndarray) -> np.ndarray:
        order = np.argsort([span.start_us for span in spans], kind="stable")
        rows = np.zeros((len(spans), self.n_span_features), dtype=np.float32)
        for row, i in enumerate(order):
            span = spans[i]
            rows[row, 0] = math.log1p(span.duration_us)
            rows[row, 1] = z[i]
            rows[row, 2] = is_error_status(span.status)
            rows[row, 3] = not span.parent_id
            rows[row, 4 + template_bucket(span.service, self.n_service_buckets)] = 1.0
        return rows

    def _edge_counts(self, spans: list[Span]) -> np.ndarray:
        by_id = {span.span_id: span for span in spans}
        counts = np.zeros(self.n_edge_buckets)
        for span in spans:
            parent = by_id.get(span.parent_id)
            if parent is not None:
                edge = f"{parent.service}>{span.service}:{span.operation}"
                counts[template_bucket(edge, self.n_edge_buckets)] += 1
        return np.log1p(counts)


def _service_z(spans: list[Span], z: np.ndarray) -> dict[str, float]:
    result: dict[str, float] = {}
    for span, value in zip(spans, z, strict=True):
        result[span.service] = max(result.get(span.service, -math.inf), float(value))
    return result


@dataclass(frozen=True)
class TreeShape:
    """Depth (a lone root has depth 1), widest fan-out, and spans whose parent is absent."""

    depth: int
    max_fan_out: int
    missing_parents: int


def tree_shape(spans: list[Span]) -> TreeShape:
    """Measure the span tree; spans whose parent never arrived start their own subtree."""
    ids = {span.span_id for span in spans}
    children: dict[str, list[str]] = {}
    tops = []
    missing = 0
    for span in spans:
        if span.parent_id and span.parent_id in ids:
            children.setdefault(span.parent_id, []).append(span.span_id)
            continue
        tops.append(span.span_id)
        missing += bool(span.parent_id)
    depth = 0
    stack = [(top, 1) for top in tops]
    seen: set[str] = set()
    while stack:
        span_id, level = stack.pop()
        if span_id in seen:  # a cycle in malformed input must not loop forever
            continue
        seen.add(span_id)
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children.get(span_id, []))
    fan_out = max((len(kids) for kids in children.values()), default=0)
    return TreeShape(depth, fan_out, missing)
