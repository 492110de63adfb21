"""Replay of log lines into ``logs.raw`` and of spans into ``traces.raw``, labels apart.

A log record is keyed by its source and carries ``index``, its line number in the replayed
stream. A span is keyed by its trace id, so every span of a trace lands on one partition and
one consumer receives the whole trace. It also carries ``index``, its position in start order.
Labels go to the ``labels`` topic under the same key and index, never into the record that
a detector reads. The project ships no LogHub or Nezha files: the readers take a local copy,
by default the one beside the checkout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from aiokafka import AIOKafkaProducer

from fanomad_stream.config import KafkaSettings
from fanomad_stream.errors import ConfigError
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.replay.logs import (
    LogDataset,
    fixed_rate_offsets,
    read_bgl,
    read_hdfs,
    read_thunderbird,
)
from fanomad_stream.replay.traces import (
    METRIC_INTERVAL_S,
    PodMetrics,
    label_times,
    read_cases,
    read_logs,
    read_pod_metrics,
    read_spans,
    read_window_labels,
)
from fanomad_stream.service.progress import progress_bar
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name

log = structlog.get_logger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LOGHUB_DIR = SHARED_DATA / "loghub"
NEZHA_DIR = SHARED_DATA / "multimodal" / "nezha_trainticket"
LOG_FILES = {
    "bgl": ("BGL/BGL_2k.log", read_bgl),
    "hdfs": ("HDFS/HDFS_2k.log", read_hdfs),
    "thunderbird": ("Thunderbird/Thunderbird_2k.log", read_thunderbird),
}
NEZHA_TRACES = "*/*/trace/*_trace.csv.gz"
NEZHA_LOGS = "*/*/log/*_log.csv.gz"
# Producer ids of the Nezha replays. Label records carry them, so the labels of the three
# modalities stay apart although metrics and logs share keys (service names).
METRICS_SOURCE, LOGS_SOURCE, SPANS_SOURCE = "nezha-metrics", "nezha-logs", "nezha-traces"
# Per-pod files only: the front-end service file has other columns.
NEZHA_METRICS = "metric/*/ts-*_metric.csv.gz"


@dataclass
class StreamReplayReport:
    """Exact counts of what a replay produced, per record key group."""

    records: dict[str, int] = field(default_factory=dict)
    labels: int = 0
    anomalous: int = 0
    seconds: float = 0.0

    @property
    def total_records(self) -> int:
        return sum(self.records.values())


def load_log_dataset(name: str, data_dir: Path | None = None) -> LogDataset:
    """Read the LogHub sample ``name`` (bgl, hdfs or thunderbird) from ``data_dir``."""
    if name not in LOG_FILES:
        msg = f"unknown log data set {name!r}; expected one of {', '.join(LOG_FILES)}"
        raise ConfigError(msg)
    relative, reader = LOG_FILES[name]
    path = (data_dir or LOGHUB_DIR) / relative
    if not path.is_file():
        msg = f"log file {path} not found; pass --data-dir with a local LogHub copy"
        raise ConfigError(msg)
    return reader(path)


def load_nezha_spans(
    data_dir: Path | None = None, *, pattern: str = NEZHA_TRACES, limit: int | None = None
) -> tuple[list[Span], np.ndarray]:
    """Read the spans of every matching trace file in start order, and a label per span.

    A span's label is 1 when its start falls in a fault case's anomalous time span (see
    ``replay.traces.label_times``). ``limit`` keeps the first spans in start order.
    """
    folder = data_dir or NEZHA_DIR
    files = sorted(folder.glob(pattern))
    if not files:
        msg = f"no trace files match {pattern!r} under {folder}; pass --data-dir"
        raise ConfigError(msg)
    spans = sorted((s for path in files for s in read_spans(path)), key=lambda s: s.start_us)
    spans = spans[:limit] if limit is not None else spans
    cases = read_cases(folder / "labels")
    labels = label_times([span.start_us / 1e6 for span in spans], cases) >= 0
    return spans, labels.astype(np.int8)


def load_nezha_logs(
    data_dir: Path | None = None, *, pattern: str = NEZHA_LOGS, limit: int | None = None
) -> LogDataset:
    """Read the container log lines of the matching Nezha files as a labelled log data set."""
    folder = data_dir or NEZHA_DIR
    files = sorted(folder.glob(pattern))
    if not files:
        msg = f"no log files match {pattern!r} under {folder}; pass --data-dir"
        raise ConfigError(msg)
    lines = sorted((line for path in files for line in read_logs(path)), key=lambda x: x.record.ts)
    lines = lines[:limit] if limit is not None else lines
    records = [line.record for line in lines]
    cases = read_cases(folder / "labels")
    labels = (label_times([r.ts for r in records], cases) >= 0).astype(np.int8)
    return LogDataset(LOGS_SOURCE, records, labels)


@dataclass(frozen=True)
class MetricRows:
    """Metric rows of several pods merged in time order, keyed by service, with labels."""

    services: list[str]
    ts: np.ndarray
    values: np.ndarray
    indices: np.ndarray
    labels: np.ndarray


def load_nezha_metrics(
    data_dir: Path | None = None, *, pattern: str = NEZHA_METRICS, margin_s: float = 600.0
) -> MetricRows:
    """Read per-pod metrics near the shipped windows, merged in time order, with labels.

    Rows are kept within ``margin_s`` of a shipped fault or fault-free window, so the
    metrics cover the same minutes as the spans and logs. ``indices`` numbers the rows of each
    service (the record key) in time order.
    A row is labelled 1 when the middle of the minute it summarises lies inside any of the 45
    fault cases (see ``label_times`` and ``METRIC_INTERVAL_S``).
    """
    folder = data_dir or NEZHA_DIR
    files = sorted(folder.glob(pattern))
    if not files:
        msg = f"no metric files match {pattern!r} under {folder}; pass --data-dir"
        raise ConfigError(msg)
    windows = read_window_labels(folder / "labels")
    pods = [read_pod_metrics(path) for path in files]
    _check_same_columns(pods)
    services, ts, rows = [], [], []
    for pod in pods:
        near = np.zeros(pod.ts.shape, dtype=bool)
        for window in windows:
            near |= (pod.ts >= window.first_unix - margin_s) & (
                pod.ts <= window.last_unix + margin_s
            )
        kept = np.flatnonzero(near)
        services += [pod.service] * kept.size
        ts.append(pod.ts[kept])
        rows.append(pod.values[kept])
    all_ts = np.concatenate(ts)
    order = np.argsort(all_ts, kind="stable")
    ordered = [services[i] for i in order]
    # Each day has its own pod per service, so rows are numbered per service, not per file.
    counts: dict[str, int] = {}
    numbers = np.empty(len(ordered), dtype=np.int64)
    for i, service in enumerate(ordered):
        numbers[i] = counts.get(service, 0)
        counts[service] = numbers[i] + 1
    cases = read_cases(folder / "labels")
    return MetricRows(
        services=ordered,
        ts=all_ts[order],
        values=np.concatenate(rows)[order],
        indices=numbers,
        labels=(label_times(all_ts[order] - METRIC_INTERVAL_S / 2, cases) >= 0).astype(np.int8),
    )


def _check_same_columns(pods: Sequence[PodMetrics]) -> None:
    names = pods[0].names
    for pod in pods[1:]:
        if pod.names != names:
            msg = f"pod {pod.pod} has metric columns {pod.names}, pod {pods[0].pod} has {names}"
            raise ConfigError(msg)


async def replay_metrics(
    kafka: KafkaSettings, rows: MetricRows, *, progress: bool = True
) -> StreamReplayReport:
    """Produce metric rows to ``metrics.raw`` keyed by service, and their labels to ``labels``."""
    report = StreamReplayReport()
    topic, labels_topic = topic_name(kafka, "metrics.raw"), topic_name(kafka, "labels")
    async with _Sender(kafka, len(rows.services), "replay nezha metrics", progress) as sender:
        for i, service in enumerate(rows.services):
            key, ts, index = service.encode(), float(rows.ts[i]), int(rows.indices[i])
            body = {"index": index, "values": rows.values[i]}
            await sender.send(topic, codec.encode("metric", body, src=METRICS_SOURCE, ts=ts), key)
            label = {"index": index, "label": int(rows.labels[i])}
            await sender.send(
                labels_topic,
                codec.encode("label", label, src=METRICS_SOURCE, ts=ts),
                key,
                counted=False,
            )
            report.records[service] = report.records.get(service, 0) + 1
            report.labels += 1
            report.anomalous += label["label"]
    report.seconds = sender.seconds
    log.info(
        "replay_finished",
        dataset="nezha-metrics",
        rows=report.total_records,
        anomalous=report.anomalous,
        seconds=round(report.seconds, 2),
    )
    return report


async def replay_logs(
    kafka: KafkaSettings,
    dataset: LogDataset,
    *,
    events_per_s: float = 0.0,
    limit: int | None = None,
    progress: bool = True,
) -> StreamReplayReport:
    """Produce the data set's records to ``logs.raw`` and its labels to ``labels``.

    ``events_per_s`` paces the replay at a fixed rate (0 sends as fast as possible).
    """
    records = dataset.records[:limit] if limit is not None else dataset.records
    offsets = fixed_rate_offsets(len(records), events_per_s)
    report = StreamReplayReport()
    topic, labels_topic = topic_name(kafka, "logs.raw"), topic_name(kafka, "labels")
    async with _Sender(kafka, len(records), f"replay {dataset.name}", progress) as sender:
        for index, record in enumerate(records):
            await sender.pace(offsets[index])
            key = record.source.encode()
            value = codec.encode("log", record.to_body(index), src=dataset.name, ts=record.ts)
            await sender.send(topic, value, key)
            report.records[record.source] = report.records.get(record.source, 0) + 1
            if dataset.labels is not None:
                label = {"index": index, "label": int(dataset.labels[index])}
                await sender.send(
                    labels_topic,
                    codec.encode("label", label, src=dataset.name, ts=record.ts),
                    key,
                    counted=False,
                )
                report.labels += 1
                report.anomalous += label["label"]
    report.seconds = sender.seconds
    log.info(
        "replay_finished",
        dataset=dataset.name,
        lines=report.total_records,
        labels=report.labels,
        anomalous=report.anomalous,
        seconds=round(report.seconds, 2),
    )
    return report


async def replay_spans(
    kafka: KafkaSettings,
    spans: Sequence[Span],
    labels: np.ndarray | None,
    *,
    speed: float = 0.0,
    first_index: int = 0,
    progress: bool = True,
) -> StreamReplayReport:
    """Produce spans in start order to ``traces.raw`` and their labels to ``labels``.

    ``speed`` 1 keeps the recorded pace, N replays N times faster and 0 sends at once.
    Span ``i`` gets index ``first_index + i``, so a replay in parts keeps indices unique.
    """
    from fanomad_stream.replay.traces import replay_offsets

    offsets = replay_offsets([span.start_us for span in spans], speed)
    report = StreamReplayReport()
    topic, labels_topic = topic_name(kafka, "traces.raw"), topic_name(kafka, "labels")
    async with _Sender(kafka, len(spans), "replay nezha spans", progress) as sender:
        for index, span in enumerate(spans, start=first_index):
            await sender.pace(offsets[index - first_index])
            key, ts = span.trace_id.encode(), span.start_us / 1e6
            body = {**span.to_body(), "index": index}
            await sender.send(topic, codec.encode("span", body, src=SPANS_SOURCE, ts=ts), key)
            report.records[span.service] = report.records.get(span.service, 0) + 1
            if labels is not None:
                label = {"index": index, "label": int(labels[index - first_index])}
                await sender.send(
                    labels_topic,
                    codec.encode("label", label, src=SPANS_SOURCE, ts=ts),
                    key,
                    counted=False,
                )
                report.labels += 1
                report.anomalous += label["label"]
    report.seconds = sender.seconds
    log.info(
        "replay_finished",
        dataset="nezha",
        spans=report.total_records,
        labels=report.labels,
        anomalous=report.anomalous,
        seconds=round(report.seconds, 2),
    )
    return report


class _Sender:
    """A producer that paces sends, waits for acknowledgements in chunks and shows progress."""

    def __init__(self, kafka: KafkaSettings, total: int, desc: str, progress: bool) -> None:
        self._producer: AIOKafkaProducer = make_producer(kafka, linger_ms=20)
        self._bar = progress_bar(total=total, unit="rec", desc=desc, enabled=progress)
        self._pending: list[asyncio.Future[object]] = []
        self._began = 0.0
        self.seconds = 0.0

    async def __aenter__(self) -> _Sender:
        await self._producer.start()
        self._began = time.monotonic()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                await asyncio.gather(*self._pending)
        finally:
            self._bar.close()
            await self._producer.stop()
            self.seconds = time.monotonic() - self._began

    async def pace(self, offset_s: float) -> None:
        delay = self._began + float(offset_s) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def send(self, topic: str, value: bytes, key: bytes, *, counted: bool = True) -> None:
        """Queue one record; ``counted`` records advance the progress bar (labels do not)."""
        self._pending.append(await self._producer.send(topic, value=value, key=key))
        if counted:
            self._bar.update(1)
        if len(self._pending) >= 2000:
            await asyncio.gather(*self._pending)
            self._pending = []
