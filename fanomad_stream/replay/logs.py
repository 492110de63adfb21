"""Readers that turn LogHub log files into log records, with labels kept apart.

A record is what a log shipper would send: event time, source (the node or component that
wrote the line), the message text and the log level where the format has one. The header
fields that became ``ts``, ``source`` and ``level`` are cut from the text, and so is the label
token of BGL and Thunderbird, so a detector that reads records never receives the label. Labels
travel in a separate array indexed like the records. The project does not ship LogHub files:
every reader takes the folder of a local copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

NORMAL_TAG = "-"
BLOCK_ID = re.compile(r"blk_-?\d+")


@dataclass(frozen=True)
class LogRecord:
    """One log line as a detector receives it.

    ``ts`` is the event time in Unix seconds, ``line`` the message text without the label and
    without the header fields parsed into ``ts`` and ``source``, and ``level`` the log level
    (empty when the format has none). ``event`` is the event id of a shipper that parses its
    logs itself (structured logging, or DeepLog's log keys); such a record skips template
    mining and the event id is its template. Empty for raw lines.
    """

    ts: float
    source: str
    line: str
    level: str = ""
    event: str = ""

    def to_body(self, index: int) -> dict[str, Any]:
        """Return the body of a ``log`` record; ``index`` joins it to its label record."""
        body = {"source": self.source, "line": self.line, "level": self.level, "index": index}
        if self.event:
            body["event"] = self.event
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any], ts: float) -> LogRecord:
        """Rebuild a record from a decoded ``log`` body and the envelope's event time."""
        return cls(
            ts=ts,
            source=body["source"],
            line=body["line"],
            level=body.get("level") or "",
            event=body.get("event") or "",
        )


@dataclass(frozen=True)
class LogDataset:
    """Records of one file in file order, and their labels when the data set has any.

    ``labels[i]`` is 1 when record ``i`` is anomalous and 0 otherwise; ``categories[i]`` is the
    dataset's own tag (``-`` marks a normal line). Both are None for unlabelled logs.
    """

    name: str
    records: list[LogRecord]
    labels: np.ndarray | None = None
    categories: list[str] | None = None


@dataclass(frozen=True)
class Session:
    """One HDFS block session: DeepLog log-key ids in order, and 1 for an anomalous block."""

    keys: tuple[int, ...]
    label: int


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        msg = f"log file {path} not found; point the reader at a local LogHub copy"
        raise FileNotFoundError(msg)
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n")
            if line:
                yield number, line


def _split(path: Path, number: int, line: str, fields: int) -> list[str]:
    parts = line.split(maxsplit=fields)
    if len(parts) <= fields:
        msg = f"{path}:{number} has {len(parts)} fields, expected more than {fields}: {line[:80]!r}"
        raise ValueError(msg)
    return parts


def read_bgl(path: Path) -> LogDataset:
    """Read a BGL log (``label epoch date node time node type component level content``).

    The source is the node, ``line`` starts at the component (``KERNEL``, ``APP``…) and the
    first token, the alert tag, goes to ``categories`` and ``labels`` only.
    """
    records, categories = [], []
    for number, line in _lines(path):
        tag, epoch, _date, node, _time, _repeat, _type, rest = _split(path, number, line, 7)
        component_level = rest.split(maxsplit=2)
        level = component_level[1] if len(component_level) > 1 else ""
        records.append(LogRecord(ts=float(epoch), source=node, line=rest, level=level))
        categories.append(tag)
    labels = np.array([tag != NORMAL_TAG for tag in categories], dtype=np.int8)
    return LogDataset("bgl", records, labels, categories)


def read_thunderbird(path: Path) -> LogDataset:
    """Read a Thunderbird log (``label epoch date node month day time location content``).

    The source is the node, ``line`` starts at ``component[pid]:`` and the label token is kept
    apart as in BGL. Thunderbird has no level field, so ``level`` is empty.
    """
    records, categories = [], []
    for number, line in _lines(path):
        tag, epoch, _date, node, _month, _day, _time, _location, rest = _split(
            path, number, line, 8
        )
        records.append(LogRecord(ts=float(epoch), source=node, line=rest))
        categories.append(tag)
    labels = np.array([tag != NORMAL_TAG for tag in categories], dtype=np.int8)
    return LogDataset("thunderbird", records, labels, categories)


def read_hdfs(path: Path) -> LogDataset:
    """Read an HDFS log (``yymmdd hhmmss pid LEVEL component: content``), unlabelled.

    The source is the component. The file gives local cluster time without a zone, read here
    as UTC, so only differences between timestamps are meaningful. HDFS labels are per block
    (see ``block_ids``) and not part of the LogHub sample.
    """
    records = []
    for number, line in _lines(path):
        day, clock, _pid, level, component, content = _split(path, number, line, 5)
        when = datetime.strptime(day + clock, "%y%m%d%H%M%S").replace(tzinfo=UTC)
        source = component.rstrip(":")
        records.append(
            LogRecord(
                ts=when.timestamp(), source=source, line=f"{component} {content}", level=level
            )
        )
    return LogDataset("hdfs", records)


def block_ids(line: str) -> list[str]:
    """Return the HDFS block ids a line mentions, in order (a line inherits their labels)."""
    return BLOCK_ID.findall(line)


def read_hdfs_sessions(
    folder: Path, *, max_normal: int | None = None, max_abnormal: int | None = None
) -> list[Session]:
    """Read DeepLog's HDFS block sessions: normal ones from ``hdfs_train.txt``, then anomalous.

    Both files keep their order, so taking the first sessions of each is a chronological cut.
    """
    normal = _read_keys(folder / "hdfs_train.txt", max_normal)
    abnormal = _read_keys(folder / "hdfs_test_abnormal.txt", max_abnormal)
    return [Session(keys, 0) for keys in normal] + [Session(keys, 1) for keys in abnormal]


def _read_keys(path: Path, limit: int | None) -> list[tuple[int, ...]]:
    sessions: list[tuple[int, ...]] = []
    for number, line in _lines(path):
        if limit is not None and len(sessions) >= limit:
            break
        try:
            sessions.append(tuple(int(token) for token in line.split()))
        except ValueError as err:
            msg = f"{path}:{number} must hold space-separated integer log keys: {line[:80]!r}"
            raise ValueError(msg) from err
    return sessions


def split_sessions(
    sessions: Sequence[Session], train_share: float
) -> tuple[list[Session], list[Session]]:
    """Split sessions chronologically: the first ``train_share`` of the normal ones train.

    The rest of the normal sessions and every anomalous session form the test set, so the
    test has normal sessions although DeepLog's own normal test file is not available.
    """
    if not 0.0 < train_share < 1.0:
        msg = f"train_share must be in (0, 1), got {train_share!r}"
        raise ValueError(msg)
    normal = [s for s in sessions if s.label == 0]
    cut = int(len(normal) * train_share)
    return normal[:cut], normal[cut:] + [s for s in sessions if s.label == 1]


END_EVENT = "end"


def interleave_sessions(
    sessions: Sequence[Session],
    *,
    concurrency: int,
    seed: int,
    name: str = "hdfs_sessions",
    first_block: int = 0,
) -> LogDataset:
    """Turn block sessions into one log stream in which ``concurrency`` blocks are live at once.

    HDFS writes the lines of many blocks at the same time. Here the sessions open in the given
    order, and at most ``concurrency`` of them are open. Each next line comes from an open
    session drawn at random (seeded). So the lines of a block stay in order but interleave
    with other blocks. A record's source is its block (``blk_<n>``, ``n`` counted from
    ``first_block``), its ``event`` the DeepLog log key, and one last record with event
    ``end`` closes each session, as a shipper that sees a block's deletion can send. Every
    line carries its session's label. Time stamps are the line's position in seconds.
    """
    if concurrency < 1:
        msg = f"concurrency must be >= 1, got {concurrency!r}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    records: list[LogRecord] = []
    labels: list[int] = []
    waiting = list(enumerate(sessions))[::-1]
    live: list[tuple[int, list[str]]] = []
    while waiting or live:
        while waiting and len(live) < concurrency:
            number, session = waiting.pop()
            live.append((number, [str(key) for key in session.keys] + [END_EVENT]))
        pick = int(rng.integers(len(live)))
        number, events = live[pick]
        event = events.pop(0)
        records.append(
            LogRecord(
                ts=float(len(records)),
                source=f"blk_{first_block + number}",
                line="",
                event=event,
            )
        )
        labels.append(sessions[number].label)
        if not events:
            live.pop(pick)
    categories = [str(label) for label in labels]
    return LogDataset(name, records, np.array(labels, dtype=np.int8), categories)


def fixed_rate_offsets(n: int, events_per_s: float) -> np.ndarray:
    """Return send times (s from the start) for ``n`` events at a fixed rate.

    The LogHub samples are sparse draws from months of logs, so their own gaps are not a
    useful replay clock. A rate of 0 sends everything at once.
    """
    if events_per_s < 0:
        msg = f"events_per_s must be >= 0, got {events_per_s!r}; use 0 for no pacing"
        raise ValueError(msg)
    if events_per_s == 0:
        return np.zeros(n)
    return np.arange(n) / events_per_s
