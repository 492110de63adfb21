"""A local checkpoint of an edge client's scoring state and of the offsets that state covers.

The file ``checkpoint.bin`` in a site's state folder is one JSON header line followed by a
pickle of the pipeline's ``snapshot()`` (``EdgePipeline``, ``LogsPipeline`` or
``TracesPipeline``). The header carries the format version, the site, the fingerprint of the
settings the state was built with, and the SHA-256 of the pickle. It also carries the global
model version, the last update round, and the next offset to read of every partition whose
records the state has folded in. A file from another format, site or configuration is
rejected before the pickle is read.

Pickle runs code while it loads, so the checkpoint is trusted local state: the reader rejects a
file or folder that another user owns or that the group or others may write. Files are written
with mode 0600 in folders with mode 0700, atomically (temporary file, fsync, ``os.replace``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiokafka import TopicPartition

from fanomad_stream.config import AppConfig, ModalityName

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.bin"
LOCK_FILE = "checkpoint.lock"
MAX_HEADER_BYTES = 1024 * 1024

# Edge settings that change how the client reads and stops, not what the state contains.
_OPERATIONAL_EDGE_FIELDS = frozenset(
    {
        "group_prefix",
        "max_batch_records",
        "state_dir",
        "max_metric_values",
        "poll_timeout_ms",
        "checkpoint_interval_s",
        "stop_timeout_s",
    }
)


class CheckpointRejectedError(Exception):
    """A checkpoint file exists but may not be used; ``reason`` is a short code for logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class EdgeCheckpoint:
    """The restorable content of a checkpoint: pipeline state and each partition's next offset."""

    site: str
    fingerprint: str
    global_version: int
    last_update_round: int
    offsets: dict[TopicPartition, int]  # next offset to read, per partition the state covers
    pipeline: dict[str, Any]  # the pipeline's snapshot()
    written_at: float


