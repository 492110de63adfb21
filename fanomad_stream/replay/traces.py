"""Readers for the Nezha TrainTicket data: spans, logs and pod metrics, and fault labels.

All times are Unix UTC. Labels follow the data set's fault-injection cases: a case is one
fault injected into one pod at ``inject_time_utc`` (the source's ``inject_timestamp`` is
wrong by about eight hours for some cases and is not used). A record is anomalous when its
time is at or after the injection and within the case's three one-minute windows. The fault
duration is not recorded, so that window is a proxy.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.replay.logs import LogRecord

# Metric columns that carry no information in this data set (0 on every row).
UNUSABLE_METRICS = frozenset({"PodSuccessRate(%)"})
# A window file named HH_MM ends a few seconds after HH:MM:00 (up to 8.9 s in the shipped
# windows), so an unshipped case's last window is taken to end 10 s after that minute.
WINDOW_END_SLACK_S = 10.0
# A pod metric row stamped t summarises the minute (t - 60 s, t]. In both cpu_contention cases
# of the shipped cut, the injected pod's CpuUsage first reaches about 500 m in the row stamped
# at the end of the first whole minute after the injection. The injections and those rows are
# 13:31:54 → 13:33:09 and 14:49:57 → 14:51:10, and the row before shows no rise. Labels and windows therefore place a row at the
# middle of its minute, t - METRIC_INTERVAL_S / 2.
METRIC_INTERVAL_S = 60.0
LOG_LEVELS = frozenset({"TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL"})


def service_of(pod: str) -> str:
    """Return the service of a pod name ``<service>-<replicaset hash>-<pod suffix>``."""
    parts = pod.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else pod


def _rows(path: Path) -> Iterator[dict[str, str]]:
    if not path.is_file():
        msg = f"file {path} not found; point the reader at a local copy of the Nezha data"
        raise FileNotFoundError(msg)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def _utc(text: str) -> float:
    """Parse an RFC 3339 time, with or without ``Z`` and with up to nanoseconds, as UTC."""
    text = text.rstrip("Z")
    whole, _, fraction = text.partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def read_spans(path: Path) -> list[Span]:
    """Read a trace file into spans sorted by start time (ties keep file order).

    ``parent_id`` is empty for the root (the file's literal ``root``), ``start_us`` is the start
    in Unix microseconds and ``duration_us`` the file's ``Duration`` (already microseconds).
    There is no status column, so ``status`` is empty.
    """
    spans = []
    for row in _rows(path):
        parent = row["ParentID"]
        spans.append(
            Span(
                trace_id=row["TraceID"],
                span_id=row["SpanID"],
                parent_id="" if parent == "root" else parent,
                service=service_of(row["PodName"]),
                operation=row["OperationName"],
                start_us=int(row["StartTimeUnixNano"]) // 1000,
                duration_us=int(row["Duration"]),
                pod=row["PodName"],
            )
        )
    return order_by_start(spans)


def order_by_start(spans: Sequence[Span]) -> list[Span]:
    return sorted(spans, key=lambda span: span.start_us)


def replay_offsets(start_us: Sequence[int], speed: float) -> np.ndarray:
    """Return send times in seconds from the first event, ``speed`` times faster than recorded.

    ``speed`` 1 keeps the recorded pace, 10 replays ten times faster, and 0 sends everything
    at once. ``start_us`` must be sorted.
    """
    if speed < 0 or not math.isfinite(speed):
        msg = f"speed must be a finite number >= 0, got {speed!r}; use 0 for no pacing"
        raise ValueError(msg)
    times = np.asarray(start_us, dtype=np.float64)
    if times.size == 0 or speed == 0:
        return np.zeros(times.size)
    if (np.diff(times) < 0).any():
        msg = "start times must be sorted; order the spans with order_by_start first"
        raise ValueError(msg)
    offsets: np.ndarray = (times - times[0]) / 1e6 / speed
    return offsets


@dataclass(frozen=True)
class NezhaLogLine:
    """A container log line with the trace and span it belongs to."""

    record: LogRecord
    pod: str
    trace_id: str
    span_id: str


def read_logs(path: Path) -> list[NezhaLogLine]:
    """Read a log file into records keyed by service, sorted by time.

    The text is the application line inside the Docker JSON record, with its leading local
    clock time and level cut off (the level goes to ``level``). Time comes from
    ``TimeUnixNano``, or from ``Timestamp`` on the rows where that overflowed to a negative.
    """
    lines = []
    for row in _rows(path):
        nanos = int(row["TimeUnixNano"])
        ts = nanos / 1e9 if nanos > 0 else _utc(row["Timestamp"])
        text = str(json.loads(row["Log"]).get("log", "")).rstrip("\n")
        level, message = _split_level(text)
        record = LogRecord(ts=ts, source=service_of(row["PodName"]), line=message, level=level)
        lines.append(NezhaLogLine(record, row["PodName"], row["TraceID"], row["SpanID"]))
    return sorted(lines, key=lambda line: line.record.ts)


def _split_level(text: str) -> tuple[str, str]:
    parts = text.split(maxsplit=2)
    if len(parts) == 3 and parts[1].upper() in LOG_LEVELS:
        return parts[1].upper(), parts[2]
    return "", text


@dataclass(frozen=True)
class PodMetrics:
    """One pod's metric rows: times (Unix s), column names and values (N, d) without NaN."""

    pod: str
    service: str
    ts: np.ndarray
    names: list[str]
    values: np.ndarray
    filled: int


def read_pod_metrics(path: Path) -> PodMetrics:
    """Read a per-pod metric file, dropping unusable columns and filling gaps.

    Latency columns are NaN on many rows. A NaN takes the last finite value of its column (0
    before the first one), and ``filled`` counts the values replaced, because a metric record
    must carry finite numbers.
    """
    rows = list(_rows(path))
    if not rows:
        msg = f"metric file {path} has no rows"
        raise ValueError(msg)
    names = [n for n in rows[0] if n not in {"Time", "TimeStamp", "PodName"} | UNUSABLE_METRICS]
    values = np.array([[float(row[n]) for n in names] for row in rows], dtype=np.float64)
    filled = int(np.isnan(values).sum())
    for column in values.T:
        last = 0.0
        for i, value in enumerate(column):
            if math.isnan(value):
                column[i] = last
            else:
                last = value
    pod = rows[0]["PodName"]
    ts = np.array([float(row["TimeStamp"]) for row in rows])
    return PodMetrics(pod, service_of(pod), ts, names, values.astype(np.float32), filled)


@dataclass(frozen=True)
class FaultCase:
    """One injected fault, with the time span in which records count as anomalous."""

    case_id: str
    inject_unix: float
    end_unix: float
    service: str
    pod: str
    fault_type: str
    shipped: bool


def read_cases(labels_dir: Path) -> list[FaultCase]:
    """Read every case of ``cases.csv``, ending each at its last window (``windows.csv``)."""
    window_end = {
        (row["date"], row["window"]): _utc(row["last_ts_utc"])
        for row in _rows(labels_dir / "windows.csv")
        if row["phase"] == "fault"
    }
    cases = []
    for row in _rows(labels_dir / "cases.csv"):
        inject = _utc(row["inject_time_utc"])
        last = row["window_files"].split()[-1]
        end = window_end.get((row["date"], last))
        if end is None:
            hour, minute = last.split("_")
            end = _utc(f"{row['date']}T{hour}:{minute}:00") + WINDOW_END_SLACK_S
        cases.append(
            FaultCase(
                case_id=row["case_id"],
                inject_unix=inject,
                end_unix=end,
                service=row["inject_service"],
                pod=row["inject_pod"],
                fault_type=row["fault_type"],
                shipped=row["shipped"] == "1",
            )
        )
    return cases


def label_times(ts: Sequence[float] | np.ndarray, cases: Sequence[FaultCase]) -> np.ndarray:
    """Return for each time the index of the case it falls in, or -1 outside every case."""
    times = np.asarray(ts, dtype=np.float64)
    case_index = np.full(times.shape, -1, dtype=np.int64)
    for index, case in enumerate(cases):
        case_index[(times >= case.inject_unix) & (times <= case.end_unix) & (case_index < 0)] = (
            index
        )
    return case_index


@dataclass(frozen=True)
class WindowLabel:
    """One shipped window file and its label: 1 fault, 0 fault-free, -1 injection minute."""

    date: str
    window: str
    case_id: str
    label: int
    first_unix: float
    last_unix: float


def read_window_labels(labels_dir: Path) -> list[WindowLabel]:
    """Label the shipped windows for per-window evaluation.

    The +1 and +2 minute windows of a case are faulty and the fault-free windows normal. The
    injection-minute window is mostly before the fault, so it gets -1 (leave it out of
    per-window scores, or label its records one by one with ``label_times``).
    """
    labels = []
    for row in _rows(labels_dir / "windows.csv"):
        if row["phase"] == "fault_free":
            label = 0
        else:
            label = 1 if int(row["minutes_after_inject_minute"]) >= 1 else -1
        labels.append(
            WindowLabel(
                row["date"],
                row["window"],
                row["case_id"],
                label,
                _utc(row["first_ts_utc"]),
                _utc(row["last_ts_utc"]),
            )
        )
    return labels
