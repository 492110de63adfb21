"""Log features: online template mining with drain3, and fixed-width vectors per window.

Every client mines its own templates, so drain3's cluster ids differ between clients. The
features that reach a federated model therefore index templates by a hash of the template
text into ``n_buckets`` buckets, which two clients that see the same message shapes agree on.
The cluster id is kept for per-client template-id sequences. A line that creates a new
template is flagged, because an unseen message shape is itself a signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from drain3 import TemplateMiner
from drain3.drain import Drain, Node
from drain3.masking import MaskingInstruction
from drain3.persistence_handler import PersistenceHandler
from drain3.template_miner_config import TemplateMinerConfig

from fanomad_stream.replay.logs import LogRecord

log = structlog.get_logger(__name__)

ERROR_LEVELS = frozenset({"ERROR", "FATAL", "SEVERE", "CRITICAL", "FAILURE", "PANIC"})

# Masks applied before Drain splits a line into tokens: values that vary per line but not per
# message shape. Drain3 also turns any token with a digit into a wildcard by itself.
DEFAULT_MASKS = (
    (r"blk_-?\d+", "BLK"),
    (r"\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?", "IP"),
    (r"0x[0-9a-fA-F]+", "HEX"),
)


class AtomicFilePersistence(PersistenceHandler):  # type: ignore[misc]
    """drain3 persistence to one file per client, replaced atomically on every save.

    drain3's own ``FilePersistence`` writes in place, so a crash during a save leaves a
    truncated state. Here the state goes to a temporary file first and then replaces the old
    one with ``os.replace``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def save_state(self, state: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(state)
        os.replace(temporary, self.path)

    def load_state(self) -> bytes | None:
        # NOTE: drain3 restores its state with jsonpickle, which can build arbitrary objects,
        # so the state file must be writable by this client only.
        return self.path.read_bytes() if self.path.is_file() else None


@dataclass(frozen=True)
class MinedLine:
    """A log record with its template: drain3 cluster id, template text and hash bucket."""

    record: LogRecord
    cluster_id: int
    template: str
    bucket: int
    is_new: bool

    @property
    def is_error(self) -> bool:
        return self.record.level.upper() in ERROR_LEVELS


def template_bucket(template: str, n_buckets: int) -> int:
    """Return a bucket in [0, n_buckets) from a hash of the template text, stable across runs."""
    digest = hashlib.blake2b(template.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_buckets


class LogTemplateMiner:
    """drain3 ``TemplateMiner`` with per-client state, so a restart keeps template ids.

    Parameters
    ----------
    state_path
        File holding this client's drain3 state, or None to keep it in memory only. The
        state is saved whenever a template is created or changes, and by ``save``. The event
        ids of pre-parsed records (``LogRecord.event``) are kept beside it, in
        ``<stem>-events.json``. A file that fails to load is moved to ``<name>.rejected``
        with a warning, and the miner starts without its templates or event ids.
    n_buckets
        Width of the hashed template vocabulary. Must be >= 1.
    similarity_threshold
        Drain's similarity threshold in (0, 1]: a line joins a template when at least this
        share of its tokens match. Higher gives more, narrower templates.
    depth
        Depth of Drain's prefix tree (>= 3). drain3 uses 4 by default.
    max_templates
        Upper bound on the templates kept (least recently used ones are dropped), or None.
        Pre-parsed event ids have a bound of their own of the same size: events past it are
        not remembered, so each of their lines counts as new, and ``events_dropped`` counts
        those lines.
    """

    def __init__(
        self,
        state_path: Path | None,
        *,
        n_buckets: int = 64,
        similarity_threshold: float = 0.4,
        depth: int = 4,
        max_templates: int | None = 1000,
    ) -> None:
        if n_buckets < 1 or depth < 3 or not 0.0 < similarity_threshold <= 1.0:
            msg = (
                "need n_buckets >= 1, depth >= 3 and similarity_threshold in (0, 1], got "
                f"{n_buckets!r}, {depth!r}, {similarity_threshold!r}"
            )
            raise ValueError(msg)
        self.state_path = state_path
        self.n_buckets = n_buckets
        self.similarity_threshold = similarity_threshold
        self.depth = depth
        self.max_templates = max_templates
        config = TemplateMinerConfig()
        config.drain_sim_th = similarity_threshold
        config.drain_depth = depth
        config.drain_max_clusters = max_templates
        config.masking_instructions = [MaskingInstruction(p, name) for p, name in DEFAULT_MASKS]
        self._persistence = None if state_path is None else AtomicFilePersistence(state_path)
        self._miner = self._load_miner(config)
        self._events_path = (
            None if state_path is None else state_path.with_name(f"{state_path.stem}-events.json")
        )
        # Event id -> cluster id. Events get negative cluster ids (-1, -2, ... in order of
        # first sight), so they never clash with drain3's positive ones.
        self.events: dict[str, int] = self._load_events()
        self.events_dropped = 0

    def _load_miner(self, config: TemplateMinerConfig) -> TemplateMiner:
        """Build drain3's miner from the state file, or empty when the file is unusable.

        An unusable file is moved aside (see ``_set_aside``), so the client starts with no
        templates instead of failing at every start.
        """
        if self._persistence is None:
            return TemplateMiner(None, config)
        try:
            miner = TemplateMiner(self._persistence, config)
            if not isinstance(miner.drain.root_node, Node):
                root = type(miner.drain.root_node).__name__
                msg = f"the state's root node is a {root}, expected a drain3.drain.Node"
                raise TypeError(msg)
        except _DRAIN3_STATE_ERRORS as err:
            self._set_aside(self._persistence.path, err)
            miner = TemplateMiner(None, config)
            miner.persistence_handler = self._persistence
        return miner

    @property
    def template_count(self) -> int:
        return len(self._miner.drain.clusters)

    def mine(self, record: LogRecord) -> MinedLine:
        """Assign ``record`` to a template, creating or widening one when needed.

        A record with an ``event`` id takes that id as its template, without mining.
        """
        if record.event:
            return self._known_event(record)
        result = self._miner.add_log_message(record.line)
        template = str(result["template_mined"])
        return MinedLine(
            record=record,
            cluster_id=int(result["cluster_id"]),
            template=template,
            bucket=template_bucket(template, self.n_buckets),
            is_new=result["change_type"] == "cluster_created",
        )

    def _known_event(self, record: LogRecord) -> MinedLine:
        template = f"event {record.event}"
        cluster_id = self.events.get(record.event)
        is_new = cluster_id is None
        if cluster_id is None:
            if self.max_templates is not None and len(self.events) >= self.max_templates:
                self.events_dropped += 1
                cluster_id = 0
            else:
                cluster_id = self.events[record.event] = -1 - len(self.events)
                self._save_events()
        return MinedLine(
            record=record,
            cluster_id=cluster_id,
            template=template,
            bucket=template_bucket(template, self.n_buckets),
            is_new=is_new,
        )

    def _load_events(self) -> dict[str, int]:
        """Read the event ids, or start with none when the file is missing or unusable."""
        path = self._events_path
        if path is None or not path.is_file():
            return {}
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            return checked_events(loaded, self.max_templates)
        except (OSError, ValueError) as err:
            self._set_aside(path, err)
            return {}

    @staticmethod
    def _set_aside(path: Path, error: Exception) -> None:
        """Move an unusable state file to ``<name>.rejected`` and log why.

        The file is kept for inspection, and the next save writes a fresh one in its place.
        """
        rejected = path.with_name(path.name + ".rejected")
        try:
            os.replace(path, rejected)
        except OSError as move_error:
            log.error(
                "log_template_state_rejected",
                path=str(path),
                error=f"{type(error).__name__}: {error}",
                move_error=str(move_error),
                detail="starting without this state; the next save overwrites the file",
            )
            return
        log.warning(
            "log_template_state_rejected",
            path=str(path),
            moved_to=str(rejected),
            error=f"{type(error).__name__}: {error}",
            detail="starting without this state",
        )

    def _save_events(self) -> None:
        if self._events_path is None:
            return
        self._events_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._events_path.with_name(self._events_path.name + ".tmp")
        temporary.write_text(json.dumps(self.events), encoding="utf-8")
        os.replace(temporary, self._events_path)

    def mine_all(self, records: Iterable[LogRecord]) -> list[MinedLine]:
        return [self.mine(record) for record in records]

    def save(self) -> None:
        """Write the state now (drain3 already saves whenever a template changes)."""
        if self._persistence is not None:
            self._miner.save_state("explicit save")
        # An empty map replaces an existing file too, so a restored state without events
        # leaves no event ids of a later run behind.
        if self.events or (self._events_path is not None and self._events_path.exists()):
            self._save_events()

    def snapshot(self) -> dict[str, Any]:
        """Return the templates: drain3's ``Drain`` and the event ids, not copies."""
        return {
            "drain": self._miner.drain,
            "events": self.events,
            "events_dropped": self.events_dropped,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the templates with ones that ``snapshot`` returned and a pickle kept.

        The state files are not written here; call ``save`` to make them agree. Raises
        KeyError, TypeError or ValueError on a state of another shape, and then changes
        nothing.
        """
        drain, events = state["drain"], state["events"]
        if not isinstance(drain, Drain) or not isinstance(events, dict):
            msg = (
                f"template state holds a {type(drain).__name__} and a {type(events).__name__}, "
                "expected a drain3.drain.Drain and a dict of event ids"
            )
            raise TypeError(msg)
        events = checked_events(events, self.max_templates)
        events_dropped = int(state["events_dropped"])
        self._miner.drain = drain
        self.events = events
        self.events_dropped = events_dropped


# Errors that drain3 0.9's load_state raises on a damaged file: base64 (binascii.Error is
# a ValueError), zlib, JSON, and jsonpickle building objects of the wrong shape.
_DRAIN3_STATE_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    zlib.error,
)


def checked_events(loaded: object, max_events: int | None) -> dict[str, int]:
    """Return ``loaded`` as a map of event id to cluster id; raise ValueError if it is not one.

    The cluster ids must be -1, -2, ... -n, as ``LogTemplateMiner`` assigns them, because the
    next new event takes -(n + 1). At most ``max_events`` ids are accepted.
    """
    if not isinstance(loaded, dict):
        msg = f"event ids must be a JSON object of event id to cluster id, got {type(loaded).__name__}"
        raise ValueError(msg)
    if max_events is not None and len(loaded) > max_events:
        msg = f"{len(loaded)} event ids is above the bound of {max_events}"
        raise ValueError(msg)
    for event, cluster in loaded.items():
        if not isinstance(event, str) or not isinstance(cluster, int) or isinstance(cluster, bool):
            msg = f"event id {event!r} maps to {cluster!r}; expected a string and an integer"
            raise ValueError(msg)
    clusters = sorted(loaded.values(), reverse=True)
    if clusters != list(range(-1, -len(loaded) - 1, -1)):
        msg = f"cluster ids of events must be -1 to -{len(loaded)}, each once"
        raise ValueError(msg)
    return dict(loaded)


def feature_names(n_buckets: int) -> list[str]:
    """Return the names of the columns of ``window_vector``."""
    buckets = [f"template_bucket_{i}" for i in range(n_buckets)]
    return [*buckets, "new_templates", "lines", "lines_per_s", "error_share"]


def window_vector(lines: Sequence[MinedLine], duration_s: float, n_buckets: int) -> np.ndarray:
    """Return the fixed-width float32 feature vector of one window of one source.

    Columns: log1p of the line count per template bucket, log1p of the lines that created a
    template, log1p of the line count, lines per second over ``duration_s``, and the share of
    lines at an error level.
    """
    if duration_s <= 0:
        msg = f"duration_s must be > 0, got {duration_s!r}"
        raise ValueError(msg)
    counts = np.bincount([line.bucket for line in lines], minlength=n_buckets)[:n_buckets]
    n = len(lines)
    new = sum(line.is_new for line in lines)
    errors = sum(line.is_error for line in lines)
    tail = [np.log1p(new), np.log1p(n), n / duration_s, errors / n if n else 0.0]
    return np.concatenate([np.log1p(counts), tail]).astype(np.float32)


def line_vectors(lines: Sequence[MinedLine], n_buckets: int) -> np.ndarray:
    """Return one row per line for the sequence models: one-hot bucket, new flag, error flag.

    The shape is (len(lines), n_buckets + 2), so a window of lines is a (T, F) slice.
    """
    rows = np.zeros((len(lines), n_buckets + 2), dtype=np.float32)
    for i, line in enumerate(lines):
        rows[i, line.bucket] = 1.0
        rows[i, n_buckets] = float(line.is_new)
        rows[i, n_buckets + 1] = float(line.is_error)
    return rows


@dataclass
class LogWindow:
    """The lines of one source in one window [start, start + length).

    ``ref`` is what the caller passed with the window's last line, such as its stream index
    and offset, or None.
    """

    source: str
    start: float
    lines: list[MinedLine] = field(default_factory=list)
    ref: object = None


class LogWindower:
    """Tumbling event-time windows per source.

    A window closes when a line of the same source falls at or after its end, when it
    reaches ``max_lines``, or with a line whose event is ``end_event`` (the end of a session).
    Lines that arrive late for a window that already closed join the source's current window,
    and ``late_lines`` counts them. ``flush`` closes every open window.

    At most ``max_open`` windows are open: a line of a new source past that closes the
    window whose source wrote least recently, and ``evicted`` counts those windows. Without
    the bound, every source that stops writing (an HDFS block that never sends its end line)
    would keep its window in memory for good.
    """

    def __init__(
        self,
        window_s: float,
        *,
        max_lines: int = 10_000,
        end_event: str | None = None,
        max_open: int | None = None,
    ) -> None:
        if window_s <= 0 or max_lines < 1 or (max_open is not None and max_open < 1):
            msg = (
                "window_s must be > 0, max_lines >= 1 and max_open >= 1 or None, got "
                f"{window_s!r}, {max_lines!r}, {max_open!r}"
            )
            raise ValueError(msg)
        self.window_s = window_s
        self.max_lines = max_lines
        self.end_event = end_event
        self.max_open = max_open
        self.late_lines = 0
        self.evicted = 0
        # Least recently written source first.
        self._open: OrderedDict[str, LogWindow] = OrderedDict()

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def add(self, line: MinedLine, ref: object = None) -> list[LogWindow]:
        """Add one line and return the windows it closed (at most two with an eviction)."""
        source, ts = line.record.source, line.record.ts
        start = ts - ts % self.window_s
        current = self._open.get(source)
        closed = []
        if current is not None and start > current.start:
            closed.append(self._open.pop(source))
            current = None
        if current is None:
            if self.max_open is not None and len(self._open) >= self.max_open:
                closed.append(self._open.popitem(last=False)[1])
                self.evicted += 1
            current = self._open[source] = LogWindow(source, start)
        else:
            self._open.move_to_end(source)
            if start < current.start:
                self.late_lines += 1
        current.lines.append(line)
        current.ref = ref
        ends_session = self.end_event is not None and line.record.event == self.end_event
        if ends_session or len(current.lines) >= self.max_lines:
            closed.append(self._open.pop(source))
        return closed

    def flush(self) -> list[LogWindow]:
        closed = list(self._open.values())
        self._open.clear()
        return closed


@dataclass(frozen=True)
class LogWindowFeatures:
    """The feature vector of one closed window of one source, and its ``LogWindow.ref``."""

    source: str
    start: float
    end: float
    lines: int
    vector: np.ndarray
    ref: object = None


class LogFeaturizer:
    """Mine, window and vectorise log records: the per-client log pipeline of an edge client.

    ``add`` returns, for each record, its mined line (for ``line_vectors`` and the sequence
    models) and the windows it closed, as fixed-width vectors of ``n_features`` columns for
    the window models.

    Parameters
    ----------
    state_path
        This client's drain3 state file, or None for memory only (see ``LogTemplateMiner``).
    n_buckets
        Width of the hashed template vocabulary.
    window_s
        Length of the tumbling event-time windows, in seconds. > 0.
    max_lines
        A window closes early once it contains this many lines. >= 1.
    end_event
        A line with this event id closes its source's window (see ``LogWindower``), or None.
    max_open
        Most windows open at once, or None; past it the least recently written one closes.
    """

    def __init__(
        self,
        state_path: Path | None,
        *,
        n_buckets: int = 64,
        window_s: float = 60.0,
        max_lines: int = 10_000,
        end_event: str | None = None,
        max_open: int | None = None,
    ) -> None:
        self.n_buckets = n_buckets
        self.window_s = window_s
        self.max_lines = max_lines
        self.miner = LogTemplateMiner(state_path, n_buckets=n_buckets)
        self.windower = LogWindower(
            window_s, max_lines=max_lines, end_event=end_event, max_open=max_open
        )

    @property
    def n_features(self) -> int:
        return len(feature_names(self.n_buckets))

    @property
    def n_line_features(self) -> int:
        return self.n_buckets + 2

    def add(
        self, record: LogRecord, ref: object = None
    ) -> tuple[MinedLine, list[LogWindowFeatures]]:
        """Mine ``record`` and window it; ``ref`` comes back with the window it ends up last in."""
        line = self.miner.mine(record)
        return line, [self._features(window) for window in self.windower.add(line, ref)]

    def flush(self) -> list[LogWindowFeatures]:
        """Close every open window (at shutdown or the end of a replay) and save the miner state."""
        self.miner.save()
        return [self._features(window) for window in self.windower.flush()]

    def _features(self, window: LogWindow) -> LogWindowFeatures:
        vector = window_vector(window.lines, self.window_s, self.n_buckets)
        return LogWindowFeatures(
            window.source,
            window.start,
            window.start + self.window_s,
            len(window.lines),
            vector,
            window.ref,
        )
