"""Fixed-width features per closed trace, against a streaming per-operation baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fanomad_stream.featurize.logs import template_bucket
from fanomad_stream.featurize.trace_assembly import Span, Trace


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
