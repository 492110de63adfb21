"""Replay of the Server Machine Dataset (SMD) into the metrics and labels topics.

Each machine becomes one source: its train half and then its test half are produced to
``metrics.raw`` keyed by the machine name, one record per minute of data, with ``index`` =
row number in the replayed stream. Labels (test half only) go to ``labels`` and never into
the metric record a detector sees. Machines are interleaved by row so they advance together,
as live machines would.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from fanomad_stream.config import KafkaSettings, ReplaySettings
from fanomad_stream.errors import ConfigError
from fanomad_stream.service.progress import progress_bar
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Searched in order when the config names no folder: the full data set beside the checkout,
# then the sample the project ships.
DEFAULT_DATA_DIRS = (
    REPO_ROOT.parent / "shared" / "data" / "smd",
    REPO_ROOT / "data" / "smd-sample",
)
START_TS = 1_700_000_000.0  # SMD publishes no absolute time; replayed streams start here


@dataclass
class MachineSeries:
    """One machine's replayed rows and the labels of its test rows."""

    name: str
    values: np.ndarray  # (rows, 38) float32: train rows, then test rows
    train_rows: int
    labels: np.ndarray  # (test rows,) int8, aligned with values[train_rows:]


@dataclass
class ReplayReport:
    points: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_points(self) -> int:
        return sum(self.points.values())


def resolve_data_dir(configured: Path | None) -> Path:
    """Return the SMD folder to read; raise ConfigError naming what was searched."""
    candidates = (configured,) if configured is not None else DEFAULT_DATA_DIRS
    for candidate in candidates:
        if candidate is not None and (candidate / "train").is_dir():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    msg = f"no SMD data found (looked for a train/ folder in: {searched}); set replay.data_dir"
    raise ConfigError(msg)


def _read_matrix(path: Path, rows: int | None) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        lines = (
            handle.readlines()
            if rows is None
            else [line for _, line in zip(range(rows), handle, strict=False)]
        )
    return np.loadtxt(lines, delimiter=",", dtype=np.float32, ndmin=2)


def _find(folder: Path, machine: str) -> Path:
    for name in (f"{machine}.txt.gz", f"{machine}.txt"):
        if (folder / name).exists():
            return folder / name
    msg = f"{folder / machine}.txt(.gz) not found; known machines: {sorted(p.name.split('.')[0] for p in folder.glob('machine-*'))}"
    raise ConfigError(msg)


def load_machine(
    data_dir: Path, machine: str, train_rows: int | None, test_rows: int | None
) -> MachineSeries:
    """Read one machine's train and test rows and the test labels."""
    train = _read_matrix(_find(data_dir / "train", machine), train_rows)
    test = _read_matrix(_find(data_dir / "test", machine), test_rows)
    labels = np.loadtxt(data_dir / "test_label" / f"{machine}.txt", dtype=np.int8, ndmin=1)[
        : test.shape[0]
    ]
    if labels.shape[0] != test.shape[0]:
        msg = f"{machine}: {test.shape[0]} test rows but {labels.shape[0]} labels"
        raise ConfigError(msg)
    return MachineSeries(machine, np.concatenate([train, test]), train.shape[0], labels)


def interleave(series: list[MachineSeries]) -> Iterator[tuple[MachineSeries, int]]:
    """Yield (machine, row) in time order: row 0 of every machine, then row 1, and so on."""
    longest = max(s.values.shape[0] for s in series)
    for row in range(longest):
        for s in series:
            if row < s.values.shape[0]:
                yield s, row


async def replay_smd(
    kafka: KafkaSettings, settings: ReplaySettings, *, progress: bool = True, chunk: int = 2000
) -> ReplayReport:
    """Produce the configured machines; return exact per-machine counts of points and labels."""
    data_dir = resolve_data_dir(settings.data_dir)
    series = [
        load_machine(data_dir, m, settings.train_rows, settings.test_rows)
        for m in settings.machines
    ]
    total = sum(s.values.shape[0] for s in series)
    log.info(
        "replay_started",
        dataset="smd",
        data_dir=str(data_dir),
        machines=settings.machines,
        points=total,
    )

    report = ReplayReport()
    metrics_topic, labels_topic = topic_name(kafka, "metrics.raw"), topic_name(kafka, "labels")
    producer = make_producer(kafka, linger_ms=20)
    await producer.start()
    began = time.monotonic()
    bar = progress_bar(total=total, unit="pt", desc="replay smd", enabled=progress)
    try:
        deliveries: list[asyncio.Future[object]] = []
        for s, row in interleave(series):
            ts = START_TS + row * settings.interval_s
            if settings.speed > 0:
                await _pace(began, row * settings.interval_s / settings.speed)
            key = s.name.encode()
            value = codec.encode(
                "metric", {"index": row, "values": s.values[row]}, src=s.name, ts=ts
            )
            deliveries.append(await producer.send(metrics_topic, value=value, key=key))
            report.points[s.name] = report.points.get(s.name, 0) + 1
            if row >= s.train_rows:
                label = {"index": row, "label": int(s.labels[row - s.train_rows])}
                deliveries.append(
                    await producer.send(
                        labels_topic, codec.encode("label", label, src=s.name, ts=ts), key=key
                    )
                )
                report.labels[s.name] = report.labels.get(s.name, 0) + 1
            if len(deliveries) >= chunk:
                await asyncio.gather(*deliveries)
                bar.update(report.total_points - bar.n)
                deliveries = []
        await asyncio.gather(*deliveries)
        bar.update(report.total_points - bar.n)
    finally:
        bar.close()
        await producer.stop()
    report.seconds = time.monotonic() - began
    log.info(
        "replay_finished",
        points=report.points,
        labels=report.labels,
        seconds=round(report.seconds, 2),
    )
    return report


async def _pace(began: float, offset_s: float) -> None:
    delay = began + offset_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
