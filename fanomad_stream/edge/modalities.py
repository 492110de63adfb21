"""Scoring pipelines of the logs and traces modalities, free of Kafka like ``EdgePipeline``.

A pipeline takes decoded records of one poll in arrival order and returns one ``Scored``
item per scored unit: a log line (sequence models) or a closed per-source window (MLP) for
logs, a closed trace for traces. It keeps the site's training data, and ``train_window``
trains the shared detector on it and returns the weight delta for the federation, the same
contract as ``EdgePipeline.train_window``. ``training_records`` returns the same data as one
array of equal-shaped records, the input of DP-SGD. ``snapshot`` and ``restore`` carry the
whole scoring and training state across a restart (see ``edge.checkpoint``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fanomad_stream.config import AppConfig
from fanomad_stream.detect.autoencoder import AutoencoderDetector, Weights
from fanomad_stream.detect.factory import ModelDetector, Threshold, build_detector, build_threshold
from fanomad_stream.detect.hst import HalfSpaceTreesDetector
from fanomad_stream.detect.scaling import StreamingScaler
from fanomad_stream.detect.sequence import (
    SequenceAutoencoderDetector,
    StreamContext,
    training_windows,
)
from fanomad_stream.featurize.logs import (
    LogFeaturizer,
    LogWindower,
    LogWindowFeatures,
    MinedLine,
    line_vectors,
)
from fanomad_stream.featurize.trace_assembly import (
    AssemblerCounters,
    Span,
    Trace,
    TraceAssembler,
)
from fanomad_stream.featurize.traces import OperationBaseline, TraceFeaturizer
from fanomad_stream.replay.logs import LogRecord

T = TypeVar("T")


@dataclass(frozen=True)
class Incoming:
    """One decoded record with its stream index and where it was read from."""

    item: LogRecord | Span
    index: int
    partition: int
    offset: int


@dataclass(frozen=True)
class Scored:
    """One score to publish: ``key`` is the Kafka key (source or trace id)."""

    key: str
    index: int
    ts: float
    score: float
    threshold: float
    alert: bool
    partition: int
    offset: int
    service: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class _Scoring:
    """The detector, per-key thresholds and training buffer every modality pipeline shares."""

    def __init__(self, config: AppConfig) -> None:
        self.edge = config.edge
        self.detector: ModelDetector = build_detector(config.model)
        self.thresholds: dict[str, Threshold] = {}
        self.events_since_training = 0

    @property
    def sequence(self) -> SequenceAutoencoderDetector | None:
        return self.detector if isinstance(self.detector, SequenceAutoencoderDetector) else None

    def threshold(self, key: str, scores: np.ndarray) -> np.ndarray:
        state = self.thresholds.get(key)
        if state is None:
            state = build_threshold(self.edge.threshold)
            self.thresholds[key] = state
        return state.thresholds_for(scores)

    def window_ready(self) -> bool:
        return self.events_since_training >= self.edge.window_events

    def _equal_windows(self, streams: list[np.ndarray]) -> np.ndarray:
        """Cut streams into the sequence model's windows; keep the largest equal-length group.

        DP-SGD samples records of one shape. Streams shorter than the window give shorter
        windows, which are left out unless their length is the most common one.
        """
        assert self.sequence is not None
        groups = training_windows(
            streams, self.sequence.window, self.sequence.train_stride, prefixes=False
        )
        if not groups:
            msg = "the training window is empty; call training_records only when window_ready()"
            raise ValueError(msg)
        return max(groups, key=lambda group: (group.shape[0], group.shape[1]))

    def _scoring_snapshot(self) -> dict[str, Any]:
        # The detector carries its weights and the generator that shuffles training batches.
        return {
            "detector": self.detector,
            "thresholds": self.thresholds,
            "events_since_training": self.events_since_training,
        }

    def _checked_scoring(self, state: Mapping[str, Any]) -> _ScoringState:
        return _ScoringState(
            detector=_state_item(state, "detector", type(self.detector)),
            thresholds=_state_item(state, "thresholds", dict),
            events_since_training=int(state["events_since_training"]),
        )

    def _apply_scoring(self, scoring: _ScoringState) -> None:
        self.detector = scoring.detector
        self.thresholds = scoring.thresholds
        self.events_since_training = scoring.events_since_training


@dataclass
class _ScoringState:
    """The part of a snapshot that ``_Scoring`` owns, checked and not yet applied."""

    detector: ModelDetector
    thresholds: dict[str, Threshold]
    events_since_training: int


def _state_item(state: Mapping[str, Any], key: str, expected: type[T]) -> T:
    """Return ``state[key]``; raise TypeError when it is not an ``expected``."""
    value = state[key]
    if not isinstance(value, expected):
        msg = f"saved state {key!r} is a {type(value).__name__}, expected {expected.__name__}"
        raise TypeError(msg)
    return value


class LogsPipeline(_Scoring):
    """Mine, featurize and score log records of one site.

    drain3 keeps its state in ``state_path``, so a restarted client keeps its template ids.
    A sequence model scores every line by the last step of the window of its source's
    recent line rows. Alerts wait until the source has ``window`` lines, because shorter
    warm-up windows score high (see ``SequenceAutoencoderDetector``). The MLP scores each closed window of a source, with
    the features standardized by that source's streaming scaler.

    Per-source state is kept for at most ``logs.max_sources`` sources: the sequence model's
    stream contexts, and the MLP's open windows, scalers, thresholds and window counts. The
    least recently seen source is dropped past that and counted in ``sources_dropped``, and
    its open window is scored early (``windows_evicted``).
    """

    modality = "logs"

    def __init__(self, config: AppConfig, state_path: Path | None) -> None:
        super().__init__(config)
        logs = config.logs
        self.featurizer = LogFeaturizer(
            state_path,
            n_buckets=logs.n_buckets,
            window_s=logs.window_s,
            max_lines=logs.max_lines,
            end_event=logs.session_end_event,
            max_open=logs.max_sources,
        )
        # Session windows (one per HDFS block) share one scaler and threshold per site, and a
        # window's score takes the index of its last line, the end line of a whole session.
        self.sessions = logs.session_end_event is not None
        # Per-source windows of recent lines, least recently seen first; at most max_sources.
        self.contexts: OrderedDict[str, StreamContext] = OrderedDict()
        self.max_sources = logs.max_sources
        self.sources_dropped = 0
        # Least recently scored source first; the order picks the source to drop.
        self.scalers: OrderedDict[str, StreamingScaler] = OrderedDict()
        # HalfSpaceTrees, the online baseline in each score's ``detail``: on the line row for
        # a sequence model, on the standardized window vector for the MLP. A line row contains
        # 0 or 1, so z_range 1 maps it to 0.5 or 1.0 of HST's [0, 1] range.
        self.hst = HalfSpaceTreesDetector(
            logs.n_buckets + 2 if self.sequence is not None else self.featurizer.n_features,
            n_trees=self.edge.hst_trees,
            height=self.edge.hst_height,
            window_size=self.edge.hst_window,
            z_range=1.0 if self.sequence is not None else 4.0,
            seed=config.model.seed,
        )
        self.windows_scored: dict[str, int] = {}
        self.training: deque[tuple[str, np.ndarray]] = deque(maxlen=self.edge.window_events)

    @property
    def windows_evicted(self) -> int:
        """Windows closed early because ``max_sources`` windows were open."""
        return self.featurizer.windower.evicted

    def process(self, batch: list[Incoming]) -> list[Scored]:
        """Score one poll's records in arrival order."""
        if self.sequence is not None:
            # Lines are scored one by one, so they are mined but not windowed.
            mined = []
            for incoming in batch:
                assert isinstance(incoming.item, LogRecord)
                mined.append((incoming, self.featurizer.miner.mine(incoming.item)))
            return self._score_lines(self.sequence, mined)
        closed: list[LogWindowFeatures] = []
        for incoming in batch:
            assert isinstance(incoming.item, LogRecord)
            _, windows = self.featurizer.add(incoming.item, ref=incoming)
            closed += windows
        return self._score_windows(closed)

    def flush(self) -> list[Scored]:
        """Close the open windows (MLP) and save the drain3 state."""
        windows = self.featurizer.flush()
        if self.sequence is not None:
            return []
        return self._score_windows(windows)

    def _score_lines(
        self, detector: SequenceAutoencoderDetector, mined: list[tuple[Incoming, MinedLine]]
    ) -> list[Scored]:
        by_source: dict[str, list[tuple[Incoming, MinedLine]]] = {}
        for incoming, line in mined:
            by_source.setdefault(line.record.source, []).append((incoming, line))
        scored = []
        for source, items in by_source.items():
            context = self._context(detector, source)
            seen_before = context.seen
            rows = self._line_rows([line for _, line in items])
            scores = detector.score_rows(rows, context)
            hst = self.hst.score_and_learn(rows)
            # One threshold for the site: line scores of one shared model are comparable
            # across sources, and most sources write too few lines for a threshold of their own.
            thresholds = self.threshold("site", scores)
            for i, ((incoming, line), score) in enumerate(zip(items, scores, strict=True)):
                warm = detector.train_prefixes or seen_before + i + 1 >= detector.window
                scored.append(
                    Scored(
                        key=source,
                        index=incoming.index,
                        ts=line.record.ts,
                        score=float(score),
                        threshold=float(thresholds[i]),
                        alert=bool(warm and score > thresholds[i]),
                        partition=incoming.partition,
                        offset=incoming.offset,
                        detail={
                            "template": line.cluster_id,
                            "new_template": line.is_new,
                            "hst": float(hst[i]),
                        },
                    )
                )
            self.training.extend((source, row) for row in rows)
            self.events_since_training += len(items)
        return scored

    def _context(self, detector: SequenceAutoencoderDetector, source: str) -> StreamContext:
        context = self.contexts.get(source)
        if context is not None:
            self.contexts.move_to_end(source)
            return context
        if len(self.contexts) >= self.max_sources:
            self.contexts.popitem(last=False)
            self.sources_dropped += 1
        context = self.contexts[source] = detector.new_context()
        return context

    def _line_rows(self, lines: list[MinedLine]) -> np.ndarray:
        return line_vectors(lines, self.featurizer.n_buckets)

    def _scaler(self, group: str) -> StreamingScaler:
        """Return the scaler of ``group``; past ``max_sources``, drop the least recent group."""
        scaler = self.scalers.get(group)
        if scaler is not None:
            self.scalers.move_to_end(group)
            return scaler
        if len(self.scalers) >= self.max_sources:
            oldest, _ = self.scalers.popitem(last=False)
            self.thresholds.pop(oldest, None)
            self.windows_scored.pop(oldest, None)
            self.sources_dropped += 1
        scaler = self.scalers[group] = StreamingScaler(
            self.featurizer.n_features, self.edge.scale_floor
        )
        return scaler

    def _score_windows(self, closed: list[LogWindowFeatures]) -> list[Scored]:
        assert isinstance(self.detector, AutoencoderDetector)
        scored = []
        for window in closed:
            last = window.ref  # the window's last line: its index, partition and offset
            assert isinstance(last, Incoming)
            group = "site" if self.sessions else window.source
            scaler = self._scaler(group)
            z = scaler.transform(window.vector[None, :])
            score = self.detector.score_batch(z)
            hst = float(self.hst.score_and_learn(z)[0])
            threshold = self.threshold(group, score)
            scaler.learn(window.vector[None, :])
            number = last.index
            if not self.sessions:  # sessions are many and close once: count no windows
                number = self.windows_scored.get(window.source, 0)
                self.windows_scored[window.source] = number + 1
            scored.append(
                Scored(
                    key=window.source,
                    index=number,
                    ts=window.start,
                    score=float(score[0]),
                    threshold=float(threshold[0]),
                    alert=bool(score[0] > threshold[0]),
                    partition=last.partition,
                    offset=last.offset,
                    detail={"window_start": window.start, "lines": window.lines, "hst": hst},
                )
            )
            self.training.append((window.source, z[0]))
            self.events_since_training += 1
        return scored

    def _source_streams(self) -> list[np.ndarray]:
        by_source: dict[str, list[np.ndarray]] = {}
        for source, row in self.training:
            by_source.setdefault(source, []).append(row)
        return [np.stack(rows) for rows in by_source.values()]

    def training_records(self) -> np.ndarray:
        """Return the buffered rows (MLP) or their windows per source (sequence models)."""
        streams = self._source_streams()
        if self.sequence is not None:
            return self._equal_windows(streams)
        return np.concatenate(streams)

    def train_window(self) -> tuple[Weights, int]:
        """Train on the buffered rows (per source for sequence models); return (delta, n)."""
        streams = self._source_streams()
        self.events_since_training = 0
        if self.sequence is not None:
            delta = self.sequence.train(streams)
            return delta, self.sequence.last_n_windows
        assert isinstance(self.detector, AutoencoderDetector)
        data = np.concatenate(streams)
        return self.detector.train(data), int(data.shape[0])

    def snapshot(self) -> dict[str, Any]:
        """Return references to every piece of state that scoring and training change.

        This covers the detector, thresholds, drain3 templates and event ids, open windows,
        stream contexts, scalers, HalfSpaceTrees and the training buffer. The pieces are not
        copied, so pickle them before the next ``process``, ``flush`` or training call.
        """
        return {
            **self._scoring_snapshot(),
            "templates": self.featurizer.miner.snapshot(),
            "windower": self.featurizer.windower,
            "contexts": self.contexts,
            "sources_dropped": self.sources_dropped,
            "scalers": self.scalers,
            "hst": self.hst,
            "windows_scored": self.windows_scored,
            "training": list(self.training),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the state with one that ``snapshot`` returned and a pickle kept.

        The caller checks that the state comes from the same settings (``state_fingerprint``)
        and saves the drain3 file afterwards (``featurizer.miner.save``). Raises KeyError,
        TypeError or ValueError on a state of another shape, and then changes nothing.
        """
        scoring = self._checked_scoring(state)
        templates = state["templates"]
        windower = _state_item(state, "windower", LogWindower)
        if getattr(windower, "max_open", None) != self.max_sources:
            msg = "saved windower has no bound of logs.max_sources on its open windows"
            raise TypeError(msg)
        contexts = _state_item(state, "contexts", type(self.contexts))
        sources_dropped = int(state["sources_dropped"])
        scalers = OrderedDict(_state_item(state, "scalers", dict))
        hst = _state_item(state, "hst", HalfSpaceTreesDetector)
        windows_scored = _state_item(state, "windows_scored", dict)
        training = deque(_state_item(state, "training", list), maxlen=self.edge.window_events)
        self.featurizer.miner.restore(templates)
        self._apply_scoring(scoring)
        self.featurizer.windower = windower
        self.contexts = contexts
        self.sources_dropped = sources_dropped
        self.scalers = scalers
        self.hst = hst
        self.windows_scored = windows_scored
        self.training = training


class TracesPipeline(_Scoring):
    """Assemble spans into traces, featurize each closed trace and score it.

    Each partition has its own assembler (see ``assembler``), so ``max_open_traces``
    bounds the open traces per partition. The MLP scores the trace's feature vector,
    standardized by one streaming scaler of the site. A sequence model scores the last
    ``window`` span rows of the trace, in start order, as one window. Each score names the service whose spans deviated most from
    their operation's latency baseline. Thresholds are per root service.
    """

    modality = "traces"

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        traces = config.traces
        self.settings = traces
        self.assemblers: dict[int, TraceAssembler] = {}
        self.featurizer = TraceFeaturizer(
            n_edge_buckets=traces.n_edge_buckets, n_service_buckets=traces.n_service_buckets
        )
        self.scaler = StreamingScaler(self.featurizer.n_features, self.edge.scale_floor)
        # HalfSpaceTrees on the standardized trace vector: the online baseline, in ``detail``.
        self.hst = HalfSpaceTreesDetector(
            self.featurizer.n_features,
            n_trees=self.edge.hst_trees,
            height=self.edge.hst_height,
            window_size=self.edge.hst_window,
            seed=config.model.seed,
        )
        self.training: deque[np.ndarray] = deque(maxlen=self.edge.window_events)
        self.traces_scored = 0
        # First span index and read position per open trace, for the score's index and ref.
        self._first: dict[str, Incoming] = {}

    def assembler(self, partition: int) -> TraceAssembler:
        """Return the assembler of one partition, creating it on first use.

        Spans are keyed by trace id, so a trace lives in one partition, and each partition
        is in start order. A clock per partition keeps one partition that is read ahead
        from closing the traces of another as late.
        """
        assembler = self.assemblers.get(partition)
        if assembler is None:
            traces = self.settings
            assembler = self.assemblers[partition] = TraceAssembler(
                timeout_us=int(traces.timeout_s * 1e6),
                root_grace_us=int(traces.root_grace_s * 1e6),
                max_open_traces=traces.max_open_traces,
                max_spans_per_trace=traces.max_spans_per_trace,
            )
        return assembler

    def counters(self) -> AssemblerCounters:
        """Return the counters of every partition's assembler, summed."""
        total = AssemblerCounters()
        for assembler in self.assemblers.values():
            for name, value in asdict(assembler.counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    @property
    def open_traces(self) -> int:
        return sum(assembler.open_traces for assembler in self.assemblers.values())

    def process(self, batch: list[Incoming]) -> list[Scored]:
        closed: list[Trace] = []
        for incoming in batch:
            span = incoming.item
            assert isinstance(span, Span)
            first = self._first.get(span.trace_id)
            if first is None or incoming.index < first.index:
                self._first[span.trace_id] = incoming
            assembler = self.assembler(incoming.partition)
            late_before = assembler.counters.late_spans
            closed += assembler.add(span)
            if assembler.counters.late_spans > late_before:
                # The trace closed earlier, so no score will ever take this entry.
                self._first.pop(span.trace_id, None)
        return [self._score(trace) for trace in closed]

    def advance(self, idle_us: int) -> list[Scored]:
        """Move every partition's clock ``idle_us`` forward while no span arrives."""
        closed: list[Trace] = []
        for assembler in self.assemblers.values():
            closed += assembler.advance(assembler.watermark_us + idle_us)
        return [self._score(trace) for trace in closed]

    def flush(self) -> list[Scored]:
        closed: list[Trace] = []
        for assembler in self.assemblers.values():
            closed += assembler.flush()
        return [self._score(trace) for trace in closed]

    def _score(self, trace: Trace) -> Scored:
        features = self.featurizer.featurize(trace)
        z = self.scaler.transform(features.vector[None, :])
        self.scaler.learn(features.vector[None, :])
        hst = float(self.hst.score_and_learn(z)[0])
        if self.sequence is not None:
            rows = features.span_rows[-self.sequence.window :]
            score = float(self.sequence.score_windows(rows[None])[0])
            self.training.append(rows)
        else:
            assert isinstance(self.detector, AutoencoderDetector)
            score = float(self.detector.score_batch(z)[0])
            self.training.append(z[0])
        root = trace.root.service if trace.root is not None else features.top_service
        # NOTE: thresholds are kept per root service with no bound. A span stream with ever
        # new service names grows this map, because traces have no max_sources setting yet.
        threshold = float(self.threshold(root, np.array([score]))[0])
        self.events_since_training += 1
        self.traces_scored += 1
        first = self._first.pop(trace.trace_id, None)
        return Scored(
            key=trace.trace_id,
            index=first.index if first is not None else -1,
            ts=features.start_us / 1e6,
            score=score,
            threshold=threshold,
            alert=score > threshold,
            partition=first.partition if first is not None else -1,
            offset=first.offset if first is not None else -1,
            service=features.top_service,
            detail={
                "spans": len(trace.spans),
                "closed_by": trace.closed_by,
                "latency_us": features.end_us - features.start_us,
                "root_service": root,
                "hst": hst,
            },
        )

    def training_records(self) -> np.ndarray:
        """Return the buffered trace vectors (MLP) or span-row windows (sequence models)."""
        if self.sequence is not None:
            return self._equal_windows(list(self.training))
        return np.stack(list(self.training))

    def train_window(self) -> tuple[Weights, int]:
        """Train on the buffered traces; return (delta, number of samples)."""
        self.events_since_training = 0
        if self.sequence is not None:
            delta = self.sequence.train(list(self.training))
            return delta, self.sequence.last_n_windows
        assert isinstance(self.detector, AutoencoderDetector)
        data = np.stack(list(self.training))
        return self.detector.train(data), int(data.shape[0])

    def snapshot(self) -> dict[str, Any]:
        """Return references to every piece of state that scoring and training change.

        This covers the detector, thresholds, the assemblers with their open traces, the
        first span of each open trace, the latency baseline, the scaler, HalfSpaceTrees and
        the training buffer. The pieces are not copied, so pickle them before the next
        ``process``, ``advance``, ``flush`` or training call.
        """
        return {
            **self._scoring_snapshot(),
            "assemblers": self.assemblers,
            "first": self._first,
            "baseline": self.featurizer.baseline,
            "scaler": self.scaler,
            "hst": self.hst,
            "training": list(self.training),
            "traces_scored": self.traces_scored,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the state with one that ``snapshot`` returned and a pickle kept.

        The caller checks that the state comes from the same settings (``state_fingerprint``).
        Raises KeyError, TypeError or ValueError on a state of another shape, and then changes
        nothing.
        """
        scoring = self._checked_scoring(state)
        assemblers = _state_item(state, "assemblers", dict)
        for partition, assembler in assemblers.items():
            if not isinstance(partition, int) or not isinstance(assembler, TraceAssembler):
                msg = f"saved assembler of partition {partition!r} is a {type(assembler).__name__}"
                raise TypeError(msg)
        first = _state_item(state, "first", dict)
        baseline = _state_item(state, "baseline", OperationBaseline)
        scaler = _state_item(state, "scaler", StreamingScaler)
        hst = _state_item(state, "hst", HalfSpaceTreesDetector)
        training = deque(_state_item(state, "training", list), maxlen=self.edge.window_events)
        traces_scored = int(state["traces_scored"])
        self._apply_scoring(scoring)
        self.assemblers = assemblers
        self._first = first
        self.featurizer.baseline = baseline
        self.scaler = scaler
        self.hst = hst
        self.training = training
        self.traces_scored = traces_scored

    def open_traces_state(self) -> dict[str, Any]:
        """Return the open traces, their first spans and the latency baseline as msgpack values.

        This is the smaller state a client keeps without a checkpoint folder: the open
        traces' spans lie before the committed offsets, so a restart would lose them.
        """
        return {
            "assemblers": {p: a.state() for p, a in self.assemblers.items()},
            "baseline": self.featurizer.baseline.state(),
            "first": [
                [trace_id, first.index, first.partition, first.offset, list(astuple(first.item))]
                for trace_id, first in self._first.items()
            ],
        }

    def load_open_traces_state(self, state: dict[str, Any]) -> None:
        """Load what ``open_traces_state`` returned; a state without ``first`` loads too."""
        for partition, assembler_state in state["assemblers"].items():
            self.assembler(int(partition)).load_state(assembler_state)
        self.featurizer.baseline.load_state(state["baseline"])
        for trace_id, index, partition, offset, span in state.get("first", []):
            self._first[str(trace_id)] = Incoming(Span(*span), int(index), partition, offset)


ModalityPipeline = LogsPipeline | TracesPipeline