def state_fingerprint(config: AppConfig, modality: ModalityName = "metrics") -> str:
    """Return a SHA-256 over the settings that shape the scoring state, and the model name.

    Two configurations with the same fingerprint build pipelines whose state can replace each
    other's. Settings of how the client polls, stores and stops are left out. For ``logs``
    and ``traces``, ``config`` is the modality's view (``modalities.modality_config``), and
    the fingerprint also covers the modality and its section (drain3 buckets and windows, or
    the trace assembly limits). For ``metrics`` it hashes the same fields as before the
    modalities had checkpoints.
    """
    described: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model_name": config.aggregator.model_name,
        "model": config.model.model_dump(mode="json"),
        "edge": config.edge.model_dump(mode="json", exclude=set(_OPERATIONAL_EDGE_FIELDS)),
    }
    if modality == "logs":
        # The model section is config.model already; the drain3 folder is not state.
        described["logs"] = config.logs.model_dump(mode="json", exclude={"model", "state_dir"})
    elif modality == "traces":
        described["traces"] = config.traces.model_dump(mode="json", exclude={"model"})
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def write_checkpoint(path: Path, checkpoint: EdgeCheckpoint) -> int:
    """Write ``checkpoint`` to ``path`` atomically and return the file size in bytes."""
    payload = pickle.dumps(checkpoint.pipeline, protocol=pickle.HIGHEST_PROTOCOL)
    header = {
        "format": FORMAT_VERSION,
        "site": checkpoint.site,
        "fingerprint": checkpoint.fingerprint,
        "global_version": checkpoint.global_version,
        "last_update_round": checkpoint.last_update_round,
        "offsets": [
            [tp.topic, tp.partition, offset] for tp, offset in sorted(checkpoint.offsets.items())
        ],
        "written_at": checkpoint.written_at,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode() + b"\n"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(head)
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return len(head) + len(payload)


def read_checkpoint(path: Path, *, site: str, fingerprint: str) -> EdgeCheckpoint:
    """Read and check a checkpoint; raise CheckpointRejectedError when it may not be used.

    Raises FileNotFoundError when there is no file.
    """
    _check_private(path)
    with path.open("rb") as handle:
        header = _read_header(handle, path)
        if header.get("format") != FORMAT_VERSION:
            raise CheckpointRejectedError(
                "format",
                f"checkpoint {path} has format {header.get('format')!r}, this version reads "
                f"{FORMAT_VERSION}",
            )
        if header.get("site") != site:
            raise CheckpointRejectedError(
                "site", f"checkpoint {path} belongs to site {header.get('site')!r}, not {site!r}"
            )
        if header.get("fingerprint") != fingerprint:
            raise CheckpointRejectedError(
                "config",
                f"checkpoint {path} was written with other model, edge or modality settings "
                f"(fingerprint {str(header.get('fingerprint'))[:12]}, now {fingerprint[:12]})",
            )
        payload = handle.read()
    try:
        expected_bytes = int(header["payload_bytes"])
        expected_digest = str(header["payload_sha256"])
        offsets = {
            TopicPartition(str(topic), int(partition)): int(offset)
            for topic, partition, offset in header["offsets"]
        }
        global_version = int(header["global_version"])
        last_update_round = int(header["last_update_round"])
        written_at = float(header["written_at"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointRejectedError(
            "corrupt", f"checkpoint {path} has an invalid header: {err!r}"
        ) from err
    if len(payload) != expected_bytes or hashlib.sha256(payload).hexdigest() != expected_digest:
        raise CheckpointRejectedError(
            "corrupt",
            f"checkpoint {path} holds {len(payload)} state bytes that do not match its header "
            f"({expected_bytes} bytes and a SHA-256); it was truncated or changed",
        )
    negative = sorted(str(tp) for tp, offset in offsets.items() if offset < 0)
    if negative:
        raise CheckpointRejectedError(
            "corrupt", f"checkpoint {path} has negative offsets for {negative}"
        )
    # The file and its folder passed _check_private: only this service user could write them.
    try:
        pipeline = pickle.loads(payload)
    except Exception as err:  # pickle.loads raises many types, e.g. on a renamed class
        raise CheckpointRejectedError(
            "unpickle",
            f"checkpoint {path} passed its SHA-256 check but its state failed to load "
            f"({type(err).__name__}: {err}); another release of fanomad-stream may have "
            "written it",
        ) from err
    return EdgeCheckpoint(
        site=site,
        fingerprint=fingerprint,
        global_version=global_version,
        last_update_round=last_update_round,
        offsets=offsets,
        pipeline=pipeline,
        written_at=written_at,
    )


def _read_header(handle: IO[bytes], path: Path) -> dict[str, Any]:
    line = handle.readline(MAX_HEADER_BYTES)
    try:
        header = json.loads(line)
    except ValueError as err:
        raise CheckpointRejectedError(
            "corrupt", f"checkpoint {path} does not start with a JSON header line"
        ) from err
    if not isinstance(header, dict):
        raise CheckpointRejectedError("corrupt", f"checkpoint {path} header is not a JSON object")
    return header


def _check_private(path: Path) -> None:
    """Reject a file or folder that another user owns or that others may write to."""
    for target in (path.parent, path):
        info = target.stat()
        if info.st_uid != os.getuid():
            raise CheckpointRejectedError(
                "permissions",
                f"{target} is owned by uid {info.st_uid}, not by the service user "
                f"{os.getuid()}; a pickle from another user is never loaded",
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CheckpointRejectedError(
                "permissions",
                f"{target} is writable by group or others (mode {stat.filemode(info.st_mode)}); "
                f"run `chmod go-w {target}` or delete the checkpoint",
            )


class CheckpointLock:
    """An exclusive ``flock`` on ``<site folder>/checkpoint.lock`` held while a process runs.

    Only the holder reads and writes the site's checkpoint. The kernel releases the lock when
    the process exits, including on SIGKILL.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; return False when another process holds it."""
        if self._descriptor is not None:
            return True
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()} {time.time():.0f}\n".encode())
        self._descriptor = descriptor
        return True

    def release(self) -> None:
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None
