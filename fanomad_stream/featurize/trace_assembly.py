"""Trace assembly from out-of-order, late and duplicate spans, with bounded memory.

Time here is event time in microseconds: the assembler's clock (the watermark) is the latest
span start it has received, or a later time given to ``advance``. Replay sends spans in start
order, so the watermark follows the replay clock, and the assembler behaves the same at any
replay speed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import asdict, astuple, dataclass, field
from typing import Any, Literal

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
    id that a trace already contains (a redelivery after a consumer restart) is dropped and
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
